"""Quantized linear layers: Int8Linear (per output channel, symmetric, w = q * scale) and
Int4Linear (groups of `group_size` inputs with an offset, w = (q - 8) * scale + zero, q in 0..15).
Each holds its weights once: in bf16 on a CPU with AVX-512 VNNI, in the layout llama.kernels'
compiled ops read (every matmul runs there); elsewhere as the portable tensors, which torch's int8
CPU kernel reads as they are and its int4 kernels (CPU; CUDA from compute capability 8.0) from a
repacked copy. Where no kernel exists the weight is dequantized on each call (the log says so).
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn

from llama.kernels import compiled_kernels, kernel_can_run

logger = logging.getLogger(__name__)

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


BLOCK_ROWS = 32  # output rows per block of the kernels' layouts (llama/csrc/cpu_bf16.cpp: 16 x kBlocks)
INT8_GROUP = 64  # inputs per activation scale in llama.kernels' int8 kernel (kInt8Group)
GROUP_SIZES = (32, 64, 128, 256)  # int4 groups both kernels take


def wants_kernel_layout(dtype: torch.dtype) -> bool:
    """Whether quantized linears of a `dtype` model hold their weights in the kernels' layout:
    bf16 on a CPU where its kernels build (AVX-512 VNNI and a C++ compiler)."""
    return dtype == torch.bfloat16 and compiled_kernels() is not None


class QuantizedLinear(nn.Module):
    """What Int8Linear and Int4Linear share. Weights are held once, in one of two layouts: where
    the kernels run (wants_kernel_layout), `blocks`, their own order, one stream per 32 output
    rows; elsewhere the portable tensors (PORTABLE, torch's kernels read them). state_dict() is
    the portable form either way (a quantized folder holds it) and load_state_dict() takes it; in
    the kernel layout, the portable names (module.weight, ...) give copies."""

    PORTABLE: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, kernel_layout: bool | None, scale_dtype: torch.dtype):
        super().__init__()
        self.kernel_layout = wants_kernel_layout(scale_dtype) if kernel_layout is None else kernel_layout
        self.in_features, self.out_features = in_features, out_features
        self.scale_dtype = torch.bfloat16 if self.kernel_layout else scale_dtype
        self._torch_copy: tuple[torch.Tensor, ...] | None = None  # torch's own layout, made on first use
        if self.kernel_layout:
            self.register_buffer(
                "blocks", torch.zeros(-(-out_features // BLOCK_ROWS), *self._block_shape(), dtype=torch.uint8)
            )
        else:
            for name, (shape, dtype) in self._portable_spec().items():
                self.register_buffer(name, torch.zeros(shape, dtype=dtype))

    def _block_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _portable_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def _pack(self, **portable: torch.Tensor) -> torch.Tensor:
        """Portable tensors of 32 n output rows -> n blocks."""
        raise NotImplementedError

    def _unpack(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def portable(self) -> dict[str, torch.Tensor]:
        """The portable tensors: the buffers themselves, or copies made from the blocks."""
        return self._unpack() if self.kernel_layout else {name: self._buffers[name] for name in self.PORTABLE}

    def __getattr__(self, name: str):
        if name in type(self).PORTABLE and self.kernel_layout:
            return self._unpack()[name]
        return super().__getattr__(name)

    def _store(self, first_row: int, **portable: torch.Tensor) -> None:
        """Write quantized rows from first_row on (a multiple of 32, or the whole matrix)."""
        if not self.kernel_layout:
            rows = slice(first_row, first_row + portable["weight"].shape[0])
            for name, value in portable.items():
                self._buffers[name][self._rows(name, rows)] = value.to(self._buffers[name].dtype)
        else:
            pad = -portable["weight"].shape[0] % BLOCK_ROWS  # rows past out_features: zeros
            padded = {
                name: F.pad(value.to(self.blocks.device), (0, pad) if value.dim() == 1 else (0, 0, 0, pad))
                for name, value in portable.items()
            }
            packed = self._pack(**padded)
            self.blocks[first_row // BLOCK_ROWS :][: packed.shape[0]] = packed
        self._torch_copy = None

    def _rows(self, name: str, rows: slice):
        """Where output rows lie in a portable tensor."""
        return rows

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination.update({prefix + name: value for name, value in self.portable().items()})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        spec = self._portable_spec()
        if strict:
            unexpected.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in spec)
        if any(prefix + name not in state_dict for name in spec):
            missing.extend(prefix + name for name in spec if prefix + name not in state_dict)
            return
        for name, (shape, _) in spec.items():
            if tuple(state_dict[prefix + name].shape) != shape:
                errors.append(f"{prefix}{name}: shape {tuple(state_dict[prefix + name].shape)}, expected {shape}")
                return
        with torch.no_grad():
            self._store(0, **{name: state_dict[prefix + name] for name in spec})

    def _kernel_or_none(self, x: torch.Tensor):
        if self.kernel_layout and kernel_can_run(x):
            return compiled_kernels()
        return None

    def _fallback(self, x: torch.Tensor, scheme: str) -> torch.Tensor:
        _warn_fallback(x.device, scheme)
        return F.linear(x, self.dequantized(x.dtype))

    def extra_repr(self) -> str:
        layout = "llama.kernels' blocks" if self.kernel_layout else "portable"
        return f"in_features={self.in_features}, out_features={self.out_features}, {layout}"


class Int8Linear(QuantizedLinear):
    """int8 weights, one scale per output row: w = q * scale (symmetric). Portable: `weight` [out,
    in] int8 and `scales` [out]. Kernel layout, for each 32 output rows: their bf16 scales, then
    the inputs 4 at a time, 16 rows per 64 bytes (byte 4r + t holds q[r][k + t] + 128), inputs
    zero-padded to whole groups of 64."""

    PORTABLE = ("weight", "scales")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dtype: torch.dtype = torch.bfloat16,
        kernel_layout: bool | None = None,
    ):
        self.padded_in = -(-in_features // INT8_GROUP) * INT8_GROUP
        super().__init__(in_features, out_features, kernel_layout, dtype)

    def _block_shape(self):
        return (BLOCK_ROWS * 2 + BLOCK_ROWS * self.padded_in,)

    def _portable_spec(self):
        return {
            "weight": ((self.out_features, self.in_features), torch.int8),
            "scales": ((self.out_features,), self.scale_dtype),
        }

    def _pack(self, weight, scales):
        n_blocks = weight.shape[0] // BLOCK_ROWS
        u = F.pad(weight.view(torch.uint8) ^ 128, (0, self.padded_in - self.in_features))  # q + 128
        # 4 inputs of a row are one int32: the layout is a permutation of those
        u = u.view(torch.int32).reshape(n_blocks, BLOCK_ROWS // 16, 16, -1).permute(0, 3, 1, 2).contiguous()
        return torch.cat(
            [scales.bfloat16().reshape(n_blocks, BLOCK_ROWS).view(torch.uint8), u.view(torch.uint8).flatten(1)], dim=1
        )

    def _unpack(self):
        n_blocks = self.blocks.shape[0]
        scales = self.blocks[:, : BLOCK_ROWS * 2].contiguous().view(torch.bfloat16).flatten()
        u = self.blocks[:, BLOCK_ROWS * 2 :].contiguous().view(torch.int32).reshape(n_blocks, -1, BLOCK_ROWS // 16, 16)
        weight = u.permute(0, 2, 3, 1).contiguous().view(torch.uint8).reshape(n_blocks * BLOCK_ROWS, -1) ^ 128
        return {
            "weight": weight.view(torch.int8)[: self.out_features, : self.in_features],
            "scales": scales[: self.out_features],
        }

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        weight, scales = self.portable().values()
        return weight.to(dtype) * scales.to(dtype)[:, None]

    @torch.no_grad()
    def quantize_(self, w: torch.Tensor) -> "Int8Linear":
        for rows in _row_blocks(w, multiple=BLOCK_ROWS):
            # Round with the scales as stored, so dequantizing is exact to half a step.
            block = w[rows].float()
            scales = (block.abs().amax(dim=1).clamp(min=1e-8) / 127).to(self.scale_dtype)
            self._store(
                rows.start,
                weight=torch.round(block / scales.float()[:, None]).clamp(-127, 127).to(torch.int8),
                scales=scales,
            )
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (kernels := self._kernel_or_none(x)) is not None:  # llama.kernels' VNNI kernel
            return kernels.mm_int8(x.contiguous(), self.blocks, self.out_features)
        flat = x.reshape(-1, self.in_features).contiguous()  # generation projects a strided [B, dim] view
        if x.device.type == "cpu" and self.in_features % 16 == 0:  # torch's kernel gives NaN for other widths
            weight, scales = self._torch_copy or self.portable().values()
            if self.kernel_layout:  # float32 input, or autograd, on the kernel layout: a second copy, kept
                self._torch_copy = weight, scales
            out = torch.ops.aten._weight_int8pack_mm(flat, weight, scales.to(x.dtype))
        else:
            out = self._fallback(flat, "int8")
        return out.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(QuantizedLinear):
    """int4 weights in groups of group_size inputs: w = (q - 8) * scale + zero, q in 0..15.
    Portable: nibbles `weight` [out, in/2] (q[2j] high, q[2j + 1] low) and `scales_and_zeros`
    [in/group_size, out, 2], torch's layout. Kernel layout, for each 32 output rows and each group:
    the rows' (scale, zero) bf16 pairs, then the group's nibbles 8 inputs at a time, 16 rows per 64
    bytes (byte 4r + t: q[r][k + t] low, q[r][k + 4 + t] high)."""

    PORTABLE = ("weight", "scales_and_zeros")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int = 64,
        dtype: torch.dtype = torch.bfloat16,
        kernel_layout: bool | None = None,
    ):
        if in_features % group_size:
            fits = [g for g in GROUP_SIZES if in_features % g == 0]
            fix = (
                f"make_quantized(model, 'int4', group_size={fits[-1]}) and save_quantized, then build that folder; "
                "or int8"
                if fits
                else "int8"
            )
            raise ValueError(f"int4 group_size={group_size} does not divide in_features={in_features}: use {fix}")
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size={group_size}: use one of {', '.join(map(str, GROUP_SIZES))}")
        self.group_size = group_size
        super().__init__(in_features, out_features, kernel_layout, dtype)

    def _block_shape(self):
        return self.in_features // self.group_size, BLOCK_ROWS * (4 + self.group_size // 2)

    def _portable_spec(self):
        groups = self.in_features // self.group_size
        return {
            "weight": ((self.out_features, self.in_features // 2), torch.uint8),
            "scales_and_zeros": ((groups, self.out_features, 2), self.scale_dtype),
        }

    def _rows(self, name, rows):
        return (slice(None), rows) if name == "scales_and_zeros" else rows

    def _pack(self, weight, scales_and_zeros):
        n_blocks, groups = weight.shape[0] // BLOCK_ROWS, self.in_features // self.group_size
        q = torch.stack([weight >> 4, weight & 15], dim=-1).reshape(weight.shape[0], -1, 2, 4)  # [rows, in / 8, 2, 4]
        # a row's 8 inputs are one int32 (nibbles k + t low, k + 4 + t high): the layout permutes those
        lanes = (q[:, :, 0] | q[:, :, 1] << 4).view(torch.int32).reshape(n_blocks, BLOCK_ROWS // 16, 16, groups, -1)
        nibbles = lanes.permute(0, 3, 4, 1, 2).contiguous().view(torch.uint8).reshape(n_blocks, groups, -1)
        pairs = scales_and_zeros.bfloat16().reshape(groups, n_blocks, -1).transpose(0, 1).contiguous().view(torch.uint8)
        return torch.cat([pairs, nibbles], dim=-1)

    def _unpack(self):
        n_blocks, groups = self.blocks.shape[:2]
        pairs = self.blocks[..., : BLOCK_ROWS * 4].contiguous().view(torch.bfloat16)  # [blocks, groups, 32 * 2]
        pairs = pairs.transpose(0, 1).reshape(groups, -1, 2)[:, : self.out_features]
        lanes = self.blocks[..., BLOCK_ROWS * 4 :].contiguous().view(torch.int32)
        lanes = lanes.reshape(n_blocks, groups, -1, BLOCK_ROWS // 16, 16).permute(0, 3, 4, 1, 2).contiguous()
        nibbles = lanes.view(torch.uint8).reshape(n_blocks * BLOCK_ROWS, -1, 1, 4)  # [rows, in / 8, 1, 4]
        q = torch.cat([nibbles & 15, nibbles >> 4], dim=2).reshape(n_blocks * BLOCK_ROWS, -1)[: self.out_features]
        return {"weight": q[:, ::2] << 4 | q[:, 1::2], "scales_and_zeros": pairs}

    def unpacked(self) -> torch.Tensor:
        """q as int32 [out, in], values 0..15."""
        weight = self.portable()["weight"]
        return torch.stack([weight >> 4, weight & 15], dim=-1).reshape(self.out_features, -1).int()

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        scales, zeros = self.portable()["scales_and_zeros"].float().unbind(-1)  # [in / group_size, out]
        expand = lambda t: t.transpose(0, 1).repeat_interleave(self.group_size, dim=1)  # noqa: E731
        return ((self.unpacked() - 8) * expand(scales) + expand(zeros)).to(dtype)

    @torch.no_grad()
    def quantize_(self, w: torch.Tensor) -> "Int4Linear":
        for rows in _row_blocks(w, multiple=BLOCK_ROWS):
            groups = w[rows].float().reshape(-1, self.in_features // self.group_size, self.group_size)
            lo, hi = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
            # round with the scale and zero as stored
            scales = ((hi - lo).clamp(min=1e-8) / 15).to(self.scale_dtype).float()
            zeros = (lo + 8 * scales).to(self.scale_dtype).float()
            q = torch.round((groups - zeros) / scales + 8).clamp(0, 15).to(torch.uint8).flatten(1)
            pairs = torch.stack([scales, zeros], dim=-1).squeeze(2).transpose(0, 1)
            self._store(rows.start, weight=q[:, ::2] << 4 | q[:, 1::2], scales_and_zeros=pairs)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (kernels := self._kernel_or_none(x)) is not None:  # llama.kernels' VNNI kernel
            return kernels.mm_int4(x.contiguous(), self.blocks, self.out_features, self.group_size)
        flat = x.reshape(-1, self.in_features).contiguous()  # torch's int4 kernels refuse strided rows
        if x.device.type == "cpu" and self.out_features % 16 == 0:
            packed, pairs = self._repacked(x.device)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, pairs.to(x.dtype))
        elif (tiles := self._cuda_tiles(x)) is not None:
            # torch's CUDA kernel (tinygemm) computes in bf16: a float16 model's rows are rounded to
            # bf16 for it, an error far below int4's own
            packed, pairs = self._repacked(x.device, tiles)
            out = torch.ops.aten._weight_int4pack_mm(flat.bfloat16(), packed, self.group_size, pairs).to(x.dtype)
        else:
            out = self._fallback(flat, "int4")
        return out.reshape(*x.shape[:-1], self.out_features)

    def _cuda_tiles(self, x: torch.Tensor) -> int | None:
        """The inner k tiles torch's CUDA int4 kernel takes for this layer's shape (in_features a
        multiple of 16 of them, out_features of 8), on an NVIDIA GPU of compute capability 8.0 or
        more (Ampere on), which it is built for; None where it does not run."""
        if x.device.type != "cuda" or torch.version.cuda is None or self.out_features % 8:
            return None
        if torch.cuda.get_device_capability(x.device) < (8, 0):
            return None
        return next((t for t in (8, 4, 2) if self.in_features % (16 * t) == 0), None)

    def _repacked(self, device: torch.device, tiles: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights in the layout of torch's int4 kernel for `device` (tiles: CUDA's), and their
        scale and zero pairs: a second copy of the weights, made on first use on that device."""
        if self._torch_copy is None or self._torch_copy[0].device != device:
            pairs = self.portable()["scales_and_zeros"]
            if device.type == "cpu":
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.unpacked(), 1)
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack(self.portable()["weight"].contiguous(), tiles)
                pairs = pairs.bfloat16()
            self._torch_copy = packed, pairs.contiguous()
        return self._torch_copy

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"
