"""The compiled CPU kernels, csrc/cpu_bf16.cpp, as torch.ops.llama_cpu: built once per machine and
torch version where the CPU has AVX-512 BF16 and VNNI, cached under ~/.cache/llama-reference, and
loaded with torch.ops.load_library. llama.cpu and llama.quantized_linear call them.

Not torch.utils.cpp_extension.load: that needs ninja (not a dependency here), compiles a Python
extension against pybind11's headers, and serialises builds with a lock file that a process killed
mid-build leaves behind for every later process to wait on. These are plain torch ops
(TORCH_LIBRARY), so one compiler call against torch's headers and libraries builds them, and the
library is moved into place atomically, so processes building at once never load half a file.
"""

import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_bf16.cpp"
FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp"]
FLAGS += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni"]
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"}  # /proc/cpuinfo's names


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":")[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:  # not Linux: the kernels are not offered
        return set()


def _build(target: Path) -> None:
    """Compile SOURCE against this torch into target (atomically: other processes may race)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        includes = [f"-I{p}" for p in include_paths()]
        libraries = [f"-L{p}" for p in library_paths()] + ["-lc10", "-ltorch_cpu"]
        subprocess.run(
            ["c++", *FLAGS, *includes, str(SOURCE), "-o", str(out), *libraries],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(out, target)


@functools.cache
def compiled_kernels():
    """torch.ops.llama_cpu, built on first use; None (logged once) on a CPU without AVX-512 BF16 /
    VNNI or where no C++ compiler works."""
    missing = CPU_FLAGS - _cpu_flags()
    if missing:
        logger.info(
            "no AVX-512 BF16 kernels on this CPU (lacks %s): PyTorch's operators run", ", ".join(sorted(missing))
        )
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + torch.__version__.encode()).hexdigest()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama-reference"
    target = cache / f"cpu_bf16-{key[:16]}.so"
    try:
        if not target.exists():
            logger.info("compiling %s into %s (once per machine)", SOURCE.name, target)
            _build(target)
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:  # no compiler; a library torch refuses
        detail = e.stderr[-2000:] if isinstance(e, subprocess.CalledProcessError) else e
        logger.warning("could not build %s (%s): PyTorch's slower operators run instead", SOURCE, detail)
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
    fake("llama_cpu::attend_one_bf16")(lambda q, keys, values, lengths=None: q.new_empty(q.shape))


def kernel_can_run(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """bf16 inputs on the CPU (a built model may be moved), and nothing autograd would need a
    backward for (the kernels have none), so gradients through a built model still work."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return False
    return not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params))
