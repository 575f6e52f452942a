"""oneDNN-packed linears: the same numbers as nn.Linear, Meta's names kept, the build default on
bf16 CPUs; and release_mapped, which gives back an mmap'd shard's pages without losing a byte."""

import sys

import pytest
import torch

from conftest import GQA
from llama import LLaMa
from llama.checkpoint import release_mapped
from llama.packed import PackedLinear, pack_linears, supported, weight_bytes

needs_onednn_bf16 = pytest.mark.skipif(
    not supported(torch.device("cpu"), torch.bfloat16), reason="this CPU's oneDNN has no bf16 kernels"
)


@needs_onednn_bf16
def test_packed_model_gives_the_same_numbers_and_state_dict(make_ckpt):
    folder, _ = make_ckpt(GQA, 2)
    plain = LLaMa.build(folder, max_seq_len=32, max_batch_size=3, dtype="bfloat16", pack=False)
    packed = LLaMa.build(folder, max_seq_len=32, max_batch_size=3, dtype="bfloat16")
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.model.modules()) == 7 * GQA["n_layers"] + 1
    x = torch.randint(0, GQA["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(packed.model(x, 0), plain.model(x, 0))
    assert torch.equal(packed.model(x[:, :1], 9), plain.model(x[:, :1], 9))  # cached decode step
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert packed.generate(prompts, 6, temperature=0) == plain.generate(prompts, 6, temperature=0)

    expected, got = plain.model.state_dict(), packed.model.state_dict()
    assert list(got) == list(expected)  # Meta's keys, in Meta's order
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert torch.equal(packed.model.layers[1].attention.wq.weight, plain.model.layers[1].attention.wq.weight)
    assert weight_bytes(packed.model) == weight_bytes(plain.model)


@needs_onednn_bf16
def test_load_state_dict_repacks_and_checks_shapes():
    linear = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    model = torch.nn.Sequential(linear)
    assert pack_linears(model) == 1
    new = torch.randn(32, 64, dtype=torch.bfloat16)
    model.load_state_dict({"0.weight": new})
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    assert torch.equal(model(x), torch.nn.functional.linear(x, new))
    with pytest.raises(RuntimeError, match=r"0.weight: shape \(64, 32\), expected \(32, 64\)"):
        model.load_state_dict({"0.weight": new.T})
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({})


def test_pack_is_refused_where_it_cannot_run(make_ckpt):
    folder, _ = make_ckpt(GQA, 1)
    with pytest.raises(ValueError, match="pack=True needs bfloat16 on a CPU"):
        LLaMa.build(folder, max_seq_len=8, dtype="float32", pack=True)
    fp32 = LLaMa.build(folder, max_seq_len=8, dtype="float32")  # the default packs only where it pays
    assert not any(isinstance(m, PackedLinear) for m in fp32.model.modules())


def rss_file_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_release_mapped_gives_back_file_pages_and_keeps_every_byte(tmp_path):
    big = torch.randn(4 << 20, generator=torch.Generator().manual_seed(0))  # 16 MB
    torch.save({"w": big}, tmp_path / "w.pth")
    mapped = torch.load(tmp_path / "w.pth", mmap=True, weights_only=True)["w"]
    assert torch.equal(mapped, big)  # every page is now resident
    before = rss_file_bytes()
    release_mapped([mapped])
    assert before - rss_file_bytes() > 12 << 20
    assert torch.equal(mapped, big)  # read back from the file
    anonymous = big.clone()
    release_mapped([anonymous])  # not file-backed: left alone
    assert torch.equal(anonymous, big)
