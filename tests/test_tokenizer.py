"""The tokenizer wrapper, on a model trained here and on the real Llama 2 tokenizer when present."""

import pytest
from conftest import needs_shared

from llama import Tokenizer


def test_special_ids_and_bos_eos_flags(sp_model_path):
    tok = Tokenizer(sp_model_path)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (96, 1, 2, -1)
    ids = tok.encode("the king", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == "the king"
    assert tok.encode("the king", bos=False, eos=False) == ids[1:-1]


def test_bad_paths_and_types(tmp_path, sp_model_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer model at .*nope.model"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "tiktoken.model").write_text("IQ== 0\nIg== 1\n")  # Llama 3's format
    with pytest.raises(ValueError, match="is not a SentencePiece model.*tiktoken"):
        Tokenizer(tmp_path / "tiktoken.model")
    with pytest.raises(TypeError, match="encode takes a str"):
        Tokenizer(sp_model_path).encode(["x"], bos=True, eos=False)


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
