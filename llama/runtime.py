"""Where and how a run happens: device and dtype from what the user wrote, the memory check that
refuses a model or KV cache that will not fit before anything is allocated, and giving back the
pages of weights read from mmap'd files once they have been copied, packed or quantized.
"""

import ctypes
import mmap
import os

import torch

DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
GiB = 1 << 30


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None means CUDA when present, else CPU; MPS only when asked for."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available: use device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but MPS is not available: use device='cpu'")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {str(device)!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None means float16 on a GPU and bfloat16 on the CPU; names like 'bf16' are accepted."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cpu" else torch.float16
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}: use float16, bfloat16 or float32")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor's copy on `device` that does not make the host wait for the device's queued work:
    on CUDA staged in pinned memory and copied asynchronously (a copy from pageable memory synchronises)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`, or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(weight_bytes: int, cache_bytes: int, device: torch.device, cache_args: str, least: bool = False) -> None:
    """Refuse, with the arithmetic, a run whose weights and KV cache exceed the free memory (least:
    weight_bytes is a lower bound, 4 bits a weight, checked before the dtype and quantization count)."""
    free = available_memory(device)
    if free is None or weight_bytes + cache_bytes <= free:
        return
    devices = -(-(weight_bytes + cache_bytes) // max(free, 1))  # each holding 1/n of both
    weights = f"at least {size(weight_bytes)} (4 bits each)" if least else size(weight_bytes)
    raise ValueError(
        f"not enough memory on {device}: the weights need {weights} and the KV cache "
        f"({cache_args}) {size(cache_bytes)}, but {size(free)} is free. Lower max_seq_len "
        "or max_batch_size (the cache grows with both), choose a smaller dtype or a device with more memory, "
        f"or split the model over {devices} or more such devices (torchrun --nproc_per_node N: README, "
        "More than one device)"
    )


def size(nbytes: int) -> str:
    """Bytes in GiB, or in MiB below a tenth of one."""
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB // 10 else f"{nbytes / (1 << 20):.1f} MiB"


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed memory mappings (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):  # a path: mapped from a file
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return spans


def release_mapped(tensors: list[torch.Tensor], spans: list[tuple[int, int]] | None = None) -> None:
    """Give back the resident pages of weights read from an mmap'd shard once they have been
    consumed (copied, packed or quantized into new memory), so a transform while loading peaks near
    the size of its result, not the file plus the result. Only whole pages inside file-backed
    mappings are dropped: the file still holds their bytes, and anonymous memory is never touched.
    spans: file_mappings() read once for many calls (reading /proc/self/maps is the costly part), at a
    time the tensors existed."""
    spans = file_mappings() if spans is None else spans
    if not spans:
        return
    madvise = ctypes.CDLL(None).madvise
    page = mmap.PAGESIZE
    for t in tensors:
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        lo, hi = -(-lo // page) * page, hi // page * page
        if hi > lo and any(s <= lo and hi <= e for s, e in spans):
            madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)
