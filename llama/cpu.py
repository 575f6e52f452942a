"""How a loaded Transformer runs in bf16 on the CPU, chosen from outside the model (as
llama.quantize is). PyTorch sends every bf16 matmul to oneDNN, whose matrix-vector product (a
decode step) streams weights well below the memory's read speed (bench/kernels.py), and a decode
step's small operators cost more than their arithmetic. csrc/cpu_bf16.cpp, compiled here once per
machine with AVX-512 BF16, does that work in one call each; Meta's modules, names and state stay:

- GemvLinear (the build default): an nn.Linear sending inputs of up to GEMV_ROWS rows to the
  compiled GEMV; where it cannot build, one-row inputs go to ATen's GEMV (F.linear's numbers,
  oneDNN switched off around the call). More rows go to oneDNN.
- KernelRMSNorm and KernelAttention (fuse_small_ops): RMSNorm, RoPE and a decode step's attention.
- PackedLinear (pack=True): the weight reordered once into oneDNN's blocked layout, which is the
  fastest for prompts and batched decoding (~1.5x at batch 8) but slower at batch 1.
"""

import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llama.checkpoint import file_mappings, release_mapped
from llama.model import Attention, RMSNorm

logger = logging.getLogger(__name__)

# Up to this many rows the kernel beats oneDNN's GEMM on plain weights; at 8 its dot-product
# instructions are the limit (1.1B step's linears, measured once: 4 rows 99 ms vs oneDNN's 113,
# 8 rows 157 vs 138, oneDNN packed 88).
GEMV_ROWS = 4
_SOURCE = Path(__file__).with_name("csrc") / "cpu_bf16.cpp"
_FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
          "-mavx512vnni"]  # fmt: skip
_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"}


def onednn_bf16() -> bool:
    """Whether this CPU's oneDNN has bf16 kernels (AVX-512 BF16 / AMX): packing needs them."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":")[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:  # not Linux: the kernel is not offered
        return set()


def _build(target: Path) -> None:
    """Compile the kernel against this torch into target (atomically: other processes may race)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = ["c++", *_FLAGS, *(f"-I{p}" for p in include_paths()), str(_SOURCE), "-o", str(out),
               *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu"]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(out, target)


@functools.cache
def compiled_kernels():
    """torch.ops.llama_cpu (csrc/cpu_bf16.cpp's ops), built on first use and cached under
    ~/.cache/llama-reference; None (logged once) on a CPU without AVX-512 BF16 / VNNI or where no
    C++ compiler works."""
    missing = _CPU_FLAGS - _cpu_flags()
    if missing:
        logger.info("no AVX-512 BF16 kernel on this CPU (lacks %s): batch-1 steps use ATen's", ", ".join(sorted(missing)))
        return None
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode() + torch.__version__.encode()).hexdigest()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama-reference"
    target = cache / f"cpu_bf16-{key[:16]}.so"
    try:
        if not target.exists():
            logger.info("compiling %s into %s (once per machine)", _SOURCE.name, target)
            _build(target)
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:  # no compiler; a library torch refuses
        detail = e.stderr[-2000:] if isinstance(e, subprocess.CalledProcessError) else e
        logger.warning("could not build %s (%s): batch-1 steps use ATen's slower kernel", _SOURCE, detail)
        return None
    _register_fakes()
    return torch.ops.llama_cpu


def _register_fakes() -> None:
    """Output shapes of the ops without running them, so torch.compile can trace a model using them."""
    fake = torch.library.register_fake
    fake("llama_cpu::gemv_bf16")(lambda x, w: x.new_empty(*x.shape[:-1], w.shape[0]))
    fake("llama_cpu::mm_int8")(lambda x, w, out_features: x.new_empty(*x.shape[:-1], out_features))
    fake("llama_cpu::mm_int4")(lambda x, w, out_features, group_size: x.new_empty(*x.shape[:-1], out_features))
    fake("llama_cpu::rms_norm_bf16")(lambda x, w, eps: torch.empty_like(x))
    fake("llama_cpu::rope_bf16")(lambda q, k, freqs: (torch.empty_like(q), torch.empty_like(k)))
    fake("llama_cpu::attend_one_bf16")(lambda q, keys, values: q.new_empty(q.shape))


def kernel_can_run(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """bf16 inputs on the CPU (a built model may be moved), and nothing autograd would need a
    backward for (the kernels have none), so gradients through a built model still work."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return False
    return not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params))


def aten_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with oneDNN switched off for the call: for one bf16 row, ATen's own GEMV."""
    if not torch.backends.mkldnn.enabled:
        return F.linear(x, weight, bias)
    torch.backends.mkldnn.enabled = False
    try:
        return F.linear(x, weight, bias)
    finally:
        torch.backends.mkldnn.enabled = True


class GemvLinear(nn.Linear):
    """nn.Linear whose calls with few rows run in a matrix-vector kernel instead of oneDNN's GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if 0 < rows <= GEMV_ROWS and self.bias is None and kernel_can_run(x, self.weight):
            if (kernels := compiled_kernels()) is not None:
                return kernels.gemv_bf16(x.contiguous(), self.weight)
        return aten_linear(x, self.weight, self.bias) if rows == 1 else F.linear(x, self.weight, self.bias)


class KernelRMSNorm(RMSNorm):
    """RMSNorm in one kernel call for bf16 (Meta's float32 normalisation and roundings)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != torch.bfloat16 or not kernel_can_run(x, self.weight):
            return super().forward(x)
        return torch.ops.llama_cpu.rms_norm_bf16(x.contiguous(), self.weight, self.eps)


class KernelAttention(Attention):
    """Attention whose bf16 RoPE, and the attention of a decode step, run in one kernel call each."""

    def rotate(self, xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not kernel_can_run(xq, xk):
            return super().rotate(xq, xk, freqs_cis)
        return torch.ops.llama_cpu.rope_bf16(xq.contiguous(), xk.contiguous(), torch.view_as_real(freqs_cis))

    def attend(self, xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None):
        one_query = xq.shape[2] == 1 and mask is None and self.head_dim % 16 == 0 and self.head_dim <= 128
        if not one_query or not kernel_can_run(xq, keys, values):
            return super().attend(xq, keys, values, mask)
        return torch.ops.llama_cpu.attend_one_bf16(xq, keys, values)


def fuse_small_ops(model: nn.Module) -> int:
    """Run every RMSNorm and Attention of a bf16 model with this project's kernels (they add no
    state: only the class changes). Returns how many modules, 0 where the kernels cannot build."""
    if compiled_kernels() is None:
        return 0
    count = 0
    for module in model.modules():
        for base, kernel in ((RMSNorm, KernelRMSNorm), (Attention, KernelAttention)):
            if type(module) is base:
                module.__class__ = kernel
                count += 1
    return count


def plain_modules(model: nn.Module) -> int:
    """Undo route_rows, fuse_small_ops and pack_linears: Meta's nn.Linear, RMSNorm and Attention
    everywhere, on the same weights (packed ones unpacked), to compare against PyTorch's own
    operators. Returns how many modules changed."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (GemvLinear, PackedLinear)):
                setattr(module, name, linear_around(child.weight))
                count += 1
        for base in (RMSNorm, Attention):
            if isinstance(module, base) and type(module) is not base:
                module.__class__ = base
                count += 1
    return count


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
    compiled_kernels()  # built now, not in the first decode step
    for parent, name in sites:
        old = getattr(parent, name)
        setattr(parent, name, linear_around(old.weight, GemvLinear, old.bias))
    return len(sites)


def use_kernels(model: nn.Module, pack: bool = False) -> None:
    """How a bf16 model runs on the CPU: its linears routed (GemvLinear) or packed (PackedLinear),
    then its norms and attention on the compiled kernels where they build."""
    pack_linears(model) if pack else route_rows(model)
    fuse_small_ops(model)


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
