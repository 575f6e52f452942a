"""The CPU's linear kernels (llama.cpu): GemvLinear (the bf16 default) and PackedLinear give
F.linear's numbers with Meta's names kept; release_mapped gives back an mmap'd shard's pages
without losing a byte."""

import sys

import pytest
import torch

from conftest import GQA
from llama import LLaMa
from llama.checkpoint import release_mapped
from llama.cpu import GemvLinear, PackedLinear, linear_around, onednn_bf16, pack_linears, weight_bytes

needs_onednn_bf16 = pytest.mark.skipif(not onednn_bf16(), reason="this CPU's oneDNN has no bf16 kernels")


def _plain(llm: LLaMa) -> None:
    """Back to nn.Linear everywhere, sharing the weights: the reference the kernels must equal."""
    for module in list(llm.model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, GemvLinear):
                setattr(module, name, linear_around(child.weight))


@pytest.mark.parametrize("pack", [False, pytest.param(True, marks=needs_onednn_bf16)])
def test_cpu_kernels_give_the_same_numbers_and_state_dict(make_ckpt, pack):
    folder, _ = make_ckpt(GQA, 2)
    plain = LLaMa.build(folder, max_seq_len=32, max_batch_size=3, dtype="bfloat16")
    fast = LLaMa.build(folder, max_seq_len=32, max_batch_size=3, dtype="bfloat16", pack=pack)
    kind = PackedLinear if pack else GemvLinear
    assert sum(isinstance(m, kind) for m in fast.model.modules()) == 7 * GQA["n_layers"] + 1
    _plain(plain)
    assert not any(isinstance(m, (GemvLinear, PackedLinear)) for m in plain.model.modules())
    x = torch.randint(0, GQA["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(fast.model(x, 0), plain.model(x, 0))
    assert torch.equal(fast.model(x[:1, :1], 9), plain.model(x[:1, :1], 9))  # batch-1 decode step: one row
    assert torch.equal(fast.model(x[:, :1], 9), plain.model(x[:, :1], 9))
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert fast.generate(prompts, 6, temperature=0) == plain.generate(prompts, 6, temperature=0)
    assert fast.generate(prompts[:1], 6, temperature=0) == plain.generate(prompts[:1], 6, temperature=0)
    assert torch.backends.mkldnn.enabled  # the switch GemvLinear flips is back

    expected, got = plain.model.state_dict(), fast.model.state_dict()
    assert list(got) == list(expected)  # Meta's keys, in Meta's order
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert torch.equal(fast.model.layers[1].attention.wq.weight, plain.model.layers[1].attention.wq.weight)
    assert weight_bytes(fast.model) == weight_bytes(plain.model)


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
    fp32 = LLaMa.build(folder, max_seq_len=8, dtype="float32")  # bf16 only: float32 has no oneDNN detour
    assert not any(isinstance(m, (GemvLinear, PackedLinear)) for m in fp32.model.modules())


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
