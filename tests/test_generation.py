"""Generation: Meta's schedule and sampling sequence, logprobs, batching invariants, bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import MHA

from llama import Completions, LLaMa


def meta_reference_generate(model, tokenizer, prompt_tokens, max_gen_len, temperature, top_p, seed):
    """Meta's generate() and sample_top_p() transcribed, global RNG and all: the oracle."""
    torch.manual_seed(seed)
    device = model.tok_embeddings.weight.device  # Meta's is always "cuda"
    bsz, pad_id = len(prompt_tokens), tokenizer.pad_id
    min_len, max_len = min(map(len, prompt_tokens)), max(map(len, prompt_tokens))
    total_len = min(model.max_seq_len, max_gen_len + max_len)
    tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=device)
    for k, t in enumerate(prompt_tokens):
        tokens[k, : len(t)] = torch.tensor(t, device=device)
    token_logprobs = torch.zeros_like(tokens, dtype=torch.float)
    prev_pos, eos_reached, mask = 0, torch.tensor([False] * bsz, device=device), tokens != pad_id
    for cur_pos in range(min_len, total_len):
        logits = model.forward(tokens[:, prev_pos:cur_pos], prev_pos)
        if temperature > 0:
            probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
            probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
            probs_sum = torch.cumsum(probs_sort, dim=-1)
            probs_sort[probs_sum - probs_sort > top_p] = 0.0
            probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
            nxt = torch.gather(probs_idx, -1, torch.multinomial(probs_sort, num_samples=1))
        else:
            nxt = torch.argmax(logits[:, -1], dim=-1)
        nxt = torch.where(mask[:, cur_pos], tokens[:, cur_pos], nxt.reshape(-1))
        tokens[:, cur_pos] = nxt
        token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
            logits.transpose(1, 2), tokens[:, prev_pos + 1 : cur_pos + 1], reduction="none", ignore_index=pad_id
        )
        eos_reached |= (~mask[:, cur_pos]) & (nxt == tokenizer.eos_id)
        prev_pos = cur_pos
        if all(eos_reached):
            break
    out, lps = [], []
    for i, toks in enumerate(tokens.tolist()):
        start, end = len(prompt_tokens[i]), len(prompt_tokens[i]) + max_gen_len
        toks, probs = toks[start:end], token_logprobs[i].tolist()[start:end]
        if tokenizer.eos_id in toks:
            toks = toks[: toks.index(tokenizer.eos_id)]
            probs = probs[: len(toks)]
        out.append(toks)
        lps.append(probs)
    return out, lps


PROMPTS = [[1, 5, 9, 14, 3], [1, 40], [1, 22, 7, 60, 61, 62, 63, 64, 70], [1, 33, 33]]


def assert_same_as_meta(llm, temperature: float, top_p: float, seed: int = 7, logprob_tolerance: float = 1e-5):
    """llm (built with this seed) generates what Meta's loop does over the same model and draws."""
    ours, our_lps = llm.generate(PROMPTS, 20, temperature, top_p, logprobs=True)
    llm.model.setup_cache(4, 48)
    theirs, their_lps = meta_reference_generate(llm.model, llm.tokenizer, PROMPTS, 20, temperature, top_p, seed)
    assert ours == theirs
    for a, b in zip(our_lps, their_lps):
        assert a == pytest.approx(b, abs=logprob_tolerance)
    assert sum(map(len, ours)) >= 40  # enough sampled tokens compared (a row may stop at EOS)


@pytest.mark.parametrize("temperature, top_p", [(0.8, 0.9), (1.0, 1.0), (0.6, 0.3), (0.0, 0.9)])
def test_same_seed_same_tokens_and_logprobs_as_meta(llm, temperature, top_p):
    assert_same_as_meta(llm, temperature, top_p)


def test_sampling_leaves_the_global_rng_alone(llm):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    llm.generate(PROMPTS, 5, temperature=1.0)
    assert torch.equal(torch.rand(3), expected)


def test_greedy_batch_equals_each_prompt_alone(llm):
    batch, _ = llm.generate(PROMPTS, 12, temperature=0)
    for prompt, row in zip(PROMPTS, batch):
        alone, _ = llm.generate([prompt], 12, temperature=0)
        assert alone == [row]


def test_logprobs_score_each_token_given_the_tokens_before_it(llm):
    out, lps = llm.generate(PROMPTS[:2], 10, temperature=1.0, logprobs=True, echo=True)
    for toks, probs in zip(out, lps):
        x = torch.tensor([toks])
        llm.model.setup_cache(4, 48)
        logp = torch.log_softmax(llm.model(x, 0)[0], dim=-1)
        expected = [0.0] + [logp[i - 1, toks[i]].item() for i in range(1, len(toks))]
        assert probs == pytest.approx(expected, abs=1e-4)


def test_prompt_only_scoring_is_not_off_by_one(make_ckpt):
    folder, _ = make_ckpt(MHA, 1)
    llm = LLaMa.build(folder, max_seq_len=6, max_batch_size=2, dtype="float32", device="cpu")
    prompts = [[1, 10, 20, 30, 40, 50], [1, 11, 21, 31, 41, 51]]  # fill max_seq_len: nothing to generate
    out, lps = llm.generate(prompts, 4, logprobs=True, echo=True)
    assert out == prompts
    logp = torch.log_softmax(
        LLaMa.build(folder, max_seq_len=6, dtype="float32", device="cpu").model(torch.tensor(prompts), 0), -1
    )
    for b, toks in enumerate(prompts):
        expected = [0.0] + [logp[b, i - 1, toks[i]].item() for i in range(1, 6)]
        assert lps[b] == pytest.approx(expected, abs=1e-5)


def test_rows_stop_at_eos_and_generation_stops_when_all_rows_are_done(llm):
    calls = []

    def eos_everywhere(module, args, logits):
        calls.append(args[0].shape)
        logits[..., llm.tokenizer.eos_id] = 1e4
        return logits

    hook = llm.model.output.register_forward_hook(eos_everywhere)
    out, _ = llm.generate([[1, 5, 6], [1, 7]], 10, temperature=0)
    hook.remove()
    assert out == [[], []]
    # Steps at positions 2 (row 1's EOS) and 3 (row 0's EOS); then every row is done.
    assert len(calls) == 2


def test_max_gen_len_cuts_each_row_from_its_own_prompt(llm):
    out, _ = llm.generate([[1, 5], [1, 5, 6, 7, 8, 9]], 3, temperature=0)
    assert [len(t) for t in out] == [3, 3]


def test_text_completion_returns_tokens_texts_and_logprobs(llm):
    result = llm.text_completion(["the king", "gold"], temperature=0, max_gen_len=6, logprobs=True)
    tokens, texts = result
    assert isinstance(result, Completions) and result.tokens is tokens and result.texts is texts
    assert texts == [llm.tokenizer.decode(t) for t in tokens]
    assert [len(p) for p in result.logprobs] == [len(t) for t in tokens]
    assert llm.text_completion(["the king"], temperature=0, max_gen_len=6).logprobs is None
    echo_tokens, _ = llm.text_completion(["the king"], temperature=0, max_gen_len=6, echo=True)
    assert echo_tokens[0] == llm.tokenizer.encode("the king", bos=True, eos=False) + tokens[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt_tokens=[[1]] * 5), "5 prompts but max_batch_size=4"),
        (dict(prompt_tokens=[[1] * 50]), "prompt 0 has 50 tokens, 2 more than max_seq_len=48"),
        (dict(prompt_tokens=[]), "no prompts"),
        (dict(prompt_tokens=[[1], []]), "prompt 1 has no tokens"),
        (dict(temperature=-0.1), "temperature=-0.1"),
        (dict(top_p=0.0), r"top_p=0.0 is outside \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 is outside \(0, 1\]"),
        (dict(max_gen_len=0), "max_gen_len=0"),
        (dict(max_gen_len=3.5), "max_gen_len=3.5: ask for a whole number"),
        (dict(max_gen_len="5"), "max_gen_len='5'"),
        (dict(temperature="0.6"), "temperature='0.6'"),
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(top_p="0.9"), "top_p='0.9'"),
        (dict(top_p=float("nan")), "top_p=nan"),
        (dict(top_k=True), "top_k=True"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty=nan"),
        (dict(prompt_tokens=[[1, 96]]), r"prompt 0 holds id 96, outside the model's vocabulary 0..95"),
        (dict(prompt_tokens=[[1, -3]]), "prompt 0 holds id -3"),
        (dict(prompt_tokens=[1, 2, 3]), r"one flat list of ids: .*\[ids\] for one"),
        (dict(prompt_tokens=[(1, 2)]), "prompt 0 is tuple"),
        (dict(prompt_tokens=torch.tensor([[1, 2]])), "prompt_tokens is a Tensor"),
        (dict(prompt_tokens=[torch.tensor([1, 2])]), r"prompt 0 is Tensor .*\.tolist\(\)"),
        (dict(prompt_tokens=[[1, 2.0]]), "prompt 0 is list"),
    ],
)
def test_bad_generation_arguments_are_clear_errors(llm, kwargs, match):
    args = dict(prompt_tokens=[[1, 2]], max_gen_len=4) | kwargs
    with pytest.raises(ValueError, match=match):
        llm.generate(**args)


def test_text_completion_wants_a_list(llm):
    with pytest.raises(TypeError, match=r"wrap a single prompt as \[prompt\]"):
        llm.text_completion("the king")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_batch_size=2.0), "max_batch_size=2.0: use a whole number"),
        (dict(max_seq_len="abc"), "max_seq_len='abc': use a whole number"),
        (dict(max_seq_len=0), "max_seq_len=0: use a whole number, at least 1"),
        (dict(seed=None), "seed=None: use a whole number"),
    ],
)
def test_bad_build_arguments_are_clear_errors(make_ckpt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLaMa.build(make_ckpt()[0], device="cpu", **kwargs)


def test_random_weights_from_a_preset_without_a_checkpoint(sp_model_path, tmp_path, monkeypatch):
    import llama.loading

    assert llama.loading.preset_args("llama-2-7b").dim == 4096
    monkeypatch.setattr(llama.loading, "PRESETS_DIR", tmp_path)  # a 7B is too big for a unit test
    (tmp_path / "tiny.json").write_text('{"dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": -1}')
    llm = LLaMa.build("tiny", tokenizer_path=sp_model_path, load_model=False, max_seq_len=4, device="cpu")
    assert llm.model.params.dim == 32 and llm.model.vocab_size == 96
    assert len(llm.generate([[1, 2]], 2, temperature=0)[0][0]) == 2
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a preset; presets: .*llama-2-7b"):
        LLaMa.build("llama-9", load_model=False)
    with pytest.raises(ValueError, match="vocab_size -1, which is taken from the tokenizer"):
        LLaMa.build("llama-2-7b", load_model=False)


def test_generating_without_a_tokenizer_says_to_pass_one(tmp_path):
    """A params.json alone builds random weights with no tokenizer; generating needs one."""
    (tmp_path / "params.json").write_text('{"dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 64}')
    llm = LLaMa.build(tmp_path, load_model=False, max_seq_len=8, device="cpu")
    assert llm.tokenizer is None
    for call in (
        lambda: llm.generate([[1, 2]], 2),
        lambda: llm.text_completion(["the king"]),
        lambda: list(llm.complete_many([[1, 2]], max_gen_len=2)),
        lambda: llm.chat_completion([[{"role": "user", "content": "hi"}]]),
    ):
        with pytest.raises(ValueError, match="has no tokenizer .* tokenizer_path="):
            call()
    assert llm._generating.acquire(blocking=False)  # no call was left holding the cache


def test_random_weights_from_a_folder_are_seeded(make_ckpt):
    folder, _ = make_ckpt(MHA, 1)
    a = LLaMa.build(folder, load_model=False, dtype="float32", max_seq_len=8, seed=3)
    b = LLaMa.build(folder, load_model=False, dtype="float32", max_seq_len=8, seed=3)
    assert torch.equal(a.model.output.weight, b.model.output.weight)
    assert a.generate([[1, 2]], 4, temperature=0) == b.generate([[1, 2]], 4, temperature=0)


def test_one_generation_at_a_time_on_one_kv_cache(llm):
    """A second generation while one holds the cache is refused, never run over it; a stream that is
    exhausted or closed frees the object, and the first generation's output is unharmed."""
    alone = llm.text_completion(["the king"], temperature=0, max_gen_len=6).texts[0]
    first = llm.stream(["the king"], temperature=0, max_gen_len=6)
    shown = next(first).text
    for second in (
        lambda: llm.stream(["war"], max_gen_len=3),
        lambda: llm.text_completion(["war"], max_gen_len=3),
        lambda: llm.generate([[1, 2]], 3),
        lambda: llm.chat_completion([[{"role": "user", "content": "war"}]], max_gen_len=3),
    ):
        with pytest.raises(RuntimeError, match="already generating .*close\\(\\) the stream first"):
            second()
    assert shown + "".join(e.text for e in first) == alone  # exhausted: free again
    paused = llm.stream(["war"], max_gen_len=3)
    next(paused)
    paused.close()
    assert llm.text_completion(["the king"], temperature=0, max_gen_len=6).texts[0] == alone
    llm.stream(["war"], max_gen_len=3)  # never started, dropped: free again
    assert llm.generate([[1, 2]], 2, temperature=0)[0]


def test_a_generation_in_another_thread_holds_the_cache(llm):
    import threading

    started, go_on = threading.Event(), threading.Event()

    def pause(module, args, out):
        started.set()
        go_on.wait(timeout=30)

    handle = llm.model.output.register_forward_hook(pause)
    worker = threading.Thread(target=lambda: llm.text_completion(["the king"], max_gen_len=2))
    worker.start()
    assert started.wait(timeout=30)
    with pytest.raises(RuntimeError, match="already generating"):
        llm.text_completion(["war"], max_gen_len=2)
    go_on.set()
    worker.join(timeout=60)
    handle.remove()
    assert llm.text_completion(["war"], max_gen_len=2).texts  # free once the thread is done


def test_a_lone_surrogate_in_a_prompt_is_a_clear_error(llm):
    with pytest.raises(ValueError, match=r"holds '\\ud800' at index 1, half of a UTF-16 surrogate pair"):
        llm.text_completion(["a\ud800b"])


def test_answers_cut_by_max_seq_len_are_said_once(llm, caplog):
    with caplog.at_level("WARNING", logger="llama"):
        tokens, _ = llm.generate([[1] * 40], 20, temperature=0)
        llm.generate([[1] * 40], 20, temperature=0)
        llm.text_completion(["the king"])  # max_gen_len left to its default: no warning
    assert len(tokens[0]) <= 8
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "a 40-token prompt leaves room for 8 of max_gen_len=20 new tokens in max_seq_len=48: answers are cut "
        "there, as in Meta's code (build with max_seq_len=60 for all of them; said once)"
    ]


def test_a_copy_or_a_pickle_draws_what_the_original_draws_next(llm):
    """Their generators are copies: each draws the sequence the original would (the lock is made anew)."""
    import copy
    import pickle

    llm.text_completion(["the king"], max_gen_len=4)
    copies = [copy.deepcopy(llm), pickle.loads(pickle.dumps(llm))]
    want = llm.text_completion(["the king"], max_gen_len=6).texts
    assert [c.text_completion(["the king"], max_gen_len=6).texts for c in copies] == [want, want]
    assert pickle.loads(pickle.dumps(llm.tokenizer)).encode("the king", bos=True, eos=False) == llm.tokenizer.encode(
        "the king", bos=True, eos=False
    )
