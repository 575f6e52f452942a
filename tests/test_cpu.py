"""How a model runs on the CPU (llama.cpu, llama.kernels): the compiled bf16 ops (GEMV, RMSNorm,
RoPE, one-query attention) against float64 references and Meta's modules; GemvLinear's ATen fallback
and PackedLinear give F.linear's numbers with Meta's names kept; GroupedQueryAttention gives SDPA's;
release_mapped gives back an mmap'd shard's pages without losing a byte."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import GQA, tokens

from llama import LLaMa, cpu
from llama.cpu import (
    GemvLinear,
    GroupedQueryAttention,
    KernelAttention,
    KernelRMSNorm,
    PackedLinear,
    onednn_bf16,
    onednn_rows,
    pack_linears,
    plain_modules,
    weight_bytes,
)
from llama.model import Attention, ModelArgs, RMSNorm, apply_rotary_emb, precompute_freqs_cis
from llama.runtime import release_mapped

needs_onednn_bf16 = pytest.mark.skipif(not onednn_bf16(), reason="this CPU's oneDNN has no bf16 kernels")
needs_kernels = pytest.mark.skipif(cpu.compiled_kernels() is None, reason="no AVX-512 BF16 or no C++ compiler here")


def within_rounding(got: torch.Tensor, exact: torch.Tensor) -> bool:
    """got (bf16) is exact (float64) rounded to bf16: at most half a bf16 step (2^-8 relative) away."""
    return bool(((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-30).all())


def a_step_apart(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Two bf16 results of the same formula whose float32 sums were added in different orders: where a
    rounding went the other way they differ by one bf16 step of an intermediate (up to 2^-7 relative)
    plus the final rounding."""
    return bool(((got.double() - expected.double()).abs() <= expected.double().abs() * 2**-6 + 1e-30).all())


@needs_kernels
@pytest.mark.parametrize("in_features", [16, 31, 100, 2048 + 7])
def test_gemv_kernel_rounds_the_exact_product_and_rows_do_not_see_each_other(in_features):
    gen = torch.Generator().manual_seed(in_features)
    w = torch.randn(37, in_features, generator=gen).to(torch.bfloat16)
    x = torch.randn(3, 11, in_features, generator=gen).to(torch.bfloat16)  # 33 rows: 8 groups of 4 and 1
    got = torch.ops.llama_cpu.gemv_bf16(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 11, 37)
    assert within_rounding(got, x.double() @ w.double().T)
    rows, got = x.reshape(33, in_features), got.reshape(33, 37)
    for i in range(33):  # a row's result is the same alone or in any batch (a decode step's rows)
        assert torch.equal(torch.ops.llama_cpu.gemv_bf16(rows[i : i + 1], w), got[i : i + 1])
        assert torch.equal(torch.ops.llama_cpu.gemv_bf16(rows[: i + 1], w), got[: i + 1])
    with pytest.raises(RuntimeError, match="no rows"):
        torch.ops.llama_cpu.gemv_bf16(torch.zeros(0, in_features, dtype=torch.bfloat16), w)


@needs_kernels
@torch.no_grad()
def test_norm_and_rope_kernels_give_metas_numbers():
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(768, eps=1e-5).to(torch.bfloat16)
    norm.weight.data = torch.randn(768, generator=gen).to(torch.bfloat16)
    x = (3 * torch.randn(2, 7, 768, generator=gen)).to(torch.bfloat16)
    expected, got = norm(x), torch.ops.llama_cpu.rms_norm_bf16(x, norm.weight, 1e-5)
    # The same float32 formula and roundings (normalised, then scaled); only the order of the float32
    # sum of squares may differ.
    assert (got == expected).float().mean() > 0.99 and a_step_apart(got, expected)

    freqs = precompute_freqs_cis(64, 50)[40:45]
    q = torch.randn(2, 5, 8, 64, generator=gen).to(torch.bfloat16)
    k = torch.randn(2, 5, 2, 64, generator=gen).to(torch.bfloat16)
    expected, got = apply_rotary_emb(q, k, freqs), torch.ops.llama_cpu.rope_bf16(q, k, torch.view_as_real(freqs))
    for e, g in zip(expected, got):
        assert (g == e).float().mean() > 0.99 and a_step_apart(g, e)


@needs_kernels
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,positions",
    [(4, 4, 16, 1), (12, 12, 64, 37), (32, 4, 64, 200), (6, 2, 48, 17), (8, 8, 128, 64)],
)
def test_one_query_attention_kernel_against_float64(heads, kv_heads, head_dim, positions):
    gen = torch.Generator().manual_seed(positions)
    cache_k = torch.randn(3, kv_heads, 256, head_dim, generator=gen).to(torch.bfloat16)  # [max B, Hkv, max S, D]
    cache_v = torch.randn(3, kv_heads, 256, head_dim, generator=gen).to(torch.bfloat16)
    q = torch.randn(2, 1, heads, head_dim, generator=gen).to(torch.bfloat16).transpose(1, 2)  # as the model has it
    keys, values = cache_k[:2, :, :positions], cache_v[:2, :, :positions]  # strided views of the cache
    got = torch.ops.llama_cpu.attend_one_bf16(q, keys, values)
    group = heads // kv_heads
    k64, v64 = keys.double().repeat_interleave(group, 1), values.double().repeat_interleave(group, 1)
    probs = torch.softmax(q.double() @ k64.transpose(2, 3) / math.sqrt(head_dim), dim=-1)
    exact = probs @ v64
    assert got.shape == q.shape and (got.double() - exact).abs().max() <= 2**-8 * exact.abs().max() + 1e-3


@needs_kernels
def test_one_query_attention_with_a_length_per_row_is_each_row_alone():
    """Continuous batching's rows sit at their own positions: with lengths, row b's output is
    bit for bit what the kernel gives for that row over its first lengths[b] positions."""
    gen = torch.Generator().manual_seed(0)
    cache_k = torch.randn(4, 2, 64, 64, generator=gen).to(torch.bfloat16)
    cache_v = torch.randn(4, 2, 64, 64, generator=gen).to(torch.bfloat16)
    q = torch.randn(4, 1, 8, 64, generator=gen).to(torch.bfloat16).transpose(1, 2)
    lengths = [5, 40, 1, 17]
    got = torch.ops.llama_cpu.attend_one_bf16(q, cache_k[:, :, :40], cache_v[:, :, :40], torch.tensor(lengths))
    for b, n in enumerate(lengths):
        alone = torch.ops.llama_cpu.attend_one_bf16(q[b : b + 1], cache_k[b : b + 1, :, :n], cache_v[b : b + 1, :, :n])
        assert torch.equal(got[b : b + 1], alone), b
    with pytest.raises(RuntimeError, match="outside 1..S"):
        torch.ops.llama_cpu.attend_one_bf16(q, cache_k[:, :, :40], cache_v[:, :, :40], torch.tensor([5, 41, 1, 1]))


@needs_kernels
def test_bf16_build_runs_the_kernels_close_to_metas_modules(make_ckpt):
    folder, _ = make_ckpt(GQA, 2)
    plain = LLaMa.build(folder, max_seq_len=32, max_batch_size=3, dtype="bfloat16", device="cpu")
    fast = LLaMa.build(folder, max_seq_len=32, max_batch_size=3, dtype="bfloat16", device="cpu")
    assert sum(isinstance(m, KernelRMSNorm) for m in fast.model.modules()) == 2 * GQA["n_layers"] + 1
    assert sum(isinstance(m, KernelAttention) for m in fast.model.modules()) == GQA["n_layers"]
    # per layer 7 linears, the attention and 2 norms; then the output and the final norm
    assert plain_modules(plain.model) == 10 * GQA["n_layers"] + 2
    assert plain_modules(plain.model) == 0
    assert not any(isinstance(m, (GemvLinear, KernelRMSNorm, KernelAttention)) for m in plain.model.modules())
    x = tokens(GQA["vocab_size"], 3, 9, seed=0)
    for ids, start in ((x, 0), (x[:1, :1], 9), (x[:, :1], 9)):  # a prompt, then batch-1 and batch-3 decode steps
        got, expected = fast.model(ids, start), plain.model(ids, start)
        assert (got - expected).abs().max() < 0.05 * expected.abs().max()  # a few bf16 roundings apart
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert fast.generate(prompts, 6, temperature=0) == plain.generate(prompts, 6, temperature=0)
    assert torch.backends.mkldnn.enabled
    expected, got = plain.model.state_dict(), fast.model.state_dict()
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


@needs_kernels
def test_gradients_flow_through_a_built_model(make_ckpt):
    """The kernels have no backward: where autograd needs one, PyTorch's operators run instead."""
    folder, _ = make_ckpt(GQA, 1)
    llm = LLaMa.build(folder, max_seq_len=16, max_batch_size=1, dtype="bfloat16", device="cpu")
    weight = llm.model.layers[0].feed_forward.w1.weight.requires_grad_(True)
    llm.model(torch.tensor([[1, 2, 3]]), 0)
    llm.model(torch.tensor([[4]]), 3).sum().backward()  # a decode step, every kernel's case
    assert weight.grad is not None and weight.grad.abs().sum() > 0


@needs_kernels
def test_ops_have_shapes_for_tracing():
    """Each op's fake implementation gives its output shape, so torch.compile can trace a model."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        bf16 = dict(dtype=torch.bfloat16)
        x, w = torch.empty(1, 1, 64, **bf16), torch.empty(96, 64, **bf16)
        assert torch.ops.llama_cpu.gemv_bf16(x, w).shape == (1, 1, 96)
        blocks = torch.empty(3, 32 * 2 + 32 * 64, dtype=torch.uint8)  # Int8Linear(64, 96)
        assert torch.ops.llama_cpu.mm_int8(x, blocks, 96).shape == (1, 1, 96)
        blocks = torch.empty(3, 2, 32 * (4 + 16), dtype=torch.uint8)  # Int4Linear(64, 96, group_size=32)
        assert torch.ops.llama_cpu.mm_int4(x, blocks, 96, 32).shape == (1, 1, 96)
        assert torch.ops.llama_cpu.rms_norm_bf16(x, torch.empty(64, **bf16), 1e-5).shape == x.shape
        q, k = torch.empty(1, 1, 4, 16, **bf16), torch.empty(1, 1, 2, 16, **bf16)
        assert [t.shape for t in torch.ops.llama_cpu.rope_bf16(q, k, torch.empty(1, 8, 2))] == [q.shape, k.shape]
        cache = torch.empty(1, 2, 9, 16, **bf16)
        assert torch.ops.llama_cpu.attend_one_bf16(q.transpose(1, 2), cache, cache).shape == (1, 4, 1, 16)


def test_kernel_builds_from_source_into_an_empty_cache(tmp_path):
    """What a first build() on a new machine does: compile, cache, load (a fresh process: a kernel
    library loads once per process)."""
    if cpu.compiled_kernels() is None:
        pytest.skip("no AVX-512 BF16 or no C++ compiler here")
    code = "from llama.kernels import compiled_kernels; import sys; sys.exit(compiled_kernels() is None)"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    assert [p.suffix for p in (tmp_path / "llama-reference").iterdir()] == [".so"]


@pytest.mark.parametrize("pack", [False, pytest.param(True, marks=needs_onednn_bf16)])
def test_fallback_and_packed_linears_give_f_linear_numbers_and_state_dict(make_ckpt, pack, monkeypatch):
    monkeypatch.setattr(cpu, "compiled_kernels", lambda: None)  # as on a CPU without AVX-512 BF16
    folder, _ = make_ckpt(GQA, 2)
    plain = LLaMa.build(folder, max_seq_len=32, max_batch_size=3, dtype="bfloat16", device="cpu")
    fast = LLaMa.build(folder, max_seq_len=32, max_batch_size=3, dtype="bfloat16", device="cpu", pack=pack)
    assert not any(isinstance(m, (KernelRMSNorm, KernelAttention)) for m in fast.model.modules())
    kind = PackedLinear if pack else GemvLinear
    assert sum(isinstance(m, kind) for m in fast.model.modules()) == 7 * GQA["n_layers"] + 1
    plain_modules(plain.model)
    assert not any(isinstance(m, (GemvLinear, PackedLinear)) for m in plain.model.modules())
    x = tokens(GQA["vocab_size"], 3, 9, seed=0)
    assert torch.equal(fast.model(x, 0), plain.model(x, 0))
    assert torch.equal(fast.model(x[:1, :1], 9), plain.model(x[:1, :1], 9))  # batch-1 decode step: one row
    assert torch.equal(fast.model(x[:, :1], 9), plain.model(x[:, :1], 9))
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert fast.generate(prompts, 6, temperature=0) == plain.generate(prompts, 6, temperature=0)
    assert fast.generate(prompts[:1], 6, temperature=0) == plain.generate(prompts[:1], 6, temperature=0)
    assert torch.backends.mkldnn.enabled  # the switch GemvLinear flips is back

    expected, got = plain.model.state_dict(), fast.model.state_dict()
    assert list(got) == list(expected)  # Meta's keys, in Meta's order
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert torch.equal(fast.model.layers[1].attention.wq.weight, plain.model.layers[1].attention.wq.weight)
    assert weight_bytes(fast.model) == weight_bytes(plain.model)
    assert plain_modules(fast.model) == 7 * GQA["n_layers"] + 1  # packed or routed linears back to nn.Linear
    assert torch.equal(fast.model(x, 0), plain.model(x, 0))


def test_prompt_lengths_run_at_a_few_row_counts_within_an_eighth():
    counts = {rows: onednn_rows(rows) for rows in range(33, 8193)}
    assert all(rows <= n <= rows * 9 / 8 for rows, n in counts.items())
    assert len(set(counts.values())) == 64  # for every prompt length up to 8192; there was one per length


@pytest.mark.parametrize("pack", [False, pytest.param(True, marks=needs_onednn_bf16)], ids=["gemv", "packed"])
def test_a_prompts_linears_run_at_rounded_rows_with_f_linears_numbers(pack, monkeypatch):
    """oneDNN keeps a kernel per row count: prompts reach it at onednn_rows, zeros added, and each
    row's outputs are those of F.linear on the prompt alone, bit for bit."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=g).bfloat16()
    linear = PackedLinear(weight) if pack else GemvLinear(64, 48, bias=False, dtype=torch.bfloat16)
    if not pack:
        linear.weight.data.copy_(weight)
    seen, pad = [], F.pad
    monkeypatch.setattr(F, "pad", lambda t, p: seen.append(t.shape[0] + p[-1]) or pad(t, p))  # the rows run
    for rows in (33, 37, 100, 257, 600):
        x = torch.randn(1, rows, 64, generator=g).bfloat16()
        assert torch.equal(linear(x), F.linear(x, weight))
    assert seen == [36, 40, 104, 288, 640]


@needs_onednn_bf16
def test_load_state_dict_repacks_and_checks_shapes():
    linear = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    model = torch.nn.Sequential(linear)
    assert pack_linears(model) == 1
    new = torch.randn(32, 64, dtype=torch.bfloat16)
    model.load_state_dict({"0.weight": new})
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    assert torch.equal(model(x), torch.nn.functional.linear(x, new))
    with pytest.raises(RuntimeError, match=r"0.weight: shape \(64, 32\), expected \(32, 64\)"):
        model.load_state_dict({"0.weight": new.T})
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({})


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2**-7)])
def test_grouped_query_attention_gives_sdpas_numbers(dtype, tolerance):
    """A GQA decode step as one product per kv head, against SDPA repeating the keys (float32 both
    ways: the bound is the output's rounding to dtype)."""
    args = ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=8)
    attention = GroupedQueryAttention(args)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 1, 8, generator=g).to(dtype)
    keys, values = (torch.randn(3, 2, 11, 8, generator=g).to(dtype) for _ in range(2))
    got = attention.attend(q, keys, values, None)
    k, v = (t.float().repeat_interleave(4, dim=1) for t in (keys, values))
    expected = F.scaled_dot_product_attention(q.float(), k, v)
    assert got.dtype == dtype and (got.float() - expected).abs().max() <= tolerance * expected.abs().max()
    prompt = torch.randn(3, 8, 5, 8, generator=g)  # more than one query: SDPA itself
    k5, v5 = torch.randn(3, 2, 5, 8, generator=g), torch.randn(3, 2, 5, 8, generator=g)
    assert torch.equal(attention.attend(prompt, k5, v5, None), Attention(args).attend(prompt, k5, v5, None))


def test_float32_cpu_builds_use_grouped_attention_only(make_ckpt):
    folder, _ = make_ckpt(GQA, 1)
    llm = LLaMa.build(folder, max_seq_len=8, dtype="float32", device="cpu")
    assert sum(type(m) is GroupedQueryAttention for m in llm.model.modules()) == GQA["n_layers"]
    assert not any(
        isinstance(m, (GemvLinear, PackedLinear, KernelRMSNorm, KernelAttention)) for m in llm.model.modules()
    )


def test_pack_is_refused_where_it_cannot_run(make_ckpt):
    folder, _ = make_ckpt(GQA, 1)
    with pytest.raises(ValueError, match="pack=True needs bfloat16 on a CPU .* not torch.float32 on cpu in 1 process"):
        LLaMa.build(folder, max_seq_len=8, dtype="float32", pack=True)
    with pytest.raises(ValueError, match="pack=True reorders bf16 weights that quantize='int8' replaces"):
        LLaMa.build(folder, max_seq_len=8, dtype="bfloat16", pack=True, quantize="int8")  # it packed nothing
    fp32 = LLaMa.build(folder, max_seq_len=8, dtype="float32")  # bf16 only: float32 has no oneDNN detour
    assert not any(isinstance(m, (GemvLinear, PackedLinear)) for m in fp32.model.modules())


def rss_file_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_release_mapped_gives_back_file_pages_and_keeps_every_byte(tmp_path):
    big = torch.randn(4 << 20, generator=torch.Generator().manual_seed(0))  # 16 MB
    torch.save({"w": big}, tmp_path / "w.pth")
    mapped = torch.load(tmp_path / "w.pth", mmap=True, weights_only=True)["w"]
    assert torch.equal(mapped, big)  # every page is now resident
    before = rss_file_bytes()
    release_mapped([mapped])
    assert before - rss_file_bytes() > 12 << 20
    assert torch.equal(mapped, big)  # read back from the file
    anonymous = big.clone()
    release_mapped([anonymous])  # not file-backed: left alone
    assert torch.equal(anonymous, big)
