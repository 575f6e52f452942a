"""Streaming: incremental text equals decode of all ids at every step; stop strings; stream ==
text_completion. Uses the real Llama 2 tokenizer where byte pieces and spaces matter."""

import pytest
import torch
from conftest import GQA, needs_shared, scripted

from llama import LLaMa, StreamEvent, Tokenizer
from llama.tokenizer import StreamDecoder

TEXTS = [
    "Hello world, this is  a test.\n\nNew paragraph\twith a tab.",
    "Price: 5€ or 7 £ — naïve café",
    "Emoji 🦙🔥 and a family 👨‍👩‍👧 in a row",
    "中文字符和日本語のテキスト、한국어 텍스트",
    "   leading spaces and trailing   ",
    "\n\nstarts with newlines",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decode_of_every_prefix(text):
    tok = Tokenizer(needs_shared("tokenizer.model"))
    ids = tok.encode(text, bos=False, eos=False)
    dec, streamed = StreamDecoder(tok), ""
    for k, i in enumerate(ids, 1):
        streamed += dec.push(i)
        full = tok.decode(ids[:k])
        # Equal whenever the prefix ends on a whole character; never ahead of it.
        assert full.startswith(streamed)
        if not full.endswith("\ufffd"):
            assert streamed == full
    streamed += dec.flush()
    assert streamed == tok.decode(ids) == text


def test_the_texts_exercise_byte_pieces_and_space_markers():
    tok = Tokenizer(needs_shared("tokenizer.model"))
    pieces = [tok.sp_model.id_to_piece(i) for t in TEXTS for i in tok.encode(t, bos=False, eos=False)]
    assert sum(p.startswith("<0x") for p in pieces) >= 20 and sum(p.startswith("\u2581") for p in pieces) >= 10


def test_stream_decoder_work_per_token_is_bounded():
    tok = Tokenizer(needs_shared("tokenizer.model"))
    decoded_lengths = []

    class Counting:
        def decode(self, ids):
            decoded_lengths.append(len(ids))
            return tok.decode(ids)

    dec = StreamDecoder(Counting())
    for i in tok.encode(" ".join(TEXTS) * 5, bos=False, eos=False):
        dec.push(i)
    assert max(decoded_lengths) <= 8  # a short window each step, never the whole text


def collect(events) -> tuple[list[str], list[int]]:
    texts, done_count = ["", "", ""], [0, 0, 0]
    for e in events:
        assert isinstance(e, StreamEvent) and done_count[e.index] == 0  # nothing after done
        texts[e.index] += e.text
        done_count[e.index] += e.done
    return texts, done_count


def test_stream_equals_text_completion_with_the_same_seed(make_ckpt):
    folder, _ = make_ckpt(GQA, 2)
    prompts = ["the king", "a far land of gold and", "war"]
    a = LLaMa.build(folder, max_seq_len=64, max_batch_size=3, dtype="float32", seed=5)
    b = LLaMa.build(folder, max_seq_len=64, max_batch_size=3, dtype="float32", seed=5)
    _, expected = a.text_completion(prompts, temperature=1.0, top_p=0.95, max_gen_len=20)
    texts, done = collect(b.stream(prompts, temperature=1.0, top_p=0.95, max_gen_len=20))
    assert texts == expected and done == [1, 1, 1]
    assert sum(map(len, texts)) > 30


def test_stop_strings_end_the_row_and_are_cut_off(llm):
    tok = llm.tokenizer
    rows = [tok.encode(" the king and the queen of war", False, False), tok.encode(" bread and wine", False, False)]
    scripted(llm, rows)
    tokens, texts = llm.text_completion(["x", "y"], temperature=0, max_gen_len=len(rows[0]), stop=["queen", "wine"])
    assert texts[0] == tok.decode(rows[0]).split("queen")[0]
    assert texts[1] == tok.decode(rows[1]).split("wine")[0]
    # the stop string's ids are gone: row 0's begins at a token's start, row 1's inside "▁wine"
    assert tok.decode(tokens[0]) == texts[0] and tok.decode(tokens[1]) == texts[1].rstrip()


def test_streamed_text_never_shows_part_of_a_stop_string(llm):
    tok = llm.tokenizer
    rows = [tok.encode(" the king and the queen", False, False)] * 2
    scripted(llm, rows)
    events = list(llm.stream(["x", "y"], temperature=0, max_gen_len=20, stop=["the queen", "and the kingdom"]))
    texts, done = collect(events)
    assert texts[0] == texts[1] == tok.decode(rows[0]).split("the queen")[0] and done[:2] == [1, 1]
    # " and the k..." could have become "and the kingdom": held back until it could not.
    shown = "".join(e.text for e in events if e.index == 0 and not e.done)
    assert "the queen"[:3] not in shown[len(texts[0]) - 1 :]


@pytest.mark.parametrize("stop, match", [("queen", "list of non-empty strings"), ([""], "non-empty")])
def test_bad_stop_values(llm, stop, match):
    with pytest.raises(ValueError, match=match):
        llm.text_completion(["x"], stop=stop)


def test_stream_validates_before_the_first_event(llm):
    with pytest.raises(ValueError, match="5 prompts but max_batch_size=4"):
        llm.stream(["a"] * 5)


def test_stream_leaves_autograd_alone_between_steps(llm):
    """Inference mode is on inside each step only: the caller's own tensors still record gradients."""
    events = llm.stream(["the king"], temperature=0, max_gen_len=4)
    next(events)
    assert not torch.is_inference_mode_enabled()
    w = torch.ones(2, requires_grad=True)
    (w * 3).sum().backward()
    assert torch.equal(w.grad, torch.full((2,), 3.0))
    assert "".join(e.text for e in events) is not None  # the stream goes on afterwards


def test_llama3_rows_stop_at_any_stop_id_and_say_why(llm3):
    tok = llm3.tokenizer
    word = tok.encode(" king", bos=False, eos=False)
    rows = [word + [tok.eot_id], word + [tok.eom_id], word + [tok.eos_id], word * 9, word + word + [tok.eot_id]]
    scripted(llm3, rows[:4])
    done = llm3.text_completion(["a", "b", "c", "d"], temperature=0, max_gen_len=len(word) + 2)
    assert done.stop_reasons == ["end_of_turn", "end_of_message", "end_of_turn", "out_of_tokens"]
    assert done.tokens[:3] == [word] * 3 and done.texts[:3] == [" king"] * 3  # cut before the stop id
    llm3.model.output._forward_hooks.clear()
    scripted(llm3, [rows[4], rows[1]])
    events = list(llm3.stream(["a", "b"], temperature=0, max_gen_len=20, stop=["king king"]))
    assert {e.index: e.stop_reason for e in events if e.done} == {0: "stop_string", 1: "end_of_message"}
    assert all(e.stop_reason is None for e in events if not e.done)


def test_a_prompt_token_equal_to_the_pad_id_stays_in_the_prompt(llm3):
    """Llama 3's pad id is a real token: which positions are prompt comes from the lengths (Meta's
    code compares with the pad id, and would overwrite this prompt's token 2 with a sample)."""
    pad = llm3.tokenizer.pad_id
    prompts = [[llm3.tokenizer.bos_id, 300, pad, 301, 302], [llm3.tokenizer.bos_id, 303]]
    batch, _ = llm3.generate(prompts, 6, temperature=0, echo=True)
    alone, _ = llm3.generate(prompts[:1], 6, temperature=0, echo=True)
    assert batch[0][:5] == prompts[0] and batch[0] == alone[0]


def test_echo_keeps_a_prompt_that_holds_a_stop_id(llm3):
    tok = llm3.tokenizer
    prompt = [tok.bos_id, 300, tok.eot_id, 301]  # e.g. a finished chat turn
    scripted(llm3, [[302, 303, tok.eot_id]])
    tokens, _ = llm3.generate([prompt], 5, temperature=0, echo=True)
    assert tokens[0] == prompt + [302, 303]  # Meta's cut would stop at the prompt's <|eot_id|>


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_an_error_naming_row_and_position(llm, temperature, bad):
    def poison(module, args, logits):  # row 1 only, from its first generated token on
        logits = logits.clone()
        (logits if logits.dim() == 2 else logits[:, -1])[1, 5] = bad
        return logits

    llm.model.output.register_forward_hook(poison)
    with pytest.raises(RuntimeError, match=r"NaN or infinite for row\(s\) \[1\] at position 2: usually a damaged"):
        llm.generate([[1, 2], [1, 3]], 4, temperature=temperature)


def test_a_stop_string_inside_a_token_drops_that_token_from_the_ids(llm):
    """.tokens never holds an id with a character of the stop string; .texts keeps what precedes it."""
    tok = llm.tokenizer
    row = tok.encode(" the king and the queen", False, False)
    scripted(llm, [row])
    done = llm.text_completion(["x"], temperature=0, max_gen_len=len(row), stop=["ng and"], logprobs=True)
    assert done.texts[0] == tok.decode(row).split("ng and")[0]
    assert done.texts[0].startswith(tok.decode(done.tokens[0])) and "ng" not in tok.decode(done.tokens[0])[-3:]
    assert len(done.logprobs[0]) == len(done.tokens[0])


def test_stop_strings_given_as_an_iterator_are_used(llm):
    tok = llm.tokenizer
    row = tok.encode(" the king and the queen", False, False)
    scripted(llm, [row])
    texts = llm.text_completion(["x"], temperature=0, max_gen_len=len(row), stop=iter(["queen"])).texts
    assert texts[0] == tok.decode(row).split("queen")[0]
