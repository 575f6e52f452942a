"""How a loaded Transformer's bf16 linear layers run on the CPU, chosen from outside the model (as
llama.quantize is). PyTorch sends every bf16 matmul to oneDNN, whose batch-1 matrix-vector product
streams weights at ~0.6x the speed of ATen's own (bench/kernels.py), while oneDNN is the faster one
for many rows. Two choices, both giving F.linear's numbers and Meta's `weight` / state dict:

- GemvLinear (the build default): an nn.Linear that sends one-row inputs (a batch-1 decode step)
  to ATen's kernel by turning oneDNN off around that call (a process-wide switch, restored after;
  another thread's matmuls meanwhile only run slower), and everything else to oneDNN.
- PackedLinear (pack=True): the weight reordered once into oneDNN's blocked layout, which is the
  fastest for prompts and batched decoding (~1.5x at batch 8) but slower at batch 1.
"""

import torch
import torch.nn.functional as F
from torch import nn

from llama.checkpoint import file_mappings, release_mapped


def onednn_bf16() -> bool:
    """Whether this CPU's oneDNN has bf16 kernels (AVX-512 BF16 / AMX): packing needs them."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class GemvLinear(nn.Linear):
    """nn.Linear whose one-row calls run in ATen's bf16 GEMV instead of oneDNN's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1] or not torch.backends.mkldnn.enabled:
            return F.linear(x, self.weight, self.bias)
        torch.backends.mkldnn.enabled = False
        try:
            return F.linear(x, self.weight, self.bias)
        finally:
            torch.backends.mkldnn.enabled = True


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
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

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


def _bf16_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    # (parent, name) pairs only: a list holding the nn.Linear modules would keep every old weight alive
    return [(parent, name) for parent in model.modules() for name, child in parent.named_children()
            if type(child) in (nn.Linear, GemvLinear) and child.weight.dtype == torch.bfloat16]  # fmt: skip


def linear_around(weight: torch.Tensor, cls: type[nn.Linear] = nn.Linear, bias: torch.Tensor | None = None):
    """A linear layer of class cls whose weight (and bias) are the tensors given, not copies."""
    module = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    module.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    module.bias = bias
    return module


def route_rows(model: nn.Module) -> int:
    """Make every bf16 nn.Linear a GemvLinear, sharing its weight. Returns how many."""
    sites = _bf16_linears(model)
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


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take, packed ones included (state_dict() would unpack them)."""
    total = 0
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if isinstance(module, PackedLinear):
            tensors.append(module.packed)
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total
