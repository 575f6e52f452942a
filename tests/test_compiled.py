"""The static-shape decode step (llama.compiled): the same logits and cache as the model's own
forward (Meta's schedule) and as decode_rows (continuous batching), eager and compiled by inductor
on the CPU; generation and complete_many through it draw the same ids. CUDA graphs
(mode="reduce-overhead") are checked in tests/test_devices.py on a GPU."""

import copy
import pickle

import pytest
import torch
from conftest import GQA, MHA, tokens

from llama import LLaMa
from llama.batching import decode_rows, one_slot
from llama.compiled import StaticDecode
from llama.model import ModelArgs, Transformer


def model(params: dict) -> Transformer:
    m = Transformer(ModelArgs.from_params(params)).eval()
    m.init_weights(torch.Generator().manual_seed(0))
    m.setup_cache(2, 16)
    return m


def steps(m: Transformer, step, x: torch.Tensor, prefill: int) -> list[torch.Tensor]:
    m.setup_cache(2, 16)
    m(x[:, :prefill], 0)
    return [step(x[:, i : i + 1], i) for i in range(prefill, x.shape[1])]


@pytest.mark.parametrize("params", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("mode", [None, "default"], ids=["eager", "inductor"])
@torch.inference_mode()
def test_each_step_gives_a_full_forwards_logits_and_cache(params, mode):
    m = model(params)
    x = tokens(params["vocab_size"], 2, 10)
    full = m(x, 0)
    ours = steps(m, StaticDecode(m, mode), x, 4)
    cache = [layer.attention.cache_k[:, :, :10].clone() for layer in m.layers]
    theirs = steps(m, lambda t, pos: m(t, pos)[:, -1], x, 4)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(a, full[:, 4 + i], atol=1e-5, rtol=0)
    for layer, k in zip(m.layers, cache):
        torch.testing.assert_close(layer.attention.cache_k[:, :, :10], k, atol=1e-6, rtol=0)


@pytest.mark.parametrize("params", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("mode", [None, "default"], ids=["eager", "inductor"])
@torch.inference_mode()
def test_a_rows_step_gives_decode_rows_logits_and_cache(params, mode):
    """Rows at their own positions (5 and 3 tokens in, of a 3-row cache): the padded step's logits
    and the keys it writes are decode_rows'."""
    m = model(params)
    m.setup_cache(3, 16)
    x = tokens(params["vocab_size"], 2, 6)
    lengths = torch.tensor([5, 3])

    def after_prefill():
        for layer in m.layers:
            layer.attention.cache_k.zero_()
            layer.attention.cache_v.zero_()
        for slot, n in enumerate(lengths.tolist()):
            with one_slot(m, slot):
                m(x[slot : slot + 1, :n], 0)
        return x.gather(1, lengths[:, None])  # each row's next token, at position lengths[b]

    want = decode_rows(m, after_prefill(), lengths, 6)
    cache = [layer.attention.cache_k[:2].clone() for layer in m.layers]
    step = StaticDecode(m, mode)
    got = step.rows(after_prefill(), lengths)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for layer, k in zip(m.layers, cache):
        torch.testing.assert_close(layer.attention.cache_k[:2], k, atol=1e-6, rtol=0)
    assert step.pos.tolist() == [5, 3, 0] and step.tokens.shape == (3, 1)  # padded to the cache's rows


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generation_through_the_step_draws_the_same_ids(make_ckpt, temperature):
    folder, _ = make_ckpt(GQA, 2)
    prompts = [[1, 5, 9, 14, 3], [1, 40]]
    plain = LLaMa.build(folder, max_seq_len=48, max_batch_size=2, dtype="float32", seed=3)
    expected = plain.generate(prompts, 20, temperature)[0]
    stepped = LLaMa.build(folder, max_seq_len=48, max_batch_size=2, dtype="float32", seed=3)
    stepped.step = StaticDecode(stepped.model, mode=None)
    assert stepped.generate(prompts, 20, temperature)[0] == expected
    assert stepped.step.calls >= 19  # the steps went through it
    stepped.model.setup_cache(2, 40)  # new cache tensors and length: the step follows them
    assert stepped.generate(prompts, 20, temperature)[0] == plain.generate(prompts, 20, temperature)[0]
    calls = stepped.step.calls
    many = [[1, 5, 9, 14, 3], [1, 40], [1, 7, 7], [1, 2, 3, 4, 5, 6, 7]]  # more prompts than rows: slots refill
    want = [c.tokens for c in plain.complete_many(many, temperature, max_gen_len=[12, 20, 6, 9])]
    assert [c.tokens for c in stepped.complete_many(many, temperature, max_gen_len=[12, 20, 6, 9])] == want
    assert stepped.step.calls > calls  # complete_many's steps went through it
    # A copy steps its own model: the copied compiled function had decoded through the original's.
    twins = [copy.deepcopy(stepped), pickle.loads(pickle.dumps(stepped))]  # each draws what the original draws next
    want = stepped.generate(prompts, 20, temperature)[0]
    for twin in twins:
        assert twin.step.model is twin.model and twin.step.mode is None
        assert twin.generate(prompts, 20, temperature)[0] == want
    stepped.step = StaticDecode(stepped.model, mode="default")  # torch.compile's function: copy shares it
    assert copy.deepcopy(stepped).step.compiled is not stepped.step.compiled  # (not compiled: never called)


def test_compile_is_for_cuda_and_a_step_is_one_token(make_ckpt):
    folder, _ = make_ckpt(GQA, 1)
    with pytest.raises(ValueError, match="compile=True captures CUDA graphs: it needs a CUDA device.*not cpu"):
        LLaMa.build(folder, max_seq_len=16, device="cpu", compile=True)
    m = model(GQA)
    with pytest.raises(ValueError, match=r"one new token per row inside the cache, not \(2, 3\) at start_pos=0"):
        StaticDecode(m, None)(torch.zeros(2, 3, dtype=torch.long), 0)
    m.freqs_cis = None
    with pytest.raises(ValueError, match="needs the model's KV cache"):
        StaticDecode(m)
