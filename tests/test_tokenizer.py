"""Both tokenizers: SentencePiece (a model trained here, the real Llama 2 one when present) and
Llama 3's tiktoken BPE (a file made here, the real one when present, against Hugging Face's reading
of the same file); which kind is read from the file's contents; streaming of byte-level pieces."""

import pytest
from conftest import needs_shared

from llama import Tokenizer
from llama.tokenizer import SentencePieceTokenizer, StreamDecoder, TiktokenTokenizer, split_runs


def test_special_ids_and_bos_eos_flags(sp_model_path):
    tok = Tokenizer(sp_model_path)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (96, 1, 2, -1)
    ids = tok.encode("the king", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == "the king"
    assert tok.encode("the king", bos=False, eos=False) == ids[1:-1]


def test_bad_paths_and_types(tmp_path, sp_model_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer model at .*nope.model"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_bytes(b"\x00\x01 not a tokenizer")
    with pytest.raises(ValueError, match="junk.model is neither a SentencePiece model .* nor a tiktoken BPE file"):
        Tokenizer(tmp_path / "junk.model")
    (tmp_path / "broken.model").write_text("IQ== 0\nIg== 1\n@@@ 2\n")
    with pytest.raises(ValueError, match=r"broken.model:3 is not a tiktoken line"):
        Tokenizer(tmp_path / "broken.model")
    (tmp_path / "gap.model").write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(ValueError, match="the ranks are not 0..1 once each"):
        Tokenizer(tmp_path / "gap.model")
    (tmp_path / "cut.model").write_text("aGVsbG8= 0\n")  # "hello" alone: tiktoken panicked at encode("xyz")
    with pytest.raises(ValueError, match="cut.model lacks 256 of the 256 single-byte tokens"):
        Tokenizer(tmp_path / "cut.model")
    with pytest.raises(TypeError, match="encode takes a str"):
        Tokenizer(sp_model_path).encode(["x"], bos=True, eos=False)


def test_the_kind_comes_from_the_contents_not_the_name(tmp_path, sp_model_path, tiktoken_path):
    (tmp_path / "a.bin").write_bytes(tiktoken_path.read_bytes())
    (tmp_path / "b.txt").write_bytes(sp_model_path.read_bytes())
    assert isinstance(Tokenizer(tmp_path / "a.bin"), TiktokenTokenizer)
    assert isinstance(Tokenizer(tmp_path / "b.txt"), SentencePieceTokenizer)


def test_llama3_special_ids_follow_the_ranks(tiktoken_path):
    tok = Tokenizer(tiktoken_path)
    base = tok.n_words - 256  # 256 bytes + 48 merges here; 128,000 in Meta's file
    expected = {
        "<|begin_of_text|>": 0,
        "<|end_of_text|>": 1,
        "<|reserved_special_token_0|>": 2,
        "<|finetune_right_pad_id|>": 4,
        "<|start_header_id|>": 6,
        "<|end_header_id|>": 7,
        "<|eom_id|>": 8,
        "<|eot_id|>": 9,
        "<|python_tag|>": 10,
        "<|reserved_special_token_2|>": 12,
        "<|reserved_special_token_245|>": 255,
    }
    assert {name: tok.special_tokens[name] - base for name in expected} == expected
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (base, base + 1, base + 4)
    assert tok.stop_ids == (base + 1, base + 8, base + 9)
    ids = tok.encode("the king<|eot_id|>", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.eot_id not in ids  # text, not the special id
    assert tok.decode(ids[1:-1]) == "the king<|eot_id|>"
    assert tok.decode([tok.eot_id]) == "<|eot_id|>"


@pytest.mark.parametrize("which", ["made here", "Meta's"])
def test_long_runs_are_cut_as_metas_code_cuts_them(which, tiktoken_path):
    assert list(split_runs("aaaaa  b", 3)) == ["aaa", "aa  b"]
    assert list(split_runs("   x", 2)) == ["  ", " x"]
    assert list(split_runs("", 5)) == [""]
    tok = Tokenizer(tiktoken_path if which == "made here" else needs_shared("llama3/tokenizer.model"))
    # a run of over 25,000 characters, whose cut falls inside a token of the whole string's encoding
    text = ("xx" if which == "made here" else "x") + "the" * 9_000 + "  " + "the " * 10
    pieces = list(split_runs(text, 25_000))
    assert [len(p) for p in pieces] == [25_000, len(text) - 25_000]
    assert tok.encode(text, bos=False, eos=False) == [i for p in pieces for i in tok.model.encode(p)]
    assert tok.encode(text, bos=False, eos=False) != tok.model.encode(text)  # the cut changes the ids


def test_real_llama2_tokenizer_facts():
    tok = Tokenizer(needs_shared("tokenizer.model"))
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, -1)
    assert tok.encode("", bos=False, eos=False) == []
    assert tok.encode(" ", bos=False, eos=False) == [259]
    assert tok.encode("\n", bos=False, eos=False) == [29871, 13]
    assert tok.encode("Hello", bos=True, eos=False) == [1, 15043]
    for s in ("Hello world", "naïve café, 2024!", "多语言 🦙"):
        assert tok.decode(tok.encode(s, bos=True, eos=True)) == s


def test_vocab_size_minus_one_takes_the_real_tokenizer_size(tmp_path):
    import json

    from conftest import write_checkpoint

    from llama import LLaMa

    real = needs_shared("tokenizer.model")
    params = dict(dim=32, n_layers=1, n_heads=2, vocab_size=32000, multiple_of=16, norm_eps=1e-5)
    write_checkpoint(tmp_path / "m", params, n_shards=2)
    (tmp_path / "m" / "params.json").write_text(json.dumps(dict(params, vocab_size=-1)))
    llm = LLaMa.build(tmp_path / "m", tokenizer_path=real, max_seq_len=16, dtype="float32")
    assert llm.model.params.vocab_size == 32000 == llm.model.output.weight.shape[0]
    tokens, texts = llm.text_completion(["Hello"], temperature=0, max_gen_len=3)
    assert len(tokens[0]) == 3 and texts[0] == llm.tokenizer.decode(tokens[0])


HARD_TEXTS = [
    "Hello world",
    "  leading, trailing  \t\n\n  spaces   ",
    "numbers 1234567890 3.14159 -42 1e-5 0x1F",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # code\n",
    "emoji 🦙🔥👩‍👩‍👧 and flags 🇫🇷",
    "中文 日本語のテキスト 한국어",
    "עברית ومن العربية mixed",
    "combining: e\u0301 a\u0308 n\u0303, Zalgo: Z\u0351\u0352a",
    "specials as text: <|begin_of_text|><|eot_id|> <|start_header_id|>user<|end_header_id|>",
    "CAPS'S don't I'LL we'd they've",
]


def hf_reading(path):
    """Hugging Face's own BPE built from the same tiktoken file (no special tokens: text stays text)."""
    pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    return TikTokenConverter(vocab_file=str(path), extra_special_tokens=[]).converted()


def test_real_llama3_tokenizer_encodes_as_hugging_faces_reading_of_it():
    path = needs_shared("llama3/tokenizer.model")
    tok, theirs = Tokenizer(path), hf_reading(path)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (128256, 128000, 128001, 128004)
    assert tok.stop_ids == (128001, 128008, 128009) and tok.special_tokens["<|python_tag|>"] == 128010
    assert tok.encode("Hello world", bos=True, eos=False) == [128000, 9906, 1917]
    for text in HARD_TEXTS:
        ours = tok.encode(text, bos=False, eos=False)
        assert ours == theirs.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ours) == text


def test_tiktoken_file_made_here_encodes_as_hugging_faces_reading_of_it(tiktoken_path):
    tok, theirs = Tokenizer(tiktoken_path), hf_reading(tiktoken_path)
    for text in HARD_TEXTS + ["the king and queen of a far land spoke to their people"]:
        assert tok.encode(text, bos=False, eos=False) == theirs.encode(text, add_special_tokens=False).ids, text


@pytest.mark.parametrize("which", ["made here", "Meta's"])
def test_streamed_byte_pieces_never_show_a_broken_character(which, tiktoken_path):
    path = tiktoken_path if which == "made here" else needs_shared("llama3/tokenizer.model")
    tok = Tokenizer(path)
    for text in HARD_TEXTS:
        ids = tok.encode(text, bos=False, eos=False)
        stream, shown = StreamDecoder(tok), ""
        for n, token in enumerate(ids, 1):
            shown += stream.push(token)
            assert "\ufffd" not in shown and tok.decode(ids[:n]).startswith(shown)
        assert shown + stream.flush() == text
    # some ids alone are part of a character: decoding each id on its own would show U+FFFD
    assert any("\ufffd" in tok.decode([i]) for text in HARD_TEXTS for i in tok.encode(text, False, False))


def test_streaming_keeps_the_spaces_a_text_start_would_drop(sp_model_path):
    """A model trained with SentencePiece's default remove_extra_whitespaces drops every leading
    space of a text: a window decoded alone lost the spaces between words."""
    tok = Tokenizer(sp_model_path)
    space, a = tok.sp_model.piece_to_id("▁"), tok.sp_model.piece_to_id("▁a")
    assert tok.decode([space, a]) == "a"
    ids = [*tok.encode("king", bos=False, eos=False), space, a, space, space, a]
    stream = StreamDecoder(tok)
    shown = "".join(stream.push(i) for i in ids) + stream.flush()
    assert shown == tok.decode(ids) and "g  a   a" in shown
