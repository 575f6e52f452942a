"""oneDNN-packed linear layers for bf16 inference on the CPU, applied to a loaded Transformer from
outside (as llama.quantize is). Each weight is reordered once into the blocked layout oneDNN's
bf16 matmul reads fastest; the products are the same numbers F.linear gives, but a batch-1 decode
step streams the weights about twice as fast on an AVX-512 CPU (bench/speed.py, "ours" rows).

The modules keep Meta's names: `weight` and the state dict give the [out, in] matrix back.
"""

import torch
from torch import nn

from llama.checkpoint import release_mapped


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True where packing pays and runs: bf16 on a CPU whose oneDNN has bf16 kernels."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class PackedLinear(nn.Module):
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
            errors.append(f"{key}: shape {tuple(state_dict[key].shape)}, expected {(self.out_features, self.in_features)}")
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(state_dict[key].to(torch.bfloat16).detach())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


def pack_linears(model: nn.Module) -> int:
    """Replace every bf16 nn.Linear with a PackedLinear, in place, one at a time: each dense weight
    is let go (and its pages, when it lies in an mmap'd shard) as its packed copy is made, so the
    peak is the model plus one matrix. Returns how many were packed."""
    # (parent, name) pairs only: a list holding the nn.Linear modules would keep every dense weight alive
    sites = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear) and child.bias is None and child.weight.dtype == torch.bfloat16]  # fmt: skip
    for parent, name in sites:
        weight = getattr(parent, name).weight
        setattr(parent, name, PackedLinear(weight))
        release_mapped([weight])
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

