"""Hugging Face <-> Meta conversion: exact round trips, and logits equal to transformers' own model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GQA, MHA, THETA, needs_shared, tokens, write_checkpoint

from llama.checkpoint import load_merged
from llama.convert.hf import config_to_args, ffn_params, hf_folder_to_meta, meta_folder_to_hf, permute_rope
from llama.generation import LLaMa
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

pytest.importorskip("safetensors")
REPO = Path(__file__).resolve().parents[1]
SCALED = dict(THETA, rope_theta=5e5, use_scaled_rope=True, dim=256, n_heads=2, n_kv_heads=1)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 5e5,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def our_model(folder: Path):
    return LLaMa.build(folder, device="cpu", dtype="float32", max_seq_len=32, max_batch_size=2).model


def shards(folder: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(p, weights_only=True) for p in sorted(folder.glob("consolidated.*.pth"))]


@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("params", [MHA, GQA, THETA], ids=["mha", "gqa", "theta1e6"])
def test_meta_to_hf_to_meta_is_bit_identical(make_ckpt, tmp_path, params, n_shards):
    folder, _ = make_ckpt(params, n_shards)
    hf = meta_folder_to_hf(folder, tmp_path / "hf")
    back = hf_folder_to_meta(hf, tmp_path / "back", n_shards=n_shards)
    before, after = shards(folder), shards(back)
    assert len(after) == n_shards
    for old, new in zip(before, after):
        assert old.keys() == new.keys()
        assert all(torch.equal(old[k], new[k]) for k in old)
    assert json.loads((back / "params.json").read_text()) == ModelArgs.from_params(params).to_params()
    assert (back / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()


def test_no_conversion_writes_where_a_model_is(make_ckpt, tmp_path):
    """Into the source, or over a converted model (another model's tokenizer.model stayed beside it)."""
    from llama.convert.gguf import gguf_to_meta_folder, meta_folder_to_gguf

    folder, _ = make_ckpt(MHA, 1)
    hf = meta_folder_to_hf(folder, tmp_path / "hf")
    for out, what in ((folder, "a model .consolidated.00.pth"), (hf, "a model .config.json")):
        with pytest.raises(ValueError, match=f"already holds {what}"):
            meta_folder_to_hf(folder, out)
    with pytest.raises(ValueError, match="back already holds a model"):
        hf_folder_to_meta(hf, hf_folder_to_meta(hf, tmp_path / "back"))
    with pytest.raises(ValueError, match="hf already holds a model .config.json, model.safetensors"):
        hf_folder_to_meta(hf, hf)  # Meta's files had been written beside the source's
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="afile is a file: name a folder"):
        hf_folder_to_meta(hf, tmp_path / "afile")
    gguf_file = meta_folder_to_gguf(folder, tmp_path / "m.gguf", "F32")
    with pytest.raises(ValueError, match="m.gguf exists: write the GGUF file to a new path"):
        meta_folder_to_gguf(folder, gguf_file, "F32")
    with pytest.raises(ValueError, match="already holds a model .m.gguf"):
        gguf_to_meta_folder(gguf_file, gguf_file.parent)  # beside its source


@pytest.mark.parametrize(
    "params, n_shards", [(MHA, 1), (GQA, 2), (THETA, 2), (SCALED, 1)], ids=["mha", "gqa", "theta1e6", "llama3.1-rope"]
)
def test_transformers_loads_our_export_with_equal_logits(make_ckpt, tmp_path, params, n_shards):
    transformers = pytest.importorskip("transformers")
    folder, _ = make_ckpt(params, n_shards)
    hf = meta_folder_to_hf(folder, tmp_path / "hf")
    theirs = transformers.LlamaForCausalLM.from_pretrained(
        hf,
        torch_dtype=torch.float32,
        attn_implementation="eager",
        local_files_only=True,  # a folder written here
    )
    x = tokens(params["vocab_size"], 2, 20)
    with torch.no_grad():
        expected = theirs.eval()(input_ids=x).logits.float()
    torch.testing.assert_close(our_model(folder)(x), expected, atol=1e-4, rtol=0)


def hf_checkpoint(folder: Path, tokenizer: Path, max_shard_size: str | None = None, **config):
    """Save a randomly initialised LlamaForCausalLM (random norms too) with the test tokenizer beside it."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, num_hidden_layers=2, rms_norm_eps=1e-5, **config)
    with torch.random.fork_rng():  # transformers initialises from the global generator
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if p.dim() == 1 else noise * p.shape[-1] ** -0.5)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return model


HF_CASES = {
    "gqa-sharded": dict(
        hidden_size=64,
        intermediate_size=176,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1e6,
        max_shard_size="40KB",
    ),
    "tied": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, tie_word_embeddings=True),
    "llama3.1-rope": dict(
        hidden_size=256,
        intermediate_size=704,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_parameters=LLAMA3_ROPE,
        max_position_embeddings=131072,
    ),
    "llama3.2-tied-rope32": dict(  # as Meta's Llama 3.2 1B/3B are on the hub
        hidden_size=256,
        intermediate_size=704,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_parameters=dict(LLAMA3_ROPE, factor=32.0),
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_to_meta_gives_transformers_logits(tmp_path, sp_model_path, case):
    theirs = hf_checkpoint(tmp_path / "hf", sp_model_path, **HF_CASES[case])
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert ("model.safetensors.index.json" in files) == (case == "gqa-sharded")
    n_shards = 2 if case == "gqa-sharded" else 1
    meta = hf_folder_to_meta(tmp_path / "hf", tmp_path / "meta", n_shards=n_shards)
    params = json.loads((meta / "params.json").read_text())
    assert params.get("use_scaled_rope", False) == case.startswith("llama3")
    assert params.get("rope_scaling_factor") == (32.0 if case == "llama3.2-tied-rope32" else None)
    assert ModelArgs.from_params(params).ffn_hidden_dim == HF_CASES[case]["intermediate_size"]
    x = tokens(96, 2, 20)
    with torch.no_grad():
        expected = theirs(input_ids=x).logits.float()
    torch.testing.assert_close(our_model(meta)(x), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "intermediate_size, dim",
    [(11008, 4096), (14336, 4096), (5632, 2048), (28672, 8192), (13824, 5120), (8640, 3200), (12345, 4096), (1, 64)],
)
def test_intermediate_size_maps_to_params_that_reproduce_it(intermediate_size, dim):
    assert ModelArgs(dim=dim, **ffn_params(intermediate_size, dim)).ffn_hidden_dim == intermediate_size


def test_intermediate_size_mapping_prefers_plain_forms_and_refuses_nonsense():
    assert ffn_params(11008, 4096) == {"multiple_of": 256, "ffn_dim_multiplier": None}  # Llama 2 7B's own
    assert ffn_params(14336, 4096)["ffn_dim_multiplier"] == 1.3
    meta_form = {"multiple_of": 48, "ffn_dim_multiplier": 1.3}  # GQA's: an exported config carries it back
    assert ffn_params(240, 64, meta_form) == meta_form
    # With multiple_of 1 and a multiplier every positive size can be written; nothing else can.
    for bad in (0, -11008, 11008.5):
        with pytest.raises(ValueError, match=rf"intermediate_size={bad} with dim=4096"):
            ffn_params(bad, 4096)


def test_rope_permutation_inverts_exactly():
    w = torch.randn(4 * 16, 8)
    assert torch.equal(permute_rope(permute_rope(w, 4), 4, to_hf=False), w)
    # Head 0's first half holds the first element of each Meta pair.
    assert torch.equal(permute_rope(w, 4)[:8], w[0:16:2])


def test_missing_files_and_foreign_configs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        hf_folder_to_meta(tmp_path, tmp_path / "out")
    config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=96,
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no model.*safetensors in"):
        hf_folder_to_meta(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="mistral")))
    with pytest.raises(ValueError, match="model_type='mistral'"):
        hf_folder_to_meta(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        config_to_args(dict(config, architectures=["LlamaForSequenceClassification"]))
    with pytest.raises(ValueError, match="rope scaling .*'linear'"):
        config_to_args(dict(config, rope_scaling={"type": "linear", "factor": 2.0}))
    with pytest.raises(ValueError, match="rope scaling .*'low_freq_factor': 2.0"):
        config_to_args(dict(config, rope_parameters=dict(LLAMA3_ROPE, low_freq_factor=2.0)))
    assert config_to_args(dict(config, rope_parameters=dict(LLAMA3_ROPE, factor=4.0))).rope_factor == 4.0
    with pytest.raises(ValueError, match="attention_bias=true"):
        config_to_args(dict(config, attention_bias=True))
    with pytest.raises(FileNotFoundError, match="no params.json"):
        meta_folder_to_hf(tmp_path, tmp_path / "hf")


def test_cli_round_trip(tmp_path, sp_model_path):
    write_checkpoint(tmp_path / "meta", GQA, n_shards=2)
    (tmp_path / "tokenizer.model").write_bytes(sp_model_path.read_bytes())  # Meta's parent-folder layout
    run = [sys.executable, "-m", "llama.convert.hf"]
    subprocess.run([*run, "to_hf", tmp_path / "meta", tmp_path / "hf"], cwd=REPO, check=True, capture_output=True)
    assert (tmp_path / "hf" / "tokenizer.model").is_file()
    subprocess.run(
        [*run, "to_meta", tmp_path / "hf", tmp_path / "back", "--n_shards", "2"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    for old, new in zip(shards(tmp_path / "meta"), shards(tmp_path / "back")):
        assert all(torch.equal(old[k], new[k]) for k in old)
    failed = subprocess.run(
        [*run, "to_meta", tmp_path / "nowhere", tmp_path / "x"], cwd=REPO, capture_output=True, text=True
    )
    assert failed.returncode == 1 and "error: no config.json in" in failed.stderr


# Llama 3's vocabulary and scaled RoPE at a tiny width; the embedding split on the vocabulary.
LLAMA3_TINY = dict(SCALED, vocab_size=128256, n_heads=4, n_kv_heads=2)


@pytest.mark.parametrize("n_shards, factor", [(1, None), (2, 32.0)], ids=["1-shard-factor8", "2-shards-factor32"])
def test_llama3_shapes_equal_transformers_rope_type_llama3(tmp_path, sp_model_path, n_shards, factor):
    """Logits over 512 positions (where the factor moves them by ~1e-2) equal LlamaForCausalLM's."""
    transformers = pytest.importorskip("transformers")
    params = LLAMA3_TINY | ({"rope_scaling_factor": factor} if factor else {})
    write_checkpoint(tmp_path / "meta", params, n_shards, vocab_parallel_embedding=True)
    (tmp_path / "meta" / "tokenizer.model").write_bytes(sp_model_path.read_bytes())  # not read here
    state_dict, args = load_merged(tmp_path / "meta")
    assert args.rope_factor == (factor or 8.0)
    hf = meta_folder_to_hf(tmp_path / "meta", tmp_path / "hf")
    assert json.loads((hf / "config.json").read_text())["rope_parameters"]["factor"] == args.rope_factor
    theirs = transformers.LlamaForCausalLM.from_pretrained(
        hf, torch_dtype=torch.float32, attn_implementation="eager", local_files_only=True
    )
    ours = Transformer(args)
    ours.load_state_dict(state_dict)
    x = tokens(128256, 1, 512)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs.eval()(input_ids=x).logits.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["made here", "Meta's"])
def test_llama3_tokenizer_goes_to_hugging_face_and_back(make_ckpt, tiktoken_path, tmp_path, which):
    """A Llama 3 folder's tiktoken file becomes a tokenizer.json that transformers encodes with as
    we do, and comes back byte for byte."""
    transformers = pytest.importorskip("transformers")
    from conftest import LLAMA3
    from test_tokenizer import HARD_TEXTS

    path = tiktoken_path if which == "made here" else needs_shared("llama3/tokenizer.model")
    ours = Tokenizer(path)
    folder, _ = make_ckpt(dict(LLAMA3, vocab_size=ours.n_words), 1, tokenizer=path)
    hf = meta_folder_to_hf(folder, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (ours.bos_id, ours.eos_id)
    generation = json.loads((hf / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ours.eos_id, ours.eom_id, ours.eot_id]  # an Instruct model's turns end
    theirs = transformers.AutoTokenizer.from_pretrained(hf, local_files_only=True)
    for text in HARD_TEXTS:
        expected = ours.encode(text, bos=True, eos=False)
        if "<|" in text:  # transformers reads special-token text as the special ids; Meta's code keeps it text
            assert theirs.encode(text) != expected and ours.eot_id in theirs.encode(text)
        else:
            assert theirs.encode(text) == expected, text
    back = hf_folder_to_meta(hf, tmp_path / "back")
    assert (back / "tokenizer.model").read_bytes() == path.read_bytes()
    assert "tokenizer.model" in (back / "checklist.chk").read_text()


@pytest.mark.parametrize("which", ["built-in", "Meta's"])  # the tests' own 96 words leave most text unknown
def test_a_sentencepiece_tokenizer_encodes_in_hugging_face_as_ours(make_ckpt, tmp_path, which):
    """With the tokenizer_config.json written beside it, transformers' LlamaTokenizer starts with BOS
    (it added none without), keeps text that spells a special token as text, and puts the model's
    own dummy prefix (the built-in model has none). Single spaces: its conversion of SentencePiece
    merges runs of spaces otherwise than SentencePiece does."""
    transformers = pytest.importorskip("transformers")
    from llama.loading import BUILTIN_MODEL

    path = BUILTIN_MODEL / "tokenizer.model" if which == "built-in" else needs_shared("tokenizer.model")
    ours = Tokenizer(path)
    folder, _ = make_ckpt(dict(MHA, vocab_size=ours.n_words), 1, tokenizer=path)
    theirs = transformers.AutoTokenizer.from_pretrained(
        meta_folder_to_hf(folder, tmp_path / "hf"), local_files_only=True
    )
    texts = ["Hello world", "ROMEO:\nWhat say you?", "emoji 🦙 and 中文 text", "</s> and <s> stay text", "3.14 -42"]
    assert [theirs.encode(t) for t in texts] == [ours.encode(t, bos=True, eos=False) for t in texts]


def test_hf_tokenizer_json_that_is_not_llama_3s(tmp_path, sp_model_path):
    """A byte-level BPE without Llama 3's special tokens is refused before any weight is written; a
    tokenizer.json of another kind (Llama 2's, without its tokenizer.model) is left out, with a warning."""
    hf_checkpoint(tmp_path / "hf", sp_model_path, **HF_CASES["tied"])
    (tmp_path / "hf" / "tokenizer.model").unlink()
    byte_level = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}, "pre_tokenizer": {"type": "ByteLevel"}}
    (tmp_path / "hf" / "tokenizer.json").write_text(
        json.dumps(byte_level | {"added_tokens": [{"id": 2, "content": "<s>"}]})
    )
    with pytest.raises(ValueError, match="1 special tokens .*a Llama 3 vocabulary has 256"):
        hf_folder_to_meta(tmp_path / "hf", tmp_path / "meta")
    assert not (tmp_path / "meta").exists()
    metaspace = {"model": {"type": "BPE", "vocab": {"▁a": 0}}, "pre_tokenizer": {"type": "Metaspace"}}
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(metaspace))
    meta = hf_folder_to_meta(tmp_path / "hf", tmp_path / "meta")
    assert not (meta / "tokenizer.model").exists() and (meta / "consolidated.00.pth").is_file()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"hidden_size": "64"}, "hidden_size='64'"),
        ({"num_attention_heads": 0}, "num_attention_heads=0"),
        ({"num_key_value_heads": 2.5}, "num_key_value_heads=2.5"),
        ({"rms_norm_eps": "1e-5"}, "norm_eps='1e-5'"),
    ],
)
def test_config_values_of_the_wrong_kind_name_the_file_and_field(tmp_path, sp_model_path, change, match):
    hf_checkpoint(tmp_path / "hf", sp_model_path, **HF_CASES["tied"])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(ValueError, match=f"config.json: .*{match}"):
        hf_folder_to_meta(tmp_path / "hf", tmp_path / "meta")


def test_a_truncated_safetensors_file_names_itself(tmp_path, sp_model_path):
    hf_checkpoint(tmp_path / "hf", sp_model_path, **HF_CASES["tied"])
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read .*model.safetensors .*truncated or damaged"):
        hf_folder_to_meta(tmp_path / "hf", tmp_path / "meta")
