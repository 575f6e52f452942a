"""Loading Meta folders: shards merged onto one device, strictly, safely; and written back."""

import json
import os
import subprocess

import pytest
import torch
from conftest import GQA, MHA, THETA, random_state_dict

from llama import LLaMa
from llama.checkpoint import MetaCheckpoint, save_checkpoint
from llama.model import ModelArgs, Transformer


def loaded_state(folder, **kw) -> dict[str, torch.Tensor]:
    llm = LLaMa.build(folder, max_seq_len=16, max_batch_size=1, dtype="float32", device="cpu", **kw)
    return llm.model.state_dict()


@pytest.mark.parametrize(
    "params, n_shards, kw",
    [
        (MHA, 1, {}),
        (MHA, 2, {"rope_freqs": True}),
        (MHA, 4, {"rope_freqs": True}),
        (GQA, 2, {}),
        (THETA, 2, {"vocab_parallel_embedding": True}),  # Llama 3 splits the vocabulary
    ],
)
def test_merged_shards_equal_unsharded_weights(make_ckpt, params, n_shards, kw):
    folder, sd = make_ckpt(params, n_shards, **kw)
    state = loaded_state(folder)
    assert state.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(state[key], value), key


def test_shards_convert_to_the_target_dtype(make_ckpt):
    folder, sd = make_ckpt(GQA, 2)
    llm = LLaMa.build(folder, max_seq_len=16, max_batch_size=1, dtype="bf16", device="cpu")
    for key, value in llm.model.state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, sd[key].to(torch.bfloat16)), key
    assert llm.model.layers[0].attention.cache_k.dtype == torch.bfloat16


def test_save_checkpoint_round_trips_and_writes_checklist(tmp_path, make_ckpt):
    folder, sd = make_ckpt(GQA, 1)
    args = ModelArgs.from_params(json.loads((folder / "params.json").read_text()))
    out = save_checkpoint(sd, args, tmp_path / "saved", n_shards=2)
    assert sorted(p.name for p in out.iterdir()) == [
        "checklist.chk",
        "consolidated.00.pth",
        "consolidated.01.pth",
        "params.json",
    ]
    assert torch.load(out / "consolidated.00.pth")["tok_embeddings.weight"].shape == (96, 32)  # Llama 2 split
    merged = MetaCheckpoint(out)
    model = Transformer(merged.args)
    merged.load_into(model)
    for key, value in sd.items():
        assert torch.equal(model.state_dict()[key], value), key
    check = subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    with pytest.raises(ValueError, match="saved already holds a model .consolidated.00.pth, consolidated.01"):
        save_checkpoint(sd, args, out)  # never over another checkpoint, unless asked
    assert [p.name for p in save_checkpoint(sd, args, out, overwrite=True).glob("*.pth")] == ["consolidated.00.pth"]


def test_shards_that_would_not_load_again_are_refused_before_writing(tmp_path):
    """A vocabulary of 97 (like the 32001 of many fine-tunes) or an FFN of 171 does not split in two."""
    for params, key in ((dict(MHA, vocab_size=97), "output.weight"), (dict(MHA, multiple_of=171), "w1.weight")):
        args = ModelArgs.from_params(params)
        with pytest.raises(ValueError, match=f"n_shards=2 does not divide .*{key}'s"):
            save_checkpoint(random_state_dict(params), args, tmp_path / "uneven", n_shards=2)
        assert not (tmp_path / "uneven").exists()
        assert MetaCheckpoint(save_checkpoint(random_state_dict(params), args, tmp_path / key, n_shards=1)).args == args
    with pytest.raises(ValueError, match="n_shards=0: use a whole number"):
        save_checkpoint(random_state_dict(MHA), ModelArgs.from_params(MHA), tmp_path / "none", n_shards=0)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_runs_code_is_refused(make_ckpt):
    folder, _ = make_ckpt(MHA, 1)
    shard = torch.load(folder / "consolidated.00.pth")
    shard["evil"] = Exploit()
    torch.save(shard, folder / "consolidated.00.pth")
    with pytest.raises(ValueError, match="refused to load .*consolidated.00.pth"):
        LLaMa.build(folder, dtype="float32")


def test_missing_folder_params_and_shards(tmp_path, make_ckpt):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLaMa.build(tmp_path / "nope")
    folder, _ = make_ckpt(MHA, 1)
    (folder / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"no consolidated\.\*\.pth shards in .*model"):
        LLaMa.build(folder)
    (folder / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="no params.json in"):
        LLaMa.build(folder)


def test_missing_tokenizer_names_both_places(make_ckpt):
    folder, _ = make_ckpt(MHA, 1)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.model in .*tokenizer_path="):
        LLaMa.build(folder)


def test_tokenizer_in_parent_folder_is_found(make_ckpt):
    folder, _ = make_ckpt(MHA, 1)
    (folder / "tokenizer.model").rename(folder.parent / "tokenizer.model")
    assert LLaMa.build(folder, dtype="float32", max_seq_len=8).tokenizer.n_words == 96


def test_shard_count_that_does_not_divide_heads(make_ckpt):
    folder, _ = make_ckpt(GQA, 2)
    torch.save(torch.load(folder / "consolidated.01.pth"), folder / "consolidated.02.pth")
    with pytest.raises(ValueError, match="3 shards .* cannot split n_heads=4"):
        LLaMa.build(folder)


def test_shards_whose_shapes_disagree(make_ckpt):
    folder, _ = make_ckpt(MHA, 2)
    shard = torch.load(folder / "consolidated.01.pth")
    shard["layers.1.attention.wq.weight"] = shard["layers.1.attention.wq.weight"][:-1]
    torch.save(shard, folder / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"shards disagree on the shape of layers.1.attention.wq.weight"):
        LLaMa.build(folder)


def test_weight_that_does_not_match_params_names_key_and_shapes(make_ckpt):
    folder, _ = make_ckpt(MHA, 1)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps(dict(params, multiple_of=100)))
    with pytest.raises(
        ValueError, match=r"feed_forward.w1.weight: the checkpoint's shape is \(192, 64\) .* \(200, 64\)"
    ):
        LLaMa.build(folder)


def test_missing_weight_is_an_error_not_a_random_one(make_ckpt):
    folder, _ = make_ckpt(MHA, 1)
    shard = torch.load(folder / "consolidated.00.pth")
    del shard["layers.0.ffn_norm.weight"]
    torch.save(shard, folder / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"missing \['layers.0.ffn_norm.weight'\]"):
        LLaMa.build(folder)


def test_tokenizer_vocab_must_match_embedding(make_ckpt):
    # -1 takes the tokenizer's 96 words; an embedding of another size is refused with both numbers.
    params = dict(MHA, vocab_size=100)
    folder, _ = make_ckpt(params, 1, name="big")
    (folder / "params.json").write_text(json.dumps(dict(params, vocab_size=-1)))
    with pytest.raises(ValueError, match="embedding in .* has 100 rows but the tokenizer .* has 96 words"):
        LLaMa.build(folder)
    (folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="vocab_size=100 but .*tokenizer.model has 96 words"):
        LLaMa.build(folder)


def test_unused_params_keys_are_kept_not_fatal(make_ckpt, caplog):
    folder, _ = make_ckpt(MHA, 1)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps(dict(params, max_seq_len=4096, something_new=1)))
    with caplog.at_level("INFO", logger="llama"):
        llm = LLaMa.build(folder, dtype="float32", max_seq_len=8)
    assert llm.model.params.extra == {"max_seq_len": 4096, "something_new": 1}
    assert "something_new" in caplog.text


def test_legacy_pickle_without_zip_loads(make_ckpt):
    folder, sd = make_ckpt(MHA, 1)
    shard = torch.load(folder / "consolidated.00.pth")
    torch.save(shard, folder / "consolidated.00.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(loaded_state(folder)["output.weight"], sd["output.weight"])


BAD_PARAMS = [
    ({"use_scaled_rope": "false"}, "use_scaled_rope='false': use true or false"),
    ({"norm_eps": -1}, "norm_eps=-1: use a positive number"),
    ({"norm_eps": float("nan")}, "norm_eps=nan"),
    ({"rope_theta": 0}, "rope_theta=0"),
    ({"rope_theta": -10000.0}, "rope_theta=-10000.0"),
    ({"dim": "64"}, "dim='64': use a positive integer"),
    ({"dim": 64.0}, "dim=64.0"),
    ({"n_layers": None}, "n_layers=None"),
    ({"n_heads": [4]}, r"n_heads=\[4\]"),
    ({"n_heads": True}, "n_heads=True"),
    ({"n_layers": 0}, "n_layers=0"),
    ({"multiple_of": -32}, "multiple_of=-32"),
    ({"vocab_size": 0}, "vocab_size=0: use a positive integer, or -1"),
    ({"n_kv_heads": 0}, "n_kv_heads=0"),
    ({"ffn_dim_multiplier": "1.3"}, "ffn_dim_multiplier='1.3'"),
    ({"rope_scaling_factor": float("inf")}, "rope_scaling_factor=inf"),
    ({"n_heads": 5}, "dim=64 with n_heads=5: each head needs an even size"),
    ({"dim": 60, "n_heads": 4}, "dim=60 with n_heads=4: each head needs an even size"),
    ({"n_kv_heads": 3}, "n_kv_heads=3 does not divide n_heads=4"),
    ({"ffn_dim_multiplier": 1e-300}, "ffn_dim_multiplier=1e-300 leaves no feed-forward width"),  # found by hypothesis
    ({"ffn_dim_multiplier": 1e308}, "ffn_dim_multiplier=1e\\+308 leaves no feed-forward width"),  # an OverflowError
]


@pytest.mark.parametrize("change, match", BAD_PARAMS, ids=[m.split(":")[0][:30] for _, m in BAD_PARAMS])
def test_params_json_values_are_checked_naming_file_and_field(make_ckpt, change, match):
    folder, _ = make_ckpt(MHA)
    (folder / "params.json").write_text(json.dumps(dict(MHA, **change)))
    with pytest.raises(ValueError, match=f"params.json: {match}"):
        LLaMa.build(folder, max_seq_len=8)
    with pytest.raises(ValueError, match=match):
        ModelArgs.from_params(dict(MHA, **change))


def test_params_json_that_is_not_an_object_or_not_utf8(make_ckpt):
    folder, _ = make_ckpt(MHA)
    (folder / "params.json").write_text("[64, 2]")
    with pytest.raises(ValueError, match="params.json: params.json holds a list, not an object"):
        LLaMa.build(folder, max_seq_len=8)
    (folder / "params.json").write_bytes(b'{"dim": 64, "n\xff": 1}')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match="params.json is not UTF-8 text"):
        LLaMa.build(folder, max_seq_len=8)


def test_a_huge_architecture_is_refused_by_arithmetic_before_any_module_is_built(make_ckpt, monkeypatch):
    folder, _ = make_ckpt(MHA)
    (folder / "params.json").write_text(json.dumps(dict(MHA, n_layers=10**6, dim=4096, n_heads=32)))

    def never(*args, **kwargs):
        raise AssertionError("a Transformer was built")

    monkeypatch.setattr("llama.loading.Transformer", never)
    with pytest.raises(ValueError, match=r"not enough memory on cpu: the weights need at least .* \(4 bits each\)"):
        LLaMa.build(folder, max_seq_len=8, device="cpu", load_model=False)


def damage(path, how: str) -> None:
    good = path.read_bytes()
    path.unlink()
    if how == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random bytes":
        path.write_bytes(bytes(range(256)) * 40)
    elif how == "a list":
        torch.save([torch.ones(2)], path)
    elif how == "non-tensors":
        torch.save({"tok_embeddings.weight": torch.ones(2), "step": 3}, path)
    elif how == "a directory":
        path.mkdir()
    elif how == "a FIFO":  # reading one would block forever
        os.mkfifo(path)


@pytest.mark.parametrize(
    "how, match",
    [
        ("truncated", "is not a readable PyTorch checkpoint .*truncated or damaged"),
        ("empty", "is empty: the download or copy did not finish"),
        ("random bytes", "is not a PyTorch checkpoint, or a damaged one"),
        ("a list", "holds a list, not a state dict"),
        ("non-tensors", "'step' is a int, not a tensor"),
        ("a directory", "is not a regular file"),
        pytest.param(
            "a FIFO", "is not a regular file", marks=pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
        ),
    ],
)
def test_damaged_or_foreign_shards_name_the_file(make_ckpt, how, match):
    folder, _ = make_ckpt(MHA, 2)
    damage(folder / "consolidated.01.pth", how)
    with pytest.raises(ValueError, match=f"consolidated.01.pth.*{match}|{match}.*") as e:
        LLaMa.build(folder, max_seq_len=8)
    assert "consolidated.01.pth" in str(e.value)


def test_an_integer_shard_is_refused_not_cast(make_ckpt):
    folder, sd = make_ckpt(MHA, 1)
    torch.save({k: (v * 100).long() if "wq" in k else v for k, v in sd.items()}, folder / "consolidated.00.pth")
    with pytest.raises(
        ValueError, match=r"consolidated.00.pth: layers.0.attention.wq.weight is torch.int64; .*floating"
    ):
        LLaMa.build(folder, max_seq_len=8)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_one_shard_of_mixed_dtypes_loads(make_ckpt, dtype, tmp_path):
    """As fine-tuning tools write them: float32 norms beside bf16 matrices (used in place by a
    bf16 build, copied by a float32 one)."""
    folder, sd = make_ckpt(MHA, 1)
    mixed = {k: v if v.dim() == 1 else v.bfloat16() for k, v in sd.items()}
    torch.save(mixed, folder / "consolidated.00.pth")
    model = LLaMa.build(folder, max_seq_len=8, dtype=dtype, device="cpu").model
    for key, value in model.state_dict().items():
        assert torch.equal(value, mixed[key].to(value.dtype)), key
    from llama.checkpoint import load_merged

    merged, _ = load_merged(folder)  # what the HF and GGUF exports read
    assert all(torch.equal(merged[k], mixed[k].to(merged[k].dtype)) for k in mixed)
