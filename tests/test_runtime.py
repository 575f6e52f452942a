"""Device and dtype resolution, and the memory check that refuses before allocating."""

import pytest
import torch
from conftest import GQA

from llama import LLaMa
from llama.runtime import GiB, check_fits, resolve_device, resolve_dtype


def test_defaults_pick_cuda_fp16_else_cpu_bf16():
    device = resolve_device(None)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype(None, torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("bf16", torch.bfloat16),
        ("float32", torch.float32),
        ("torch.float16", torch.float16),
        (torch.float32, torch.float32),
    ],
)
def test_dtype_names_and_objects(name, dtype):
    assert resolve_dtype(name, torch.device("cpu")) is dtype


def test_unknown_device_and_dtype_are_clear_errors():
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="unsupported dtype torch.int8"):
        resolve_dtype(torch.int8, torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_a_cache_that_cannot_fit_is_refused_with_the_arithmetic(make_ckpt):
    folder, _ = make_ckpt(GQA, 1)
    # 2 layers x 2 (k, v) x 4 rows x 2 kv-heads x 16 dims x 2 bytes = 1 KiB per position.
    with pytest.raises(
        ValueError, match=r"KV cache \(max_batch_size=4 x max_seq_len=1000000000\) 953.67 GiB.*Lower max_seq_len"
    ):
        LLaMa.build(folder, max_seq_len=10**9, max_batch_size=4)
    with pytest.raises(ValueError, match="max_seq_len=0: use a whole number, at least 1"):
        LLaMa.build(folder, max_seq_len=0)


def test_check_fits_passes_what_fits_and_says_how_many_devices_would_hold_the_rest(monkeypatch):
    check_fits(1 << 20, 1 << 20, torch.device("cpu"), "small")
    with pytest.raises(ValueError, match="weights need 4096.00 GiB"):
        check_fits(1 << 42, 0, torch.device("cpu"), "none")
    monkeypatch.setattr("llama.runtime.available_memory", lambda device: 10 * GiB)
    with pytest.raises(ValueError, match="split the model over 3 or more such devices .torchrun --nproc_per_node N"):
        check_fits(25 * GiB, 2 * GiB, torch.device("cpu"), "some")
    with pytest.raises(
        ValueError, match=r"weights need at least 12.00 GiB \(4 bits each\) and the KV cache .* 5.0 MiB"
    ):
        check_fits(12 * GiB, 5 << 20, torch.device("cpu"), "some", least=True)


def test_kv_cache_is_allocated_once_in_model_dtype(make_ckpt):
    folder, _ = make_ckpt(GQA, 1)
    llm = LLaMa.build(folder, max_seq_len=32, max_batch_size=3, dtype="bf16")
    cache = llm.model.layers[1].attention.cache_k
    assert cache.shape == (3, 2, 32, 16) and cache.dtype == torch.bfloat16
    ptr = cache.data_ptr()
    llm.generate([[1, 2, 3]], 5, temperature=0)
    assert llm.model.layers[1].attention.cache_k.data_ptr() == ptr
