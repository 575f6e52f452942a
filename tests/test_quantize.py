"""Weight-only int8 / int4: kernels against dequantized references, error bounds, saved folders."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import GQA, write_checkpoint
from llama import LLaMa
from llama.cpu import compiled_kernels
from llama.quantize import Int4Linear, Int8Linear, make_quantized, save_quantized


def random_linear(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * in_f**-0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_torch_kernel_equals_dequantized_reference(dtype):
    w = random_linear(96, 128)
    q = Int8Linear(128, 96, dtype, blocks=False).quantize_(w)
    deq = q.weight.float() * q.scales.float()[:, None]
    # symmetric per-channel rounding: error at most half a step (scale / 2) per weight
    assert ((deq - w).abs() <= q.scales.float()[:, None] / 2 + 1e-6).all()
    x = torch.randn(2, 5, 128, dtype=dtype)
    expected = x.float() @ deq.T
    atol = 1e-4 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(q(x).float(), expected, atol=atol, rtol=0.02)


def int8_activation_bound(x: torch.Tensor, weight_error: torch.Tensor, group: int) -> torch.Tensor:
    """How far llama.cpu's int8 / int4 kernels may be from the exact product: each x row is rounded
    to int8 per group of inputs, steps of max|x| / 127 in the group, so each input is off by half a
    step, times |w| summed over the group (weight_error [out, in], the integer weight times its
    scale). [rows, out]"""
    pad = -x.shape[1] % group
    steps = F.pad(x.double().abs(), (0, pad)).reshape(x.shape[0], -1, group).amax(-1) / 127  # [rows, groups]
    per_group = F.pad(weight_error, (0, pad)).reshape(weight_error.shape[0], -1, group).sum(-1)  # [out, groups]
    return steps @ per_group.T / 2 * 1.001


@pytest.mark.skipif(compiled_kernels() is None, reason="no AVX-512 BF16 / VNNI or no C++ compiler here")
@pytest.mark.parametrize("out_f,in_f", [(37, 100), (70, 2048), (33, 9000)])  # a tail of inputs and of rows
def test_int8_kernel_is_the_dequantized_product_up_to_int8_activations(out_f, in_f):
    q = Int8Linear(in_f, out_f, blocks=True).quantize_(random_linear(out_f, in_f, seed=in_f))
    deq = q.dequantized(torch.float64)
    x = torch.randn(7, in_f, generator=torch.Generator().manual_seed(out_f)).to(torch.bfloat16)
    got = q(x)
    assert torch.equal(got, compiled_kernels().mm_int8(x, q.blocks, out_f))
    exact = x.double() @ deq.T
    bound = int8_activation_bound(x, deq.abs(), 64) + exact.abs() * 2**-8 + 1e-6  # plus the output's bf16 rounding
    assert ((got.double() - exact).abs() <= bound).all()
    for rows in (1, 2, 3, 4, 5):  # decode steps (up to 4 rows at once) and prompts: each row alone
        assert torch.equal(q(x[:rows]), got[:rows])
    assert torch.equal(q(x[3:4]), got[3:4])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_both_layouts_hold_the_same_weights(scheme):
    """The kernels' layout and the portable one: same state_dict, same dequantized weights, and
    each loads the other's state_dict."""
    w = random_linear(40, 128, seed=5)  # 40 rows: a partial last block of 32
    make = (lambda blocks: Int8Linear(128, 40, blocks=blocks)) if scheme == "int8" else \
        (lambda blocks: Int4Linear(128, 40, 32, blocks=blocks))  # fmt: skip
    kernel, portable = make(True).quantize_(w), make(False).quantize_(w)
    assert "blocks" in dict(kernel.named_buffers()) and "blocks" not in dict(portable.named_buffers())
    a, b = kernel.state_dict(), portable.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(kernel.dequantized(torch.float32), portable.dequantized(torch.float32))
    assert all(torch.equal(getattr(kernel, name), b[name]) for name in type(kernel).PORTABLE)
    again = make(True)
    again.load_state_dict(b)
    assert torch.equal(again.blocks, kernel.blocks)


@pytest.mark.parametrize("group_size", [32, 64, 256])
def test_int4_rounding_and_torch_kernel_equal_the_dequantized_reference(group_size):
    w = random_linear(64, 512, seed=1)
    q = Int4Linear(512, 64, group_size, blocks=False).quantize_(w)
    deq = q.dequantized(torch.float32)
    step = q.scales_and_zeros[..., 0].float().T.repeat_interleave(group_size, 1)
    # asymmetric grouped rounding: within half a step, plus what storing scale and zero in bf16 costs
    assert ((deq - w).abs() <= step / 2 + 0.02).all()
    x = torch.randn(3, 512)  # float32 goes to torch's int4 kernel
    torch.testing.assert_close(q(x), x @ deq.T, atol=1e-4, rtol=1e-4)


def test_int4_state_dict_is_the_portable_layout():
    """A quantized folder holds nibbles [out, in/2] (q[2j] high, q[2j+1] low) and (scale, zero)
    pairs [in/group, out, 2]: written out from those definitions, they load into the same weights."""
    out_f, in_f, group = 40, 128, 32  # 40 rows: a partial last block of 32
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (out_f, in_f), generator=gen)
    pairs = (torch.rand(in_f // group, out_f, 2, generator=gen) * 0.1).bfloat16()
    state = {"weight": (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), "scales_and_zeros": pairs}
    m = Int4Linear(in_f, out_f, group, blocks=compiled_kernels() is not None)
    m.load_state_dict(state)
    assert torch.equal(m.unpacked(), q.int()) and torch.equal(m.scales_and_zeros, pairs)
    scale, zero = (t.T.repeat_interleave(group, 1).float() for t in pairs.unbind(-1))
    torch.testing.assert_close(m.dequantized(torch.float32), (q - 8) * scale + zero)
    again = m.state_dict()
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    with pytest.raises(RuntimeError, match=r"weight: shape \(40, 32\), expected \(40, 64\)"):
        Int4Linear(in_f, out_f, group).load_state_dict({**state, "weight": state["weight"][:, :32]})


@pytest.mark.skipif(compiled_kernels() is None, reason="no AVX-512 BF16 / VNNI or no C++ compiler here")
@pytest.mark.parametrize("out_f,in_f,group", [(37, 256, 32), (70, 2048, 64), (64, 5632, 64), (32, 1024, 256)])
def test_int4_kernel_is_the_dequantized_product_up_to_int8_activations(out_f, in_f, group):
    q = Int4Linear(in_f, out_f, group, blocks=True).quantize_(random_linear(out_f, in_f, seed=in_f))
    deq = q.dequantized(torch.float64)
    scale = q.scales_and_zeros[..., 0].double().T.repeat_interleave(group, 1)  # [out, in]
    x = torch.randn(7, in_f, generator=torch.Generator().manual_seed(out_f)).to(torch.bfloat16)
    got = q(x)
    assert torch.equal(got, compiled_kernels().mm_int4(x, q.blocks, out_f, group))
    exact = x.double() @ deq.T
    # The kernel sums (q - 8) x in integers; the zero term takes x's exact sum. Plus the output's bf16 rounding.
    bound = int8_activation_bound(x, (q.unpacked() - 8).abs() * scale, group) + exact.abs() * 2**-8 + 1e-6
    assert ((got.double() - exact).abs() <= bound).all()
    for rows in (1, 2, 3, 4, 5):  # decode steps (up to 4 rows at once) and prompts: each row alone
        assert torch.equal(q(x[:rows]), got[:rows])
    assert torch.equal(q(x[3:4]), got[3:4])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_stays_close_and_saves_once(make_ckpt, tmp_path, scheme):
    folder, _ = make_ckpt(dict(GQA, multiple_of=64), 2)  # FFN 256: int4's groups of 32 divide it
    base = LLaMa.build(folder, max_seq_len=32, dtype="float32")
    quant = LLaMa.build(folder, max_seq_len=32, dtype="float32", quantize=scheme)
    assert not any(isinstance(m, torch.nn.Linear) for m in quant.model.modules())
    x = torch.tensor([[1, 5, 9, 14, 3, 40, 22, 7]])
    ref, got = base.model(x, 0), quant.model(x, 0)
    rel = ((got - ref).norm() / ref.norm()).item()
    # random gaussian weights are the worst case for 4 bits (about 8% error per weight)
    assert rel < (0.02 if scheme == "int8" else 0.25), rel
    out = save_quantized(quant.model, tmp_path / "q", folder / "tokenizer.model")
    again = LLaMa.build(out, max_seq_len=32, dtype="float32")
    torch.testing.assert_close(again.model(x, 0), got)
    assert again.generate([[1, 2, 3]], 5, temperature=0) == quant.generate([[1, 2, 3]], 5, temperature=0)
    with pytest.raises(ValueError, match="already quantized"):
        LLaMa.build(out, max_seq_len=32, quantize="int8")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_bf16_batches_decode(make_ckpt, scheme):
    """Generation projects the last position of each row, a strided [B, dim] view: every kernel
    path (up to 4 rows, more) takes it and gives what a contiguous copy gives."""
    folder, _ = make_ckpt(dict(GQA, multiple_of=64), 1)
    llm = LLaMa.build(folder, max_seq_len=32, max_batch_size=5, dtype="bfloat16", quantize=scheme)
    x = torch.randint(3, GQA["vocab_size"], (5, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for rows in (3, 5):
            last = llm.model.hidden(x[:rows], 0)[:, -1]
            assert not last.is_contiguous()
            assert torch.equal(llm.model.output(last), llm.model.output(last.contiguous()))
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12]]
    tokens, _ = llm.generate(prompts, 4, temperature=0)  # the new tokens, cut at an EOS
    assert len(tokens) == 5 and all(1 <= len(t) <= 4 and max(t) < GQA["vocab_size"] for t in tokens)


def test_a_quantized_folder_that_does_not_fit_its_params_names_the_file(make_ckpt, tmp_path):
    folder, _ = make_ckpt(dict(GQA, multiple_of=64), 1)
    out = save_quantized(LLaMa.build(folder, max_seq_len=8, quantize="int4").model, tmp_path / "q", folder / "tokenizer.model")
    state = torch.load(out / "consolidated.00.pth", weights_only=True)
    state["layers.0.feed_forward.w2.weight"] = state["layers.0.feed_forward.w2.weight"][:, :-1]
    del state["layers.1.attention.wq.scales_and_zeros"]
    torch.save(state, out / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated.00.pth does not match .*int4") as e:
        LLaMa.build(out, max_seq_len=8)
    assert "layers.0.feed_forward.w2.weight: shape" in str(e.value) and "layers.1.attention.wq.scales_and_zeros" in str(e.value)


def test_bad_scheme_is_refused_before_loading(make_ckpt):
    folder, _ = make_ckpt(GQA, 1)
    with pytest.raises(ValueError, match="quantize='int3': use one of int8, int4"):
        LLaMa.build(folder, quantize="int3")
    with pytest.raises(ValueError, match="group_size=48 does not divide in_features=64"):
        make_quantized(LLaMa.build(folder, max_seq_len=8).model, "int4", group_size=48)


def test_quantize_command_writes_a_folder_that_checks_out(make_ckpt, tmp_path):
    folder, _ = make_ckpt(GQA, 2)
    r = subprocess.run([sys.executable, "-m", "llama.quantize", str(folder), str(tmp_path / "q8")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    check = subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=tmp_path / "q8", capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 4
    assert LLaMa.build(tmp_path / "q8", max_seq_len=8).model.quantization == {"scheme": "int8", "group_size": None}


PEAK = r"""
import json, sys
from llama import LLaMa
from llama.cpu import weight_bytes

def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

import torch
torch.empty_like(torch.empty(1, device="meta"), device="cpu")  # torch's one-time cost (~35 MB), not the model's
base = status("VmRSS")
llm = LLaMa.build(sys.argv[1], tokenizer_path=sys.argv[2], max_seq_len=8, max_batch_size=1, dtype="bfloat16",
                  device="cpu", quantize="int8")
print(json.dumps({"peak": status("VmHWM") - base, "weights": weight_bytes(llm.model)}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_quantizing_a_mapped_shard_never_holds_the_float_model(tmp_path, sp_model_path):
    """Meta's 7B is one bf16 shard: quantized while loading, it must fit where the bf16 model would not."""
    params = dict(dim=1024, n_layers=8, n_heads=8, vocab_size=96, multiple_of=256, norm_eps=1e-5)
    sd = write_checkpoint(tmp_path / "m", params, dtype=torch.bfloat16)
    bf16_bytes = sum(t.numel() * 2 for t in sd.values())  # 206 MB
    del sd
    # glibc may keep the quantizer's freed temporaries on its heap, which moves the peak from run
    # to run; a fixed mmap threshold hands them back at once, so the peak is what the code holds.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    r = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "m"), str(sp_model_path)],
                       capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["weights"] < 0.55 * bf16_bytes
    assert got["peak"] < 0.7 * bf16_bytes, (got, bf16_bytes)  # the int8 weights and one float matrix
