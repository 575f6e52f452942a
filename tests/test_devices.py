"""The invariants on every device present, in the dtypes users get there: the CPU in float32 and
bfloat16 (its default), and float16 (CUDA's default but for Llama 3: its roundings checked on every
machine); CUDA in float16 and bfloat16 (Llama 3's default there), MPS in float16. A device this
machine lacks is collected and skipped with the reason. The reference is always float32 on the CPU,
which the other tests hold to Meta's and Hugging Face's numbers within 1e-4. What depends on the
device is here: logits (against transformers too), merged shards, the cache, batching, Meta's
loop and its random draws, greedy ids, streaming, quantized layers, the memory check and the CLI.
Chat layouts, tokenizers and checkpoint parsing run before any tensor reaches a device and are
tested once, on the CPU.

Tolerances outside float32, relative to the largest |logit| (~5 for these models): a float16 value
carries 11 significant bits (a rounding moves it by up to 2^-12 of itself), bfloat16 8 (2^-9). A
logit of these 2-layer models follows about ten roundings in a row (embedding, norms, q k v,
attention, wo, the FFN's three products, residual adds, output), so 10 x 2^-12 ~ 2.5e-3 for
float16 and 10 x 2^-9 ~ 2e-2 for bfloat16, the bounds below (measured on the CPU: 1.2e-3 and 1.0e-2
at most). Greedy ids are compared only where the reference's top two logits are further apart
than twice those bounds (each logit may move by one bound), on the built-in model, which was
trained and so has such steps.
"""

import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import GQA, LLAMA3, MHA
from test_generation import assert_same_as_meta
from test_model import hf_model

from llama import LLaMa
from llama.batching import decode_rows, one_slot
from llama.loading import BUILTIN_MODEL
from llama.quantized_linear import Int4Linear
from llama.runtime import available_memory

PLACES = [
    ("cpu", torch.float32),
    ("cpu", torch.bfloat16),
    ("cpu", torch.float16),
    ("cuda", torch.float16),
    ("cuda", torch.bfloat16),
    ("mps", torch.float16),
]
RELATIVE = {torch.float32: 2e-5, torch.float16: 2.5e-3, torch.bfloat16: 2e-2}


def missing(device: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device here (bench/device_check.py runs these on a GPU machine)"
    if device == "mps" and not torch.backends.mps.is_available():
        return "no Apple MPS device here"
    return None


@pytest.fixture(params=PLACES, ids=[f"{d}-{str(t).removeprefix('torch.')}" for d, t in PLACES])
def place(request) -> tuple[str, torch.dtype]:
    device, dtype = request.param
    if (reason := missing(device)) is not None:
        pytest.skip(reason)
    return device, dtype


@pytest.fixture
def folder(make_ckpt):
    return make_ckpt(GQA, 2)[0]


def build(folder, device, dtype, **kw) -> LLaMa:
    return LLaMa.build(folder, max_seq_len=48, max_batch_size=3, device=device, dtype=dtype, **kw)


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    bound = RELATIVE[dtype] * want.abs().max().item()
    assert (got.float().cpu() - want).abs().max().item() <= bound


X = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 40], [1, 40, 41, 2, 8, 9, 60, 61]])


def test_logits_equal_the_float32_cpu_reference(folder, place):
    device, dtype = place
    reference = build(folder, "cpu", torch.float32).model(X, 0)
    llm = build(folder, device, dtype)
    assert llm.model.tok_embeddings.weight.device.type == device and llm.model.tok_embeddings.weight.dtype == dtype
    logits = llm.model(X.to(device), 0)
    assert logits.dtype == torch.float32 and logits.device.type == device
    close(logits, reference, dtype)


def test_logits_equal_hugging_face_in_float32_on_the_cpu(make_ckpt, place):
    device, dtype = place
    folder, sd = make_ckpt(GQA, 1)
    expected = hf_model(sd, GQA)(input_ids=X).logits.float().detach()
    close(build(folder, device, dtype).model(X.to(device), 0), expected, dtype)


def test_merged_shards_compute_what_one_shard_does(make_ckpt, place):
    device, dtype = place
    (one, _), (two, _) = make_ckpt(GQA, 1, name="one"), make_ckpt(GQA, 2, name="two")
    x = X.to(device)
    assert torch.equal(build(one, device, dtype).model(x, 0), build(two, device, dtype).model(x, 0))


def test_cached_decode_and_chunked_prefill_equal_a_full_forward(folder, place):
    device, dtype = place
    model = build(folder, device, dtype).model
    x = X.to(device)
    full = model(x, 0)
    steps = torch.cat([model(x[:, i : i + 1], i) for i in range(x.shape[1])], dim=1)
    chunks = torch.cat([model(x[:, :3], 0), model(x[:, 3:], 3)], dim=1)
    close(steps, full.cpu(), dtype)
    close(chunks, full.cpu(), dtype)


def clear_cut(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per position, whether the top two logits are further apart than twice the dtype's bound
    (each may move by one bound, so rounding cannot swap them)."""
    top2 = logits.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]) > 2 * RELATIVE[dtype] * logits.abs().max()


def test_greedy_ids_and_streamed_text_where_the_reference_is_clear_cut(place):
    """Teacher-forced on the float32 CPU greedy ids, the device picks the same token wherever that
    choice is clear-cut; its own greedy run may leave the reference's ids only at a step that is
    not; and the streamed text is the completion's text."""
    device, dtype = place
    reference = build(BUILTIN_MODEL, "cpu", torch.float32)
    llm = build(BUILTIN_MODEL, device, dtype)
    prompt = llm.tokenizer.encode("ROMEO:\n", bos=True, eos=False)
    ids = reference.generate([prompt], 16, temperature=0)[0][0]
    tokens = torch.tensor([prompt + ids])
    want = reference.model(tokens, 0)[0, len(prompt) - 1 : -1]
    got = llm.model(tokens.to(device), 0)[0, len(prompt) - 1 : -1].float().cpu()
    sure = clear_cut(want, dtype)
    assert int(sure.sum()) >= 4  # what the comparison below covers
    assert got.argmax(-1)[sure].tolist() == want.argmax(-1)[sure].tolist()

    own = llm.generate([prompt], 16, temperature=0)[0][0]
    differs = [i for i, (a, b) in enumerate(zip(own, ids)) if a != b]
    assert not differs or not sure[differs[0]], f"greedy ids left the reference at clear-cut step {differs[0]}"
    text = llm.text_completion(["ROMEO:\n"], temperature=0, max_gen_len=16).texts[0]
    assert "".join(e.text for e in llm.stream(["ROMEO:\n"], temperature=0, max_gen_len=16)) == text


@pytest.mark.parametrize("temperature, top_p", [(0.8, 0.9), (0.0, 0.9)])
def test_same_seed_same_tokens_as_meta_on_the_same_device(folder, place, temperature, top_p):
    """Meta's loop (global RNG, seeded on every device) over the same model: the same forward
    calls and draws, so the same ids exactly, and logprobs from the same float32 logits."""
    device, dtype = place
    llm = LLaMa.build(folder, max_seq_len=48, max_batch_size=4, device=device, dtype=dtype, seed=7)
    assert_same_as_meta(llm, temperature, top_p, seed=7, logprob_tolerance=1e-4)


def test_the_cli_prints_what_the_library_returns_there(folder, place):
    device, dtype = place
    name = str(dtype).removeprefix("torch.")
    args = ["--ckpt_dir", str(folder), "--prompt", "the king", "--max_gen_len", "8", "--max_seq_len", "48"]
    args += ["--device", device, "--dtype", name, "--temperature", "0"]
    inference = Path(__file__).resolve().parents[1] / "inference.py"
    r = subprocess.run([sys.executable, str(inference), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    texts = build(folder, device, dtype).text_completion(["the king"], max_gen_len=8, temperature=0).texts
    assert f"the king\n> {texts[0]}\n" in r.stdout


def test_compiled_decode_steps_equal_the_models_forward(folder, place):
    """build(compile=True): each decode step one CUDA graph replay, within rounding of forward()."""
    device, dtype = place
    if device != "cuda":
        pytest.skip("compile=True is for CUDA")
    llm = build(folder, device, dtype, compile=True)
    x = X.to(device)
    full = llm.model(x, 0)
    llm.model(x[:, :3], 0)
    steps = torch.stack([llm.step(x[:, i : i + 1], i) for i in range(3, x.shape[1])], dim=1)
    close(steps, full[:, 3:].cpu(), dtype)
    assert llm.step.warmup_s > 0 and llm.step.calls == x.shape[1] - 3
    llm.generate([[1, 5, 9]], 8, temperature=0)
    assert llm.step.calls > x.shape[1] - 3  # generation's one-token steps went through the graph

    lengths = torch.tensor([5, 3], device=device)  # continuous batching: each row at its own position

    def prefill() -> torch.Tensor:
        for slot, n in enumerate(lengths.tolist()):
            with one_slot(llm.model, slot):
                llm.model(x[slot : slot + 1, :n], 0)
        return x.gather(1, lengths[:, None])

    want = decode_rows(llm.model, prefill(), lengths, 6).cpu()
    close(llm.step.rows(prefill(), lengths), want, dtype)


def test_a_batch_computes_what_each_prompt_does_alone(folder, place):
    device, dtype = place
    llm = build(folder, device, dtype)
    x = X.to(device)
    batch = llm.model(x, 0)
    alone = torch.cat([llm.model(x[i : i + 1], 0) for i in range(2)])
    close(batch, alone.cpu(), dtype)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_layers_run_where_the_model_does(make_ckpt, place, scheme):
    """On the CPU in bf16 the compiled kernels, elsewhere torch's kernels or a dequantizing matmul:
    all within the quantization's error of the same layers in float32 on the CPU."""
    device, dtype = place
    folder, _ = make_ckpt(MHA, 1)  # its FFN width, 192, is whole groups of int4's 64
    reference = build(folder, "cpu", torch.float32, quantize=scheme).model(X, 0)
    logits = build(folder, device, dtype, quantize=scheme).model(X.to(device), 0)
    bound = max(RELATIVE[dtype], 2e-2) * 4  # int8 activations on the CPU kernels: a few more roundings
    assert (logits.float().cpu() - reference).abs().max().item() <= bound * reference.abs().max().item()


def test_int4_on_an_ampere_or_later_gpu_is_torchs_kernel_on_the_same_weights(place):
    """torch's CUDA int4 kernel (compute capability 8.0 on) reads the layer's own nibbles, scales and
    zeros: its product is the dequantized weights' within the rounding of bf16, which it computes in."""
    device, dtype = place
    if device != "cuda" or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("torch's int4 kernel is for CUDA GPUs of compute capability 8.0 on")
    g = torch.Generator().manual_seed(0)
    layer = Int4Linear(192, 96, 64, dtype, kernel_layout=False).quantize_(torch.randn(96, 192, generator=g))
    x = torch.randn(5, 192, generator=g)
    want = x @ layer.dequantized(torch.float32).T
    got = layer.to(device)(x.to(device, dtype))
    assert layer._torch_copy is not None and layer._torch_copy[0].device.type == "cuda"  # the kernel ran
    assert got.dtype == dtype
    close(got, want, torch.bfloat16)


def test_gqa_decode_steps_run_sdpas_fused_kernels_on_cuda(folder, place):
    """A GQA decode step, Meta's loop's (no mask) and complete_many's (a mask of each row's positions),
    with SDPA's math kernel switched off: enable_gqa with a mask would need it (and copy the cache
    per query head), so SDPA would find no kernel and raise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, dtype = place
    if device != "cuda":
        pytest.skip("SDPA's fused kernels are CUDA's")
    llm = build(folder, device, dtype)
    llm.tokenizer.stop_ids = (-1,)  # no row ends early
    prompts = [[1, 5, 9], [1, 40, 41, 2, 8]]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        assert [len(t) for t in llm.generate(prompts, 4, temperature=0)[0]] == [4, 4]
        assert [len(c.tokens) for c in llm.complete_many(prompts, temperature=0, max_gen_len=4)] == [4, 4]


def test_the_default_dtype_on_cuda_is_metas_for_the_family(make_ckpt, tiktoken_path):
    """fp16 for Llama 2 (Meta's llama), bf16 for Llama 3 where the GPU has it natively (llama-models)."""
    if (reason := missing("cuda")) is not None:
        pytest.skip(reason)
    llama3, _ = make_ckpt(LLAMA3, 1, name="llama3", tokenizer=tiktoken_path)
    llama2, _ = make_ckpt(GQA, 1, name="llama2")
    bf16 = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    for folder, want in ((llama2, torch.float16), (llama3, bf16)):
        llm = LLaMa.build(folder, max_seq_len=8, max_batch_size=1)
        assert llm.model.tok_embeddings.weight.dtype == want == llm.model.layers[0].attention.cache_k.dtype


def test_the_memory_check_reads_the_devices_free_memory(folder, place):
    device, dtype = place
    free = available_memory(torch.device(device))
    assert free is None or free > 0
    with pytest.raises(ValueError, match=f"not enough memory on {device}"):
        LLaMa.build(folder, max_seq_len=10**9, max_batch_size=64, device=device, dtype=dtype)


def synchronisations(run) -> Counter:
    """Where (file:line) the host waited for the GPU during run(): torch's sync debug mode warns at
    each wait (a copy to the host, a copy from pageable host memory, .item(), a nonzero)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))


@pytest.mark.parametrize("how", ["generate", "complete_many", "compiled", "compiled-complete_many"])
def test_a_decode_step_makes_the_host_wait_for_the_gpu_once(folder, how):
    """A decode step copies its new ids to the host once (the schedule needs them: stop ids, text),
    and nothing else in it waits for the GPU: from 8 to 24 new tokens, one place waits 16 times more."""
    if (reason := missing("cuda")) is not None:
        pytest.skip(reason)
    llm = build(folder, "cuda", torch.float16, compile=how.startswith("compiled"))
    llm.tokenizer.stop_ids = (-1,)  # no row ends early: each run takes max_gen_len tokens in every row
    prompts = [[1, 5, 9], [1, 40, 41, 2, 8]]
    if how.endswith("complete_many"):
        run = lambda n: [c.tokens for c in llm.complete_many(prompts, temperature=0.8, max_gen_len=n)]  # noqa: E731
    else:
        run = lambda n: llm.generate(prompts, n, temperature=0.8)[0]  # noqa: E731
    assert [len(t) for t in run(4)] == [4, 4]  # and warm: compiling, capturing, the allocators' first blocks
    short, long = synchronisations(lambda: run(8)), synchronisations(lambda: run(24))
    more = {where: n - short[where] for where, n in long.items() if n > short[where]}
    assert list(more.values()) == [16], f"waits per place: {dict(short)} for 8 new tokens, {dict(long)} for 24"
