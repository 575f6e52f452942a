"""Weight-only int8 and int4 quantization of a loaded Transformer's linear layers, applied from
outside the model (the model file knows nothing of it), and a quantized folder to save it once.
The layers themselves are llama.quantized_linear's: int8 per output channel; int4 in groups of
64 inputs by default (4.5 bits per weight, as llama.cpp's q4_0).
"""

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from llama.checkpoint import file_mappings, release_mapped
from llama.cpu import PackedLinear
from llama.model import Transformer
from llama.quantized_linear import Int4Linear, Int8Linear, kernel_layout

SCHEMES = ("int8", "int4")
QUANT_FILE = "quantization.json"  # beside params.json: {"scheme": ..., "group_size": ...}


def _linears(model: Transformer):
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, (nn.Linear, PackedLinear)):  # a packed one gives its dense weight back
                yield module, child_name, f"{name}.{child_name}".lstrip(".")


def make_quantized(model: Transformer, scheme: str, group_size: int = 64, quantize: bool = True) -> Transformer:
    """Replace every nn.Linear with its quantized counterpart, in place, one layer at a time (the
    float weight is freed as it goes). quantize=False only builds the structure, for loading."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize={scheme!r}: use one of {', '.join(SCHEMES)}")
    spans = file_mappings()
    for parent, child_name, _ in list(_linears(model)):
        linear = getattr(parent, child_name)
        dtype = linear.weight.dtype if linear.weight.is_floating_point() else torch.bfloat16
        blocks = kernel_layout(dtype)
        with torch.device(linear.weight.device):
            if scheme == "int8":
                q = Int8Linear(linear.in_features, linear.out_features, dtype, blocks)
            else:
                q = Int4Linear(linear.in_features, linear.out_features, group_size, dtype, blocks)
        if quantize:
            q.quantize_(linear.weight)
            release_mapped([linear.weight], spans)  # its pages, when it lies in an mmap'd shard
        setattr(parent, child_name, q)
    model.quantization = {"scheme": scheme, "group_size": group_size if scheme == "int4" else None}
    return model


def save_quantized(model: Transformer, out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None) -> Path:
    """A folder that loads without quantizing again: params.json, quantization.json and one
    consolidated.00.pth of quantized tensors (not Meta's layout, so never split into shards),
    the tokenizer, and checklist.chk over all of them."""
    from llama.checkpoint import write_checklist

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(model.params.to_params(), indent=2) + "\n")
    (out / QUANT_FILE).write_text(json.dumps(model.quantization) + "\n")
    torch.save({k: v.to("cpu") for k, v in model.state_dict().items()}, out / "consolidated.00.pth")
    if tokenizer_path is not None:
        shutil.copy(tokenizer_path, out / "tokenizer.model")
    write_checklist(out)
    return out


def read_scheme(ckpt_dir: Path) -> dict | None:
    path = ckpt_dir / QUANT_FILE
    if not path.is_file():
        return None
    scheme = json.loads(path.read_text())
    if scheme.get("scheme") not in SCHEMES:
        raise ValueError(f"{path}: unknown scheme {scheme.get('scheme')!r}; this version reads {', '.join(SCHEMES)}")
    return scheme


def load_quantized(model: Transformer, ckpt_dir: Path, scheme: dict) -> None:
    """Fill an allocated model (make_quantized(quantize=False) then to_empty) from save_quantized."""
    path = ckpt_dir / "consolidated.00.pth"
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    try:
        model.load_state_dict(state, strict=True)  # Int4Linear reads the portable layout into its own
    except RuntimeError as e:
        raise ValueError(f"{path} does not match {scheme}: {e}") from None


def main(src: str, out: str, scheme: str = "int8", dtype: str = "bfloat16") -> None:
    """Quantize a Meta folder once and save it: python -m llama.quantize SRC OUT --scheme int4"""
    from llama.checkpoint import find_tokenizer
    from llama.generation import LLaMa

    llm = LLaMa.build(src, max_seq_len=1, max_batch_size=1, device="cpu", dtype=dtype, quantize=scheme)
    print(f"wrote {save_quantized(llm.model, out, find_tokenizer(Path(src)))}")


if __name__ == "__main__":
    from llama.convert import run_cli

    run_cli(main)
