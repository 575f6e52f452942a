"""Code Llama's infilling: the prompt layout against ids derived by hand, Meta's suffix encoding
without a leading space, text_infilling's stop at ▁<EOT>, and the CLI's infill command."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MHA, scripted

from llama import LLaMa, Tokenizer
from llama.infilling import infilling_prompt

PRE, SUF, MID, EOT = 32007, 32008, 32009, 32010  # Code Llama 7B/13B's ids
CODELLAMA = dict(MHA, vocab_size=32016)


@pytest.fixture
def llm(make_ckpt, codellama_tokenizer_path) -> LLaMa:
    folder, _ = make_ckpt(CODELLAMA, 2, tokenizer=codellama_tokenizer_path)
    return LLaMa.build(folder, max_seq_len=64, max_batch_size=2, dtype="float32")


def test_pieces_and_the_suffix_without_a_leading_space(codellama_tokenizer_path):
    tok = Tokenizer(codellama_tokenizer_path)
    assert (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id, tok.n_words) == (PRE, SUF, MID, EOT, 32016)
    assert tok.decode(tok.encode("king", bos=False, eos=False)) == "king"
    assert tok.sp_model.id_to_piece(tok.encode("king", bos=False, eos=False)[0]).startswith("▁")  # a leading space
    infill = tok.encode_infilling("king")
    assert not tok.sp_model.id_to_piece(infill[0]).startswith("▁") and tok.decode(infill) == "king"
    assert tok.decode_infilling(tok.encode(" and the king", bos=False, eos=False)) == " and the king"


def test_prompt_layouts_by_hand(codellama_tokenizer_path):
    tok = Tokenizer(codellama_tokenizer_path)
    pre, suf = tok.encode("the king", bos=False, eos=False), tok.encode_infilling(" of a far land")
    assert infilling_prompt(tok, "the king", " of a far land") == [tok.bos_id, PRE, *pre, SUF, *suf, MID]
    spm = infilling_prompt(tok, "the king", " of a far land", suffix_first=True)
    assert spm == [tok.bos_id, PRE, SUF, *suf, MID, *pre]


def test_text_infilling_writes_the_middle_and_stops_at_eot(llm):
    tok = llm.tokenizer
    seen, middle = [], tok.encode(" and queen", bos=False, eos=False)
    scripted(llm, [middle + [tok.eos_id, EOT], middle + [EOT]])  # Meta's infilling ends at <EOT> only
    llm.model.tok_embeddings.register_forward_hook(lambda m, a, out: seen.append(a[0].tolist()))
    out = llm.text_infilling(
        ["the king"] * 2, [" spoke"] * 2, temperature=0, max_gen_len=len(middle) + 1, logprobs=True
    )
    assert seen[0] == [infilling_prompt(tok, "the king", " spoke")] * 2  # the prompt, in one pass
    assert out[1]["generation"] == " and queen" and out[1]["full_text"] == "the king and queen spoke"
    pieces = [tok.sp_model.id_to_piece(t) for t in middle]  # Code Llama's token_piece, as its code returns them
    assert out[1]["tokens"] == pieces and len(out[1]["logprobs"]) == len(middle)
    assert out[0]["tokens"] == pieces + ["</s>"]  # EOS did not end the middle: max_gen_len did


def test_infilling_needs_code_llamas_pieces(make_ckpt):
    folder, _ = make_ckpt(MHA)
    llm = LLaMa.build(folder, max_seq_len=16, dtype="float32")
    with pytest.raises(ValueError, match="no infilling pieces .*Code Llama 7B or 13B"):
        llm.text_infilling(["a"], ["b"])


def test_infill_command(llm, make_ckpt, codellama_tokenizer_path):
    folder, _ = make_ckpt(CODELLAMA, 1, name="cli", tokenizer=codellama_tokenizer_path)
    run = [
        sys.executable,
        str(Path(__file__).resolve().parents[1] / "inference.py"),
        "infill",
        "--ckpt_dir",
        str(folder),
    ]
    args = ["--prefix", "the king", "--suffix", " of, a far land", "--temperature", "0", "--max_gen_len", "5"]
    r = subprocess.run(run + args, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    expected = LLaMa.build(folder, max_seq_len=2048, max_batch_size=1).text_infilling(
        ["the king"], [" of, a far land"], temperature=0, max_gen_len=5
    )[0]["full_text"]
    assert expected in r.stdout
