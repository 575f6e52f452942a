"""Weight-only int8 and int4 quantization of a loaded Transformer's linear layers, applied from
outside the model (the model file knows nothing of it), and a quantized folder to save it once.

int8: per output channel, symmetric, w = q * scale. int4: groups of `group_size` inputs with an
offset, w = (q - 8) * scale + zero, q in 0..15. Matmuls run in torch's packed CPU/CUDA kernels,
except int8 decode steps (up to 4 rows) in bf16 on a CPU, which run in llama.cpu's compiled kernel
where it builds; where no kernel exists the weight is dequantized on the fly (and the log says so).
"""

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llama.checkpoint import file_mappings, release_mapped
from llama.cpu import GEMV_ROWS, PackedLinear, compiled_kernels, kernel_can_run
from llama.model import Transformer

logger = logging.getLogger(__name__)

SCHEMES = ("int8", "int4")
QUANT_FILE = "quantization.json"  # beside params.json: {"scheme": ..., "group_size": ...}


_warned: set[tuple[str, str]] = set()


def _warn_fallback(device: torch.device, scheme: str) -> None:
    if (device.type, scheme) not in _warned:
        _warned.add((device.type, scheme))
        logger.warning("%s on %s: no packed kernel is used here; weights are dequantized on each call", scheme, device)


def _row_blocks(w: torch.Tensor, elements: int = 1 << 20):
    """Slices of about `elements` weights: float32 temporaries of a few MB, whatever the matrix
    (rows are quantized independently), so quantizing while loading never holds much beside the result."""
    step = max(1, elements // w.shape[1])
    return (slice(lo, lo + step) for lo in range(0, w.shape[0], step))


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype))

    @torch.no_grad()
    def quantize_(self, w: torch.Tensor) -> "Int8Linear":
        for rows in _row_blocks(w):
            # Round with the scales as stored, so dequantizing is exact to half a step.
            block = w[rows].float()
            scales = (block.abs().amax(dim=1).clamp(min=1e-8) / 127).to(self.scales.dtype).float()
            self.weight[rows] = torch.round(block / scales[:, None]).clamp(-127, 127)
            self.scales[rows] = scales
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(self.in_features, 1)
        if x.device.type == "cpu" and self.scales.dtype == torch.bfloat16 and 0 < rows <= GEMV_ROWS:
            if kernel_can_run(x) and (kernels := compiled_kernels()) is not None:  # llama.cpu's VNNI kernel
                return kernels.gemv_int8(x.contiguous(), self.weight, self.scales)
        if x.device.type == "cpu" and self.in_features % 16 == 0:  # torch's kernel gives NaN for other widths
            flat = x.reshape(-1, self.in_features).contiguous()  # generation projects a strided [B, dim] view
            flat = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales.to(x.dtype))
            return flat.reshape(*x.shape[:-1], self.out_features)
        _warn_fallback(x.device, "int8")
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


class Int4Linear(nn.Module):
    """Stores q as nibbles [out, in/2] (portable, saved as is) and packs them for the kernel once."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 32, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"int4 group_size={group_size} does not divide in_features={in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        # [in / group_size, out, 2]: (scale, zero) per group, the layout torch's kernels take.
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2, dtype=dtype))
        self._packed: torch.Tensor | None = None

    @torch.no_grad()
    def quantize_(self, w: torch.Tensor) -> "Int4Linear":
        for rows in _row_blocks(w):
            groups = w[rows].float().reshape(-1, self.in_features // self.group_size, self.group_size)
            lo, hi = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
            dtype = self.scales_and_zeros.dtype  # round with scale and zero as stored
            scales = ((hi - lo).clamp(min=1e-8) / 15).to(dtype).float()
            zeros = (lo + 8 * scales).to(dtype).float()
            q = torch.round((groups - zeros) / scales + 8).clamp(0, 15).to(torch.uint8).flatten(1)
            self.weight[rows] = q[:, ::2] << 4 | q[:, 1::2]
            self.scales_and_zeros[:, rows] = torch.stack([scales, zeros], dim=-1).squeeze(2).transpose(0, 1)
        self._packed = None
        return self

    def unpacked(self) -> torch.Tensor:
        """q as int32 [out, in], values 0..15."""
        return torch.stack([self.weight >> 4, self.weight & 15], dim=-1).reshape(self.out_features, -1).int()

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        scales, zeros = self.scales_and_zeros.float().unbind(-1)  # [in / group_size, out]
        expand = lambda t: t.transpose(0, 1).repeat_interleave(self.group_size, dim=1)  # noqa: E731
        return ((self.unpacked() - 8) * expand(scales) + expand(zeros)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()  # torch's int4 kernels refuse strided rows
        if x.device.type == "cpu":
            if self._packed is None:
                self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.unpacked(), 1)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self._packed, self.group_size,
                                                             self.scales_and_zeros.to(x.dtype))  # fmt: skip
        else:
            _warn_fallback(x.device, "int4")
            out = F.linear(flat, self.dequantized(x.dtype))
        return out.reshape(*x.shape[:-1], self.out_features)


def _linears(model: Transformer):
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, (nn.Linear, PackedLinear)):  # a packed one gives its dense weight back
                yield module, child_name, f"{name}.{child_name}".lstrip(".")


def make_quantized(model: Transformer, scheme: str, group_size: int = 32, quantize: bool = True) -> Transformer:
    """Replace every nn.Linear with its quantized counterpart, in place, one layer at a time (the
    float weight is freed as it goes). quantize=False only builds the structure, for loading."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize={scheme!r}: use one of {', '.join(SCHEMES)}")
    spans = file_mappings()
    for parent, child_name, _ in list(_linears(model)):
        linear = getattr(parent, child_name)
        dtype = linear.weight.dtype if linear.weight.is_floating_point() else torch.bfloat16
        with torch.device(linear.weight.device):
            if scheme == "int8":
                q = Int8Linear(linear.in_features, linear.out_features, dtype)
            else:
                q = Int4Linear(linear.in_features, linear.out_features, group_size, dtype)
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
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{path} does not match {scheme}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            if expected[key].shape != value.shape:
                raise ValueError(f"{key}: {path} has shape {tuple(value.shape)}, the model {tuple(expected[key].shape)}")
            expected[key].copy_(value)


def main(src: str, out: str, scheme: str = "int8", dtype: str = "bfloat16") -> None:
    """Quantize a Meta folder once and save it: python -m llama.quantize SRC OUT --scheme int4"""
    from llama.checkpoint import find_tokenizer
    from llama.generation import LLaMa

    llm = LLaMa.build(src, max_seq_len=1, max_batch_size=1, device="cpu", dtype=dtype, quantize=scheme)
    print(f"wrote {save_quantized(llm.model, out, find_tokenizer(Path(src)))}")


if __name__ == "__main__":
    from llama.convert import run_cli

    run_cli(main)
