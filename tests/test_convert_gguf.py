"""GGUF <-> Meta: round trips within each type's quantization error, logits equal to llama.cpp's own
on the same file, and a tokenizer.model rebuilt from GGUF metadata that encodes like the original."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    GQA,
    LLAMA3,
    MHA,
    THETA,
    corpus,
    needs_shared,
    random_state_dict,
    tokens,
    train_sentencepiece,
    write_checkpoint,
)

from llama.checkpoint import md5
from llama.convert.gguf import gguf_to_meta_folder, meta_folder_to_gguf, read_gguf, write_gguf
from llama.convert.hf import permute_rope
from llama.generation import LLaMa
from llama.loading import load_meta_folder
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
pytest.importorskip("google.protobuf")
REPO = Path(__file__).resolve().parents[1]
TEXTS = ["the king and queen", "  two  spaces, then one ", "new\nlines\n\nand\ttabs", "a llama 🦙, ünïcödé", ""]


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> Path:
    """conftest's, with Llama's normalizer (none) in place of NFKC, for make_ckpt in this module: the
    gguf package reads an NFKC model's 240 KB precompiled_charsmap element by element, for seconds."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_sentencepiece(path, corpus(), 96, normalization_rule_name="identity", remove_extra_whitespaces=False)


def error_bound(w: torch.Tensor, tensor_type: str) -> torch.Tensor:
    """Per-element bound on |dequantized - w| for llama.cpp's blocks of 32 with one fp16 scale d.

    Q8_0: d = max|x|/127 and q = round(x/d), so rounding costs d/2. Q4_0: d = m/-8 for m the
    block's largest-magnitude value and q = trunc(x/d + 8.5) clipped to [0, 15], so rounding costs
    |d|/2 except where x/d > 7.5 (opposite sign to m, nearly as large), clipped by up to |d|.
    Storing d in fp16 (relative error 2^-11) adds |q| * |d| * 2^-11 with |q| <= 127 or 8.
    """
    blocks = w.reshape(-1, 32).abs().amax(dim=1, keepdim=True)
    d, rounding, q_max = (blocks / 127, 0.5, 127) if tensor_type == "Q8_0" else (blocks / 8, 1.0, 8)
    return (d * (rounding + q_max * 2**-11) + 1e-7).expand(-1, 32).reshape(w.shape)


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "BF16", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("params, n_shards", [(MHA, 1), (GQA, 2)], ids=["mha", "gqa-2-shards"])
def test_meta_to_gguf_to_meta_within_the_types_error(make_ckpt, tmp_path, params, n_shards, tensor_type):
    folder, original = make_ckpt(params, n_shards)
    path = meta_folder_to_gguf(folder, tmp_path / "model.gguf", tensor_type)
    state_dict, args, _ = read_gguf(path)
    assert args.to_params() == ModelArgs.from_params(params).to_params()
    assert state_dict.keys() == original.keys()
    for key, w in original.items():
        back = state_dict[key]
        assert back.shape == w.shape, key
        if w.dim() == 1 or tensor_type == "F32":  # norms are always float32
            assert torch.equal(back, w), key
        elif tensor_type == "BF16":
            assert torch.equal(back, w.bfloat16()), key
        elif tensor_type == "F16" or w.shape[1] % 32:  # rows that are not whole blocks fall back to F16
            assert torch.equal(back, w.half()), key
        else:
            assert back.dtype == torch.float32
            assert ((back - w).abs() <= error_bound(w, tensor_type)).all(), key

    out = gguf_to_meta_folder(path, tmp_path / "back", n_shards=n_shards, dtype="float32")
    assert json.loads((out / "params.json").read_text()) == ModelArgs.from_params(params).to_params()
    assert len(list(out.glob("consolidated.*.pth"))) == n_shards
    checklist = dict(reversed(line.split()) for line in (out / "checklist.chk").read_text().splitlines())
    assert checklist == {p.name: md5(p) for p in out.iterdir() if p.name != "checklist.chk"}
    assert "tokenizer.model" in checklist


def test_feed_forward_length_alone_gives_params_that_reproduce_it(make_ckpt, tmp_path):
    """llama.cpp's own files carry no multiple_of: then any sizing that reproduces the length will do."""
    folder, _ = make_ckpt(GQA)
    data = meta_folder_to_gguf(folder, tmp_path / "model.gguf", "F32").read_bytes()
    for key in (b"meta.multiple_of", b"meta.ffn_dim_multiplier"):  # renamed in place: keys nobody reads
        assert data.count(key) == 1
        data = data.replace(key, key.replace(b"meta.", b"xxxx."))
    (tmp_path / "plain.gguf").write_bytes(data)
    _, args, _ = read_gguf(tmp_path / "plain.gguf")
    assert args.ffn_hidden_dim == ModelArgs.from_params(GQA).ffn_hidden_dim
    assert (args.multiple_of, args.ffn_dim_multiplier) != (GQA["multiple_of"], GQA["ffn_dim_multiplier"])


def test_tied_embeddings_come_back_as_two_equal_matrices(make_ckpt, tmp_path):
    """llama.cpp's converter leaves out output.weight when a model ties it to the embedding."""
    folder, original = make_ckpt(MHA)
    del original["output.weight"]
    tokenizer = Tokenizer(folder / "tokenizer.model")
    path = write_gguf(original, ModelArgs.from_params(MHA), tokenizer, tmp_path / "tied.gguf", "F32")
    state_dict, _, _ = read_gguf(path)
    assert torch.equal(state_dict["output.weight"], original["tok_embeddings.weight"])


def llama_cpp(path: Path, n_ctx: int):
    """llama.cpp on the file, with a float32 KV cache so that its only differences are its kernels."""
    module = pytest.importorskip("llama_cpp")
    f32 = module.GGML_TYPE_F32
    return module.Llama(
        str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, logits_all=True, verbose=False, type_k=f32, type_v=f32
    )


def llama_cpp_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    theirs = llama_cpp(path, 64)
    theirs.eval(ids.tolist())
    logits = torch.from_numpy(np.array(theirs.scores[: len(ids)]))
    theirs.close()
    return logits


@pytest.mark.parametrize("params", [MHA, GQA, THETA], ids=["mha", "gqa", "theta1e6"])
def test_logits_equal_llama_cpp_on_the_same_file(make_ckpt, tmp_path, params):
    folder, original = make_ckpt(params)
    path = meta_folder_to_gguf(folder, tmp_path / "model.gguf", "F32")
    ids = tokens(params["vocab_size"], 1, 16)[0]
    expected = llama_cpp_logits(path, ids)

    model = Transformer(ModelArgs.from_params(params))
    model.load_state_dict(original)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[None])[0], expected, atol=1e-4, rtol=0)
        # The check has teeth: Hugging Face's row order for wq/wk gives other logits.
        args = model.params
        for i, layer in enumerate(model.layers):
            layer.attention.wq.weight.copy_(permute_rope(original[f"layers.{i}.attention.wq.weight"], args.n_heads))
            layer.attention.wk.weight.copy_(permute_rope(original[f"layers.{i}.attention.wk.weight"], args.kv_heads))
        assert (model(ids[None])[0] - expected).abs().max() > 1e-2


def tokenizer_round_trip(model_path: Path, tmp_path: Path) -> tuple[Tokenizer, Tokenizer]:
    original = Tokenizer(model_path)
    params = dict(MHA, n_layers=1, vocab_size=original.n_words)
    args = ModelArgs.from_params(params)
    path = write_gguf(random_state_dict(params), args, original, tmp_path / "vocab.gguf", "F16")
    (tmp_path / "rebuilt.model").write_bytes(read_gguf(path)[2])
    return original, Tokenizer(tmp_path / "rebuilt.model")


def assert_same_tokenizer(original: Tokenizer, rebuilt: Tokenizer) -> None:
    a, b = original.sp_model, rebuilt.sp_model
    assert [a.id_to_piece(i) for i in range(a.vocab_size())] == [b.id_to_piece(i) for i in range(b.vocab_size())]
    assert [a.get_score(i) for i in range(a.vocab_size())] == [b.get_score(i) for i in range(b.vocab_size())]
    for is_kind in ("is_unknown", "is_control", "is_unused", "is_byte"):
        assert all(getattr(a, is_kind)(i) == getattr(b, is_kind)(i) for i in range(a.vocab_size())), is_kind
    assert (a.unk_id(), a.bos_id(), a.eos_id(), a.pad_id()) == (b.unk_id(), b.bos_id(), b.eos_id(), b.pad_id())
    for text in TEXTS:
        ids = original.encode(text, bos=True, eos=True)
        assert rebuilt.encode(text, bos=True, eos=True) == ids, text
        assert rebuilt.decode(ids) == original.decode(ids), text


def test_tokenizer_from_gguf_equals_the_in_process_ones(sp_model_path, tmp_path):
    """Llama's normalizer (none) and SentencePiece's default one (NFKC, extra spaces removed)."""
    assert_same_tokenizer(*tokenizer_round_trip(sp_model_path, tmp_path))
    assert_same_tokenizer(*tokenizer_round_trip(train_sentencepiece(tmp_path / "nfkc.model", corpus(), 96), tmp_path))


def test_tokenizer_from_gguf_equals_a_llama_style_one(tmp_path):
    """Llama's options: byte fallback, no normalization, spaces kept; plus a user-defined piece."""
    path = train_sentencepiece(
        tmp_path / "llama-style.model",
        corpus(),
        320,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["<tool>"],
    )
    original, rebuilt = tokenizer_round_trip(path, tmp_path)
    assert_same_tokenizer(original, rebuilt)
    assert rebuilt.sp_model.encode("🦙") == original.sp_model.encode("🦙") != [rebuilt.sp_model.unk_id()]
    assert rebuilt.encode("the <tool>", bos=False, eos=False) == original.encode("the <tool>", bos=False, eos=False)


def test_tokenizer_from_gguf_equals_llama_2s(tmp_path):
    assert_same_tokenizer(*tokenizer_round_trip(needs_shared("tokenizer.model"), tmp_path))


def test_build_on_a_converted_folder_generates_the_same_ids(make_ckpt, tmp_path):
    folder, _ = make_ckpt(GQA)
    converted = gguf_to_meta_folder(meta_folder_to_gguf(folder, tmp_path / "model.gguf", "F32"), tmp_path / "back")
    prompts = ["the king", "gold and silver"]
    runs = []
    for path in (folder, converted):
        llm = LLaMa.build(path, device="cpu", dtype="float32", max_seq_len=32, max_batch_size=2)
        runs.append(llm.text_completion(prompts, temperature=0, max_gen_len=6).tokens)
    assert runs[0] == runs[1]
    assert torch.load(converted / "consolidated.00.pth")["output.weight"].dtype == torch.bfloat16  # the default


def test_build_takes_a_gguf_file_alone(make_ckpt, tmp_path):
    folder, _ = make_ckpt(GQA, 2)
    (tmp_path / "alone").mkdir()
    gguf_file = meta_folder_to_gguf(folder, tmp_path / "alone" / "model.gguf", "F32")
    prompts = ["the king", "gold and silver"]
    runs = [
        LLaMa.build(path, dtype="float32", max_seq_len=32, max_batch_size=2).text_completion(
            prompts, temperature=0, max_gen_len=6
        )
        for path in (folder, gguf_file)  # the GGUF's own vocabulary is the tokenizer: nothing beside it
    ]
    assert runs[0] == runs[1] and list(gguf_file.parent.iterdir()) == [gguf_file]
    upper = gguf_file.rename(gguf_file.with_name("MODEL.GGUF"))  # the suffix in any case
    llm = LLaMa.build(upper, dtype="float32", max_seq_len=32, max_batch_size=2)
    assert llm.text_completion(prompts, temperature=0, max_gen_len=6) == runs[1]
    with pytest.raises(FileNotFoundError, match="no GGUF file at .*nowhere.gguf"):
        LLaMa.build(tmp_path / "nowhere.gguf")
    with pytest.raises(ValueError, match="MODEL.GGUF is a GGUF file, not a Meta folder: .* in one process"):
        load_meta_folder(upper)  # as torchrun's processes open their source
    q8 = LLaMa.build(meta_folder_to_gguf(folder, tmp_path / "q8.gguf", "Q8_0"), dtype="bf16", max_seq_len=32)
    assert q8.model.output.weight.dtype == torch.bfloat16


def tiny_gguf(path: Path, architecture: str = "llama", vocabulary: str | None = "llama") -> Path:
    """Just enough of a GGUF file for read_gguf to reach the check under test."""
    writer = gguf.GGUFWriter(path, architecture)
    if vocabulary is not None:
        writer.add_tokenizer_model(vocabulary)
        writer.add_token_list(["<unk>", "<s>", "</s>", "a"])
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return path


def test_foreign_unsupported_and_damaged_files_are_clear_errors(make_ckpt, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        read_gguf(tmp_path / "nowhere.gguf")
    with pytest.raises(ValueError, match="holds a 'gpt2' model: only general.architecture 'llama'"):
        read_gguf(tiny_gguf(tmp_path / "gpt2.gguf", architecture="gpt2"))
    with pytest.raises(ValueError, match="0 special tokens .*a Llama 3 vocabulary has 256"):
        read_gguf(tiny_gguf(tmp_path / "gpt2-vocab.gguf", vocabulary="gpt2"))  # a byte-level BPE, but not Llama 3's
    with pytest.raises(ValueError, match="'bert' vocabulary: only SentencePiece .* and Llama 3's byte-level BPE"):
        read_gguf(tiny_gguf(tmp_path / "bert-vocab.gguf", vocabulary="bert"))
    with pytest.raises(ValueError, match="no-vocab.gguf lacks tokenizer.ggml.tokens"):
        read_gguf(tiny_gguf(tmp_path / "no-vocab.gguf", vocabulary=None))
    whole = tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[: len(whole) - 100])
    with pytest.raises(ValueError, match="cannot read .*cut.gguf as GGUF .*truncated"):
        read_gguf(tmp_path / "cut.gguf")

    folder, _ = make_ckpt(MHA)
    tokenizer = Tokenizer(folder / "tokenizer.model")
    # A type llama.cpp has but the gguf package cannot dequantize (Q8_K), for the embedding.
    wide = dict(MHA, dim=256, n_layers=1)  # rows of 256: one Q8_K block each
    q8_k, add_tensor = gguf.GGMLQuantizationType.Q8_K, gguf.GGUFWriter.add_tensor

    def q8_k_embedding(writer, name, tensor, raw_dtype=None):
        if name == "token_embd.weight":
            tensor, raw_dtype = np.zeros((tensor.shape[0], gguf.GGML_QUANT_SIZES[q8_k][1]), np.uint8), q8_k
        add_tensor(writer, name, tensor, raw_dtype=raw_dtype)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", q8_k_embedding)
    path = write_gguf(random_state_dict(wide), ModelArgs.from_params(wide), tokenizer, tmp_path / "q8_k.gguf", "F32")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="token_embd.weight has type Q8_K, which the gguf package cannot dequantize"):
        read_gguf(path)

    data = meta_folder_to_gguf(folder, tmp_path / "model.gguf", "Q8_0").read_bytes()
    for size in (0, 10, len(data) // 2, len(data) - 100):
        (tmp_path / "cut.gguf").write_bytes(data[:size])
        with pytest.raises(ValueError, match=r"cannot read .*cut.gguf as GGUF \(.*\): it is truncated, corrupt"):
            read_gguf(tmp_path / "cut.gguf")
    # A type number this gguf package has never heard of, patched into the first tensor's info.
    name = b"token_embd.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8  # past the name, n_dims (u32) and two dims (u64)
    (tmp_path / "future.gguf").write_bytes(data[:at] + (99).to_bytes(4, "little") + data[at + 4 :])
    with pytest.raises(ValueError, match=r"99\) is not a valid GGMLQuantizationType.*newer gguf package"):
        read_gguf(tmp_path / "future.gguf")
    with pytest.raises(ValueError, match="tensor_type='Q5_K': use one of"):
        meta_folder_to_gguf(folder, tmp_path / "x.gguf", "Q5_K")
    weights, args = random_state_dict(MHA), ModelArgs.from_params(MHA)
    del weights["layers.1.attention.wq.weight"]
    with pytest.raises(ValueError, match=r"its own metadata: missing \['layers.1.attention.wq.weight'\]"):
        read_gguf(write_gguf(weights, args, tokenizer, tmp_path / "holed.gguf", "F32"))


def test_cli_round_trip(tmp_path, sp_model_path):
    original = write_checkpoint(tmp_path / "meta", GQA, n_shards=2)
    (tmp_path / "tokenizer.model").write_bytes(sp_model_path.read_bytes())  # Meta's parent-folder layout
    run = [sys.executable, "-m", "llama.convert.gguf"]
    r = subprocess.run(
        [*run, "from_meta", tmp_path / "meta", tmp_path / "m.gguf", "--type", "F32"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    assert "RuntimeWarning" not in r.stderr  # runpy's, when `import llama` had imported the module already
    subprocess.run(
        [*run, "to_meta", tmp_path / "m.gguf", tmp_path / "back", "--n_shards", "2", "--dtype", "fp32"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    merged = LLaMa.build(tmp_path / "back", device="cpu", dtype="float32", max_seq_len=8, max_batch_size=1).model
    assert all(torch.equal(merged.state_dict()[k], w) for k, w in original.items())
    failed = subprocess.run(
        [*run, "to_meta", tmp_path / "meta" / "params.json", tmp_path / "x"], cwd=REPO, capture_output=True, text=True
    )
    assert failed.returncode == 1 and "error: cannot read" in failed.stderr


def llama3_folder(make_ckpt, tiktoken_path, factor: float | None = None):
    params = LLAMA3 | ({"rope_scaling_factor": factor} if factor else {})
    return make_ckpt(params, 2, tokenizer=tiktoken_path, vocab_parallel_embedding=True), params


@pytest.mark.parametrize("factor", [None, 32.0], ids=["factor8", "factor32"])
def test_llama3_folder_to_gguf_and_back_keeps_vocabulary_and_scaled_rope(make_ckpt, tiktoken_path, tmp_path, factor):
    (folder, original), params = llama3_folder(make_ckpt, tiktoken_path, factor)
    path = meta_folder_to_gguf(folder, tmp_path / "model.gguf", "F32")
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    out = gguf_to_meta_folder(path, tmp_path / "back", n_shards=2, dtype="float32")
    assert json.loads((out / "params.json").read_text()) == ModelArgs.from_params(params).to_params()
    assert (out / "tokenizer.model").read_bytes() == tiktoken_path.read_bytes()
    state_dict, _, _ = read_gguf(path)
    assert all(torch.equal(state_dict[k], w) for k, w in original.items())


def test_llama3_gguf_tokenizes_and_computes_as_llama_cpp(make_ckpt, tiktoken_path, tmp_path):
    """llama.cpp reads the file's gpt2 vocabulary, merges and scaled-RoPE divisors as ours."""
    (folder, original), params = llama3_folder(make_ckpt, tiktoken_path, 32.0)
    path = meta_folder_to_gguf(folder, tmp_path / "model.gguf", "F32")
    theirs = llama_cpp(path, 64)
    ours = Tokenizer(folder / "tokenizer.model")
    for text in [*TEXTS, "far land 1234567 spoke?!"]:
        assert theirs.tokenize(text.encode(), add_bos=True, special=False) == ours.encode(text, bos=True, eos=False), (
            text
        )
    theirs.close()
    ids = tokens(params["vocab_size"], 1, 48)[0]
    expected = llama_cpp_logits(path, ids)
    model = Transformer(ModelArgs.from_params(params))
    model.load_state_dict(original)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[None])[0], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "module, command",
    [
        ("gguf", "llama.convert.gguf from_meta"),
        ("safetensors", "llama.convert.hf to_hf"),
        ("tokenizers", "llama.convert.hf to_hf"),
    ],
)
def test_a_missing_optional_package_names_the_extra(make_ckpt, tiktoken_path, tmp_path, module, command):
    """As on the plain install: the converter's package is absent (a stand-in raises ImportError)."""
    (tmp_path / "absent" / module).mkdir(parents=True)
    (tmp_path / "absent" / module / "__init__.py").write_text("raise ImportError('not installed')\n")
    folder, _ = make_ckpt(LLAMA3, 1, tokenizer=tiktoken_path)  # Llama 3's tokenizer needs tokenizers for HF
    path = [str(tmp_path / "absent"), str(REPO), os.environ.get("PYTHONPATH")]  # (a machine's own path kept)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
    run = [sys.executable, "-m", *command.split(), str(folder), str(tmp_path / "out")]
    r = subprocess.run(run, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "pip install 'llama-reference[convert]'" in r.stderr
