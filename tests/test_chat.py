"""Llama 2's chat format, id for id, against ids derived by hand from the format's definition."""

import pytest
from conftest import MHA, needs_shared

from llama import LLaMa, Tokenizer
from llama.chat import UNSAFE_ERROR, check_dialog, encode_dialog


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(needs_shared("tokenizer.model"))


def by_hand(tok: Tokenizer, turns: list[str], last: str) -> list[int]:
    """Each finished turn BOS + text + EOS, the last user turn BOS + text: encoded separately."""
    ids = []
    for text in turns:
        ids += [tok.bos_id] + tok.sp_model.encode(text) + [tok.eos_id]
    return ids + [tok.bos_id] + tok.sp_model.encode(last)


def test_one_turn(tok):
    dialog = [{"role": "user", "content": "  What is the capital of France?\n"}]
    ids = encode_dialog(tok, dialog)
    assert ids == by_hand(tok, [], "[INST] What is the capital of France? [/INST]")
    assert ids[:2] == [1, 518]  # BOS, "▁["
    assert ids[-1] != tok.eos_id


def test_one_turn_with_system(tok):
    dialog = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello "}]
    expected = "[INST] <<SYS>>\nAnswer in French.\n<</SYS>>\n\nHello [/INST]"
    assert encode_dialog(tok, dialog) == by_hand(tok, [], expected)


def test_two_and_three_turns(tok):
    two = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello! "},
        {"role": "user", "content": "How are you?"},
    ]
    assert encode_dialog(tok, two) == by_hand(tok, ["[INST] Hi [/INST] Hello! "], "[INST] How are you? [/INST]")
    three = (
        [{"role": "system", "content": "Be brief."}]
        + two
        + [{"role": "assistant", "content": "Fine."}, {"role": "user", "content": "Bye"}]
    )
    assert encode_dialog(tok, three) == by_hand(
        tok,
        ["[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! ", "[INST] How are you? [/INST] Fine. "],
        "[INST] Bye [/INST]",
    )
    ids = encode_dialog(tok, three)
    assert ids.count(tok.bos_id) == 3 and ids.count(tok.eos_id) == 2


@pytest.mark.parametrize(
    "dialog, match",
    [
        ([], "dialog 0 is empty"),
        ([{"role": "assistant", "content": "x"}], "message 0: expected role 'user', got 'assistant'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1: expected role 'assistant'"),
        ([{"role": "system", "content": "s"}, {"role": "system", "content": "t"}], "message 1: expected role 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "ends with 'assistant'"),
        ([{"role": "user"}], "message 0: expected"),
    ],
)
def test_role_order_errors_name_the_message(dialog, match):
    with pytest.raises(ValueError, match=match):
        check_dialog(dialog)


def test_special_tags_get_metas_error_reply_without_generating(make_ckpt):
    folder, _ = make_ckpt(MHA, 1)
    llm = LLaMa.build(folder, max_seq_len=64, dtype="float32")
    calls = []
    llm.model.output.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    dialogs = [[{"role": "user", "content": "the [INST] king"}], [{"role": "user", "content": "the king"}]]
    out = llm.chat_completion(dialogs, temperature=0, max_gen_len=4, logprobs=True)
    assert out[0] == {"generation": {"role": "assistant", "content": UNSAFE_ERROR}, "tokens": [], "logprobs": []}
    assert out[1]["generation"]["role"] == "assistant" and len(out[1]["tokens"]) == 4
    assert set(calls) == {1}  # only the safe dialog went through the model
    calls.clear()
    assert llm.chat_completion([dialogs[0]]) == [{"generation": {"role": "assistant", "content": UNSAFE_ERROR}}]
    assert calls == []
    with pytest.raises(ValueError, match="dialog 1, message 0"):
        llm.chat_completion([dialogs[1], [{"role": "bot", "content": "x"}]])
