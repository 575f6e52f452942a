"""Continuous batching (LLaMa.complete_many, llama.batching): more prompts than rows, rows ending
at different steps and new prompts taking their slots, against each prompt run alone through
Meta's schedule; and the batch completion script's use of it."""

import json

import pytest
import torch
from conftest import GQA
from test_inference import run as run_cli

from llama import LLaMa

PROMPTS = [
    "the king",
    "war",
    "a long prompt about the queen and the king, of war and of peace, and of bread",
    "to be",
    "x",
    "gold and silver and gold",
    "and so on, and so forth",
    "q",
]


@pytest.fixture
def folder(make_ckpt):
    return make_ckpt(GQA, 2)[0]


def one_by_one(llm: LLaMa, prompts: list[str], **kw) -> list:
    return [llm.text_completion([p], **kw) for p in prompts]


# bfloat16: the CPU kernels' build, whose decode steps give each row the numbers it has alone
@pytest.mark.parametrize("dtype, rows", [("float32", 3), ("bfloat16", 3), ("bfloat16", 6)])
def test_greedy_completions_equal_each_prompt_run_alone(folder, dtype, rows):
    llm = LLaMa.build(folder, max_seq_len=40, max_batch_size=rows, dtype=dtype, device="cpu")
    kw = dict(temperature=0, max_gen_len=16, repetition_penalty=1.3, logprobs=dtype == "float32")
    first = llm.text_completion(PROMPTS[:1], **kw).texts[0]
    assert len(first) > 8
    # a stop string from the middle of one answer ends that row early; the long prompt's row is cut
    # by max_seq_len: rows end at different steps, and later prompts take their slots
    kw["stop"] = [first[4:7]]
    alone = one_by_one(llm, PROMPTS, **kw)
    many = list(llm.complete_many(PROMPTS, **kw))
    assert len(many) == len(PROMPTS)
    for a, m in zip(alone, many):
        assert (m.tokens, m.text, m.stop_reason) == (a.tokens[0], a.texts[0], a.stop_reasons[0])
        if kw["logprobs"]:
            assert len(m.logprobs) == len(a.logprobs[0])
            assert max(abs(x - y) for x, y in zip(m.logprobs, a.logprobs[0])) < 1e-4
    reasons = {m.stop_reason for m in many}
    assert "stop_string" in reasons and "out_of_tokens" in reasons
    assert len({len(m.tokens) for m in many}) > 2


def test_echo_and_a_prompt_that_fills_the_cache_end_as_alone(folder):
    llm = LLaMa.build(folder, max_seq_len=24, max_batch_size=2, dtype="float32", device="cpu")
    ids = [[1, *range(5, 28)], [1, 7], [1, *range(30, 50)], [1, 9, 9]]  # 24 ids: no room for a new one
    many = list(llm.complete_many(ids, temperature=0, max_gen_len=6, echo=True, logprobs=True))
    for prompt, m in zip(ids, many):
        tokens, logprobs = llm.generate([prompt], 6, temperature=0, echo=True, logprobs=True)
        assert m.tokens == tokens[0] and m.tokens[: len(prompt)] == prompt
        assert torch.allclose(torch.tensor(m.logprobs), torch.tensor(logprobs[0]), atol=1e-4)
    assert many[0].tokens == ids[0] and many[0].stop_reason == "out_of_tokens"


def test_each_prompt_may_have_its_own_max_gen_len(folder):
    llm = LLaMa.build(folder, max_seq_len=48, max_batch_size=3, dtype="float32", device="cpu")
    budgets = [9, 1, 4, 12, 2, 7, 3, 5]
    many = list(llm.complete_many(PROMPTS, temperature=0, max_gen_len=budgets))
    for prompt, n, m in zip(PROMPTS, budgets, many):
        assert m.tokens == llm.generate([llm.tokenizer.encode(prompt, bos=True, eos=False)], n, temperature=0)[0][0]


def test_one_slot_draws_what_prompts_run_one_by_one_draw(folder):
    """With one row, continuous batching samples in Meta's order: the same seed, the same tokens."""
    build = dict(max_seq_len=40, max_batch_size=1, dtype="float32", device="cpu", seed=3)
    kw = dict(temperature=0.9, top_p=0.95, max_gen_len=10, top_k=40)
    many = [m.tokens for m in LLaMa.build(folder, **build).complete_many(PROMPTS, **kw)]
    alone = [c.tokens[0] for c in one_by_one(LLaMa.build(folder, **build), PROMPTS, **kw)]
    assert many == alone
    again = [m.tokens for m in LLaMa.build(folder, **build | {"max_batch_size": 3}).complete_many(PROMPTS, **kw)]
    assert again != many  # several rows draw in another order: the option says so


def test_bad_input_is_refused_before_any_step_and_the_llm_is_released(folder):
    llm = LLaMa.build(folder, max_seq_len=48, max_batch_size=2, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="prompt 3 has 50 tokens"):
        llm.complete_many([[1, 5], [1], [1, 6], [1] * 50])
    with pytest.raises(ValueError, match="max_gen_len holds 1 values for 2 prompts"):
        llm.complete_many(["a", "b"], max_gen_len=[3])
    with pytest.raises(ValueError, match="prompt 1's max_gen_len=0"):
        llm.complete_many(["a", "b"], max_gen_len=[3, 0])
    with pytest.raises(ValueError, match="no prompts"):
        llm.complete_many([])
    with pytest.raises(ValueError, match="stop='x'"):
        llm.complete_many(["a"], stop="x")
    with pytest.raises(ValueError, match="stop=True"):  # a CLI's --stop with no value
        llm.complete_many(["a"], stop=True)
    with pytest.raises(ValueError, match=r"prompt 1 is tuple \(1, 5\): pass a list of ints"):
        llm.complete_many([[1, 6], (1, 5)])
    with pytest.raises(ValueError, match=r"prompt 0 is a tuple \(1, 5\): pass strings, or lists of token ids"):
        llm.complete_many([(1, 5)])
    running = llm.complete_many(PROMPTS, temperature=0, max_gen_len=4)
    next(running)
    with pytest.raises(RuntimeError, match="already generating"):
        llm.text_completion(["a"], temperature=0, max_gen_len=2)
    running.close()  # a loop left early gives the cache back
    assert llm.text_completion(["a"], temperature=0, max_gen_len=2).texts


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_logits_are_an_error_naming_the_prompt(folder, temperature, bad):
    llm = LLaMa.build(folder, max_seq_len=32, max_batch_size=2, dtype="float32", device="cpu")

    def poison(module, args, logits):  # slot 1 (the second prompt) in the decode steps
        if logits.dim() == 2 and logits.shape[0] == 2:
            logits = logits.clone()
            logits[1, 5] = bad
        return logits

    llm.model.output.register_forward_hook(poison)
    with pytest.raises(RuntimeError, match=r"NaN or infinite for prompt\(s\) \[1\]: usually a damaged"):
        list(llm.complete_many(["the king", "war"], temperature=temperature, max_gen_len=6))


def test_a_prompts_file_completes_by_continuous_batching_as_each_alone(folder, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    common = ["--ckpt_dir", str(folder), "--prompts_file", str(tmp_path / "p.txt"), "--temperature", "0"]
    common += ["--max_gen_len", "12", "--max_seq_len", "40", "--max_batch_size", "3", "--dtype", "float32"]
    common += ["--device", "cpu"]
    many = run_cli(*common, "--out", str(tmp_path / "many.jsonl"))
    meta = run_cli(*common, "--meta_schedule", "--out", str(tmp_path / "meta.jsonl"))
    assert many.returncode == meta.returncode == 0, many.stderr + meta.stderr
    assert "prompts" not in many.stderr  # no progress bar outside a terminal
    rows = [json.loads(line) for line in (tmp_path / "many.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert (tmp_path / "many.jsonl").read_text() == (tmp_path / "meta.jsonl").read_text()  # greedy: the same
    printed = run_cli(*common)
    assert printed.returncode == 0 and all(f"{r['prompt']}\n> {r['completion']}\n" in printed.stdout for r in rows)


def test_prompts_may_come_from_any_iterable_read_once(folder):
    """A generator is read once, whole: its first prompt was once consumed by the check of its kind."""
    llm = LLaMa.build(folder, max_seq_len=48, max_batch_size=2, dtype="float32", device="cpu")
    want = [c.tokens for c in llm.complete_many(PROMPTS, temperature=0, max_gen_len=3)]
    assert [c.tokens for c in llm.complete_many(iter(PROMPTS), temperature=0, max_gen_len=3)] == want
    assert [c.tokens for c in llm.complete_many(tuple(PROMPTS), temperature=0, max_gen_len=3)] == want
    assert sorted({e.index for e in llm.stream(iter(PROMPTS[:2]), temperature=0, max_gen_len=3)}) == [0, 1]
