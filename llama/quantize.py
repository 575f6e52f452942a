"""Weight-only int8 and int4 quantization of a loaded Transformer's linear layers, applied from
outside the model (the model file knows nothing of it), and the quantized folder that saves it
once (written by `python -m llama.convert.quantized`, read by llama.loading). The layers are
llama.quantized_linear's: int8 per output channel; int4 in groups of 64 inputs by default (4.5 bits
per weight, as llama.cpp's q4_0).
"""

import json
import os
from pathlib import Path

import torch
from torch import nn

from llama.checkpoint import copy_tokenizer, new_checkpoint_dir, write_checklist
from llama.cpu import PackedLinear, weight_bytes
from llama.model import Transformer
from llama.quantized_linear import GROUP_SIZES, Int4Linear, Int8Linear, QuantizedLinear, wants_kernel_layout
from llama.runtime import file_mappings, release_mapped

SCHEMES = ("int8", "int4")
QUANT_FILE = "quantization.json"  # beside params.json: {"scheme": ..., "group_size": ...}


def _linears(model: Transformer) -> list[tuple[nn.Module, str]]:
    """(parent, name) of every linear layer (a packed one gives its dense weight back)."""
    return [
        (module, name)
        for module in model.modules()
        for name, child in module.named_children()
        if isinstance(child, (nn.Linear, PackedLinear))
    ]


def _quantized_like(linear: nn.Module, scheme: str, group_size: int, device: torch.device) -> QuantizedLinear:
    """An empty quantized layer of linear's shape for its dtype, on device."""
    dtype = linear.weight.dtype if linear.weight.is_floating_point() else torch.bfloat16
    with torch.device(device):
        if scheme == "int8":
            return Int8Linear(linear.in_features, linear.out_features, dtype, wants_kernel_layout(dtype))
        return Int4Linear(linear.in_features, linear.out_features, group_size, dtype, wants_kernel_layout(dtype))


def check_scheme(scheme: str | None) -> None:
    """Refuse a scheme this module does not have (None, no quantization, is fine)."""
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError(f"quantize={scheme!r}: use one of {', '.join(SCHEMES)}")


def make_quantized(model: Transformer, scheme: str, group_size: int = 64, quantize: bool = True) -> Transformer:
    """Replace every nn.Linear with its quantized counterpart, in place, one layer at a time (the
    float weight is freed as it goes). quantize=False only builds the structure, for loading."""
    check_scheme(scheme)
    spans = file_mappings()
    for parent, child_name in _linears(model):
        linear = getattr(parent, child_name)
        q = _quantized_like(linear, scheme, group_size, linear.weight.device)
        if quantize:
            q.quantize_(linear.weight)
            release_mapped([linear.weight], spans)  # its pages, when it lies in an mmap'd shard
        setattr(parent, child_name, q)
    model.quantization = {"scheme": scheme, "group_size": group_size if scheme == "int4" else None}
    return model


def quantized_bytes(model: Transformer, scheme: str, group_size: int = 64) -> int:
    """Bytes the model's weights will take after make_quantized, counted on a model that may still
    be on the meta device (each layer's quantized form is built there, holding nothing)."""
    check_scheme(scheme)
    total = weight_bytes(model)
    for parent, child_name in _linears(model):
        linear = getattr(parent, child_name)
        total += weight_bytes(_quantized_like(linear, scheme, group_size, torch.device("meta"))) - weight_bytes(linear)
    return total


def save_quantized(
    model: Transformer, out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None
) -> Path:
    """A folder that loads without quantizing again: params.json, quantization.json and one
    consolidated.00.pth of quantized tensors (not Meta's layout, so never split into shards),
    the tokenizer, and checklist.chk over all of them. A folder that holds a checkpoint already
    (the one the model was loaded from, say) is refused."""
    if getattr(model, "quantization", None) is None:
        raise ValueError("the model is not quantized: make_quantized(model, 'int8' or 'int4') first")
    out = new_checkpoint_dir(out_dir)
    (out / "params.json").write_text(json.dumps(model.params.to_params(), indent=2) + "\n")
    (out / QUANT_FILE).write_text(json.dumps(model.quantization) + "\n")
    torch.save({k: v.to("cpu") for k, v in model.state_dict().items()}, out / "consolidated.00.pth")
    if tokenizer_path is not None:
        copy_tokenizer(tokenizer_path, out)
    write_checklist(out)
    return out


def read_scheme(ckpt_dir: Path) -> dict | None:
    """A folder's quantization.json ({"scheme": ..., "group_size": ...}), None where it has none."""
    path = ckpt_dir / QUANT_FILE
    if not path.is_file():
        return None
    try:
        scheme = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e}): save_quantized writes it; write the folder again") from None
    if not isinstance(scheme, dict) or scheme.get("scheme") not in SCHEMES:
        found = scheme.get("scheme") if isinstance(scheme, dict) else scheme
        raise ValueError(f"{path}: scheme {found!r} is not one this version reads ({', '.join(SCHEMES)})")
    group_size = scheme.get("group_size")
    allowed = GROUP_SIZES if scheme["scheme"] == "int4" else (None,)
    if group_size not in allowed or isinstance(group_size, (bool, float)):
        want = f"one of {', '.join(map(str, GROUP_SIZES))}" if scheme["scheme"] == "int4" else "null"
        raise ValueError(f"{path}: group_size {group_size!r} for {scheme['scheme']}: it is {want}")
    return scheme
