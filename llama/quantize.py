"""Weight-only int8 and int4 quantization of a loaded Transformer's linear layers, applied from
outside the model (the model file knows nothing of it), and a quantized folder to save it once.

int8: per output channel, symmetric, w = q * scale. int4: groups of `group_size` inputs (64 by
default: 4.5 bits per weight, as llama.cpp's q4_0) with an offset, w = (q - 8) * scale + zero, q in
0..15. On a CPU with AVX-512 VNNI, bf16 matmuls run in llama.cpu's compiled kernels: int8 decode
steps (up to 4 rows), every int4 matmul. Elsewhere they run in torch's packed CPU kernels, and
where no kernel exists the weight is dequantized on the fly (and the log says so).
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


def _row_blocks(w: torch.Tensor, elements: int = 1 << 20, multiple: int = 1):
    """Slices of about `elements` weights, whole multiples of `multiple` rows: float32 temporaries
    of a few MB, whatever the matrix (rows are quantized independently), so quantizing while
    loading never holds much beside the result."""
    step = max(1, elements // w.shape[1] // multiple) * multiple
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


GROUP_SIZES = (32, 64, 128, 256)  # what both kernels take
BLOCK_ROWS = 32  # output rows per block of Int4Linear's layout (llama/csrc/cpu_bf16.cpp: 16 x INT4_BLOCKS)


class Int4Linear(nn.Module):
    """int4 weights in groups of group_size inputs, w = (q - 8) * scale + zero with q in 0..15 and
    scale, zero in bf16, held in one layout on every device, `blocks`: for each 32 output rows and
    each group, the 32 (scale, zero) pairs, then the group's nibbles 8 inputs at a time, 16 rows
    per 64 bytes (byte 4r + t: q[r][k + t] low, q[r][k + 4 + t] high). That is the order
    llama.cpu's kernel reads them in, one stream per 32 rows. state_dict() gives the portable form
    (nibbles `weight` [out, in/2], high one first, and `scales_and_zeros` [in/group_size, out, 2],
    torch's layout), which is what a quantized folder holds; load_state_dict() takes it."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 64):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"int4 group_size={group_size} does not divide in_features={in_features}")
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size={group_size}: use one of {', '.join(map(str, GROUP_SIZES))}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups, blocks = in_features // group_size, -(-out_features // BLOCK_ROWS)
        self.register_buffer("blocks", torch.zeros(blocks, groups, BLOCK_ROWS * (4 + group_size // 2), dtype=torch.uint8))
        self._torch_pack: tuple[torch.Tensor, torch.Tensor] | None = None

    def _pack(self, q: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """q [32 b, in] (0..15) and pairs [in / group_size, 32 b, 2] bf16 -> b blocks."""
        blocks, groups = q.shape[0] // BLOCK_ROWS, self.in_features // self.group_size
        q = q.reshape(blocks, BLOCK_ROWS // 16, 16, groups, self.group_size // 8, 8).permute(0, 3, 4, 1, 2, 5)
        nibbles = (q[..., :4] | q[..., 4:] << 4).reshape(blocks, groups, -1)
        pairs = pairs.reshape(groups, blocks, -1).transpose(0, 1).contiguous().view(torch.uint8)
        return torch.cat([pairs, nibbles], dim=-1)

    @torch.no_grad()
    def quantize_(self, w: torch.Tensor) -> "Int4Linear":
        for rows in _row_blocks(w, multiple=BLOCK_ROWS):
            groups = w[rows].float().reshape(-1, self.in_features // self.group_size, self.group_size)
            lo, hi = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
            scales = ((hi - lo).clamp(min=1e-8) / 15).bfloat16().float()  # round with scale and zero as stored
            zeros = (lo + 8 * scales).bfloat16().float()
            q = torch.round((groups - zeros) / scales + 8).clamp(0, 15).to(torch.uint8).flatten(1)
            pairs = torch.stack([scales, zeros], dim=-1).squeeze(2).transpose(0, 1).bfloat16()
            pad = -q.shape[0] % BLOCK_ROWS  # the last block's rows past out_features: zeros
            q, pairs = F.pad(q, (0, 0, 0, pad)), F.pad(pairs, (0, 0, 0, pad))
            packed = self._pack(q.to(self.blocks.device), pairs.to(self.blocks.device))
            self.blocks[rows.start // BLOCK_ROWS :][: packed.shape[0]] = packed
        self._torch_pack = None
        return self

    @property
    def scales_and_zeros(self) -> torch.Tensor:
        """[in / group_size, out, 2] bf16 (a copy)."""
        pairs = self.blocks[..., : BLOCK_ROWS * 4].contiguous().view(torch.bfloat16)  # [blocks, groups, 32 * 2]
        return pairs.transpose(0, 1).reshape(self.in_features // self.group_size, -1, 2)[:, : self.out_features]

    def unpacked(self) -> torch.Tensor:
        """q as int32 [out, in], values 0..15."""
        blocks, groups = self.blocks.shape[:2]
        nibbles = self.blocks[..., BLOCK_ROWS * 4 :].reshape(blocks, groups, self.group_size // 8, BLOCK_ROWS // 16, 16, 4)
        q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).permute(0, 3, 4, 1, 2, 5)
        return q.reshape(-1, self.in_features)[: self.out_features].int()

    @property
    def weight(self) -> torch.Tensor:
        """The nibbles as a quantized folder stores them: [out, in/2], q[2j] high, q[2j + 1] low (a copy)."""
        q = self.unpacked().to(torch.uint8)
        return q[:, ::2] << 4 | q[:, 1::2]

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        scales, zeros = self.scales_and_zeros.float().unbind(-1)  # [in / group_size, out]
        expand = lambda t: t.transpose(0, 1).repeat_interleave(self.group_size, dim=1)  # noqa: E731
        return ((self.unpacked() - 8) * expand(scales) + expand(zeros)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernel_can_run(x) and (kernels := compiled_kernels()) is not None:  # llama.cpu's VNNI kernel
            return kernels.mm_int4(x.contiguous(), self.blocks, self.out_features, self.group_size)
        flat = x.reshape(-1, self.in_features).contiguous()  # torch's int4 kernels refuse strided rows
        if x.device.type == "cpu" and self.out_features % 16 == 0:  # torch's kernel, on its own copy of the weights
            if self._torch_pack is None:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.unpacked(), 1)
                self._torch_pack = packed, self.scales_and_zeros.contiguous()
            packed, pairs = self._torch_pack
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, pairs.to(x.dtype))
        else:
            _warn_fallback(x.device, "int4")
            out = F.linear(flat, self.dequantized(x.dtype))
        return out.reshape(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        destination[prefix + "scales_and_zeros"] = self.scales_and_zeros

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        expected = {"weight": (self.out_features, self.in_features // 2),
                    "scales_and_zeros": (self.in_features // self.group_size, self.out_features, 2)}  # fmt: skip
        if any(prefix + key not in state_dict for key in expected):
            missing.extend(prefix + key for key in expected if prefix + key not in state_dict)
            return
        for key, shape in expected.items():
            if tuple(state_dict[prefix + key].shape) != shape:
                errors.append(f"{prefix}{key}: shape {tuple(state_dict[prefix + key].shape)}, expected {shape}")
                return
        nibbles, pairs = state_dict[prefix + "weight"], state_dict[prefix + "scales_and_zeros"].bfloat16()
        q = torch.stack([nibbles >> 4, nibbles & 15], dim=-1).reshape(self.out_features, -1)
        pad = -self.out_features % BLOCK_ROWS
        with torch.no_grad():
            self.blocks.copy_(self._pack(F.pad(q, (0, 0, 0, pad)), F.pad(pairs, (0, 0, 0, pad))))
        self._torch_pack = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


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
        with torch.device(linear.weight.device):
            if scheme == "int8":
                q = Int8Linear(linear.in_features, linear.out_features, dtype)
            else:
                q = Int4Linear(linear.in_features, linear.out_features, group_size)
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
