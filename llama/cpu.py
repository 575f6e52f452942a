"""How a loaded Transformer runs on the CPU, chosen from outside the model (as llama.quantize is):
use_cpu_modules swaps classes, and Meta's names, weights and state_dict() stay. PyTorch sends every
bf16 matmul to oneDNN, whose matrix-vector product (a decode step) reads weights well below the
memory's speed (bench/kernels.py measures it), and a decode step's small operators cost more than
their arithmetic; llama.kernels' compiled ops do that work in one call each:

- GroupedQueryAttention (every dtype): a GQA decode step's attention as one product per kv head.
- GemvLinear (bf16, the build default): inputs of up to GEMV_ROWS rows go to the compiled GEMV;
  where it cannot build, one-row inputs go to ATen's GEMV (F.linear's numbers, oneDNN switched off
  around the call). More rows go to oneDNN, at a few rounded row counts (onednn_rows).
- KernelRMSNorm and KernelAttention (bf16): RMSNorm, RoPE and a decode step's attention in the kernels.
- PackedLinear (bf16, pack=True): the weight reordered once into oneDNN's blocked layout, the
  fastest for prompts and batched decoding but slower at batch 1.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from llama.kernels import compiled_kernels, kernel_can_run
from llama.model import Attention, RMSNorm, Transformer
from llama.runtime import file_mappings, release_mapped

# Up to this many rows (a decode step's batch) the compiled GEMV reads each weight once and uses it
# for every row while it is in the L1 cache, each row's sums in the same order whatever the batch
# (so a row's numbers are its own, alone or batched); longer inputs (prompts) go to oneDNN's GEMM.
GEMV_ROWS = 32


def onednn_bf16() -> bool:
    """Whether this CPU's oneDNN has bf16 kernels (AVX-512 BF16 / AMX): packing needs them."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def aten_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with oneDNN switched off for the call: for one bf16 row, ATen's own GEMV."""
    if not torch.backends.mkldnn.enabled:
        return F.linear(x, weight, bias)
    torch.backends.mkldnn.enabled = False
    try:
        return F.linear(x, weight, bias)
    finally:
        torch.backends.mkldnn.enabled = True


def onednn_rows(rows: int) -> int:
    """The rows a oneDNN GEMM runs for `rows` input rows: rounded up to one of 8 sizes per power of
    two, at most 1/8 more. oneDNN builds and keeps a kernel, megabytes, for every row count it sees,
    so prompts of every length grew a batch run's memory without bound (2.8 MB per prompt length on
    the built-in model); rounded, a few dozen sizes cover lengths up to 8192."""
    step = 1 << max(0, rows.bit_length() - 4)
    return -(-rows // step) * step


def rounded_rows(linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x) computed over onednn_rows of x's rows, the added rows zeros and their outputs
    dropped (the others' sums are those of x alone: oneDNN's rows do not mix)."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    padded = onednn_rows(rows)
    if padded == rows:
        return linear(x)
    out = linear(F.pad(flat, (0, 0, 0, padded - rows)))[:rows]
    return out.reshape(*x.shape[:-1], out.shape[-1])


class GemvLinear(nn.Linear):
    """nn.Linear whose calls with few rows run in a matrix-vector kernel instead of oneDNN's GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        kernels = compiled_kernels() if 0 < rows <= GEMV_ROWS and self.bias is None else None
        if kernels is not None and kernel_can_run(x, self.weight):
            return kernels.gemv_bf16(x.contiguous(), self.weight)
        if rows == 1:
            return aten_linear(x, self.weight, self.bias)
        return rounded_rows(lambda t: F.linear(t, self.weight, self.bias), x)


class PackedLinear(nn.Module):
    """A bias-free linear layer holding only its oneDNN-packed weight."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())

    @property
    def weight(self) -> torch.Tensor:
        """Meta's [out, in] matrix, unpacked (a copy: for reading, not for every step)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rounded_rows(lambda t: torch.ops.mkldnn._linear_pointwise(t, self.packed, None, "none", [], ""), x)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "weight"
        if key not in state_dict:
            missing.append(key)
        elif state_dict[key].shape != (self.out_features, self.in_features):
            expected = (self.out_features, self.in_features)
            errors.append(f"{key}: shape {tuple(state_dict[key].shape)}, expected {expected}")
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(state_dict[key].to(torch.bfloat16).detach())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


class KernelRMSNorm(RMSNorm):
    """RMSNorm in one kernel call for bf16 (Meta's float32 normalisation and roundings)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != torch.bfloat16 or not kernel_can_run(x, self.weight):
            return super().forward(x)
        return torch.ops.llama_cpu.rms_norm_bf16(x.contiguous(), self.weight, self.eps)


class GroupedQueryAttention(Attention):
    """Attention whose GQA decode step is one float32 product per kv head, its n_heads / n_kv_heads
    query heads the rows (as Attention.attend groups them): float32 as SDPA accumulates, and a bf16
    matmul would build a oneDNN kernel, and keep it, for every cache length."""

    def attend(self, xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None):
        if xq.shape[2] != 1 or mask is not None or self.n_kv_heads == self.n_heads:
            return super().attend(xq, keys, values, mask)
        bsz = xq.shape[0]
        q = xq.float().reshape(bsz, self.n_kv_heads, -1, self.head_dim)  # [B, Hkv, H / Hkv, D]
        scores = torch.matmul(q, keys.float().transpose(2, 3)) / math.sqrt(self.head_dim)
        output = torch.matmul(F.softmax(scores, dim=-1), values.float())
        return output.type_as(xq).view(bsz, self.n_heads, 1, self.head_dim)

    def attend_rows(self, xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor):
        """Each row alone, through attend: the numbers of its own decode step, not a masked batch's."""
        rows = [
            self.attend(xq[b : b + 1], keys[b : b + 1, :, :n], values[b : b + 1, :, :n], None)
            for b, n in enumerate(lengths.tolist())
        ]
        return torch.cat(rows)


class KernelAttention(GroupedQueryAttention):
    """Attention whose bf16 RoPE, and the attention of a decode step, run in one kernel call each."""

    def rotate(self, xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not kernel_can_run(xq, xk):
            return super().rotate(xq, xk, freqs_cis)
        return torch.ops.llama_cpu.rope_bf16(xq.contiguous(), xk.contiguous(), torch.view_as_real(freqs_cis))

    def attend(self, xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None):
        if xq.shape[2] != 1 or mask is not None or not self._kernel_takes(xq, keys, values):
            return super().attend(xq, keys, values, mask)
        return torch.ops.llama_cpu.attend_one_bf16(xq, keys, values)

    def attend_rows(self, xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor):
        if not self._kernel_takes(xq, keys, values):
            return super().attend_rows(xq, keys, values, lengths)
        return torch.ops.llama_cpu.attend_one_bf16(xq, keys, values, lengths)  # the same numbers, in one call

    def _kernel_takes(self, *tensors: torch.Tensor) -> bool:
        """The kernel takes head sizes that are multiples of 16 up to 128, bf16 on a CPU where it built."""
        return self.head_dim % 16 == 0 and self.head_dim <= 128 and kernel_can_run(*tensors)


def use_cpu_modules(model: Transformer, pack: bool = False) -> None:
    """How LLaMa.build runs a model on the CPU: its attention GroupedQueryAttention; in bf16 also its
    linears GemvLinear (PackedLinear with pack=True), and its norms, RoPE and attention on the
    compiled kernels where they build."""
    use_grouped_attention(model)
    if model.tok_embeddings.weight.dtype == torch.bfloat16:
        pack_linears(model) if pack else use_gemv_linears(model)
        use_kernel_norms_and_attention(model)


def use_grouped_attention(model: nn.Module) -> int:
    """Make every Attention a GroupedQueryAttention (no state is added: only the class changes)."""
    attentions = [m for m in model.modules() if type(m) is Attention]
    for module in attentions:
        module.__class__ = GroupedQueryAttention
    return len(attentions)


def use_gemv_linears(model: nn.Module) -> int:
    """Make every bf16 nn.Linear a GemvLinear, sharing its weight. Returns how many."""
    sites = _bf16_linears(model)
    compiled_kernels()  # built now, not in the first decode step
    for parent, name in sites:
        old = getattr(parent, name)
        setattr(parent, name, linear_around(old.weight, GemvLinear, old.bias))
    return len(sites)


def pack_linears(model: nn.Module) -> int:
    """Replace every bf16 nn.Linear (bias-free) with a PackedLinear, in place, one at a time: each
    dense weight is let go (and its pages, when it lies in an mmap'd shard) as its packed copy is
    made, so the peak is the model plus one matrix. Returns how many were packed."""
    sites, spans = [(p, n) for p, n in _bf16_linears(model) if getattr(p, n).bias is None], file_mappings()
    for parent, name in sites:
        weight = getattr(parent, name).weight
        setattr(parent, name, PackedLinear(weight))
        release_mapped([weight], spans)
    return len(sites)


def use_kernel_norms_and_attention(model: nn.Module) -> int:
    """Make every RMSNorm a KernelRMSNorm and every Attention a KernelAttention (they add no state:
    only the class changes). Returns how many modules, 0 where the kernels cannot build."""
    if compiled_kernels() is None:
        return 0
    count = 0
    for module in model.modules():
        for bases, kernel in (((RMSNorm,), KernelRMSNorm), ((Attention, GroupedQueryAttention), KernelAttention)):
            if type(module) in bases:
                module.__class__ = kernel
                count += 1
    return count


def plain_modules(model: nn.Module) -> int:
    """Undo the compiled kernels and oneDNN's packing: nn.Linear, RMSNorm, and GroupedQueryAttention
    for a KernelAttention, on the same weights (packed ones unpacked), to compare against PyTorch's
    own operators (quantized layers are left as they are). Returns how many modules changed."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (GemvLinear, PackedLinear)):
                setattr(module, name, linear_around(child.weight))
                count += 1
        for kernel, plain in ((KernelRMSNorm, RMSNorm), (KernelAttention, GroupedQueryAttention)):
            if type(module) is kernel:
                module.__class__ = plain
                count += 1
    return count


def linear_around(weight: torch.Tensor, cls: type[nn.Linear] = nn.Linear, bias: torch.Tensor | None = None):
    """A linear layer of class cls whose weight (and bias) are the tensors given, not copies."""
    module = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    module.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    module.bias = bias
    return module


def _bf16_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    # (parent, name) pairs only: a list holding the nn.Linear modules would keep every old weight alive
    return [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) in (nn.Linear, GemvLinear) and child.weight.dtype == torch.bfloat16
    ]


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take, packed ones included (state_dict() would unpack them)."""
    total = 0
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if isinstance(module, PackedLinear):
            tensors.append(module.packed)
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total
