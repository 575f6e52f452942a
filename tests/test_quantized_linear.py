"""Int8Linear / Int4Linear: rounding, torch's kernels and the compiled ones against dequantized
references (the latter within the error their int8 activations allow), both layouts, the portable
state_dict."""

import pytest
import torch
import torch.nn.functional as F

from llama.cpu import compiled_kernels
from llama.quantized_linear import Int4Linear, Int8Linear


def random_linear(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * in_f**-0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_torch_kernel_equals_dequantized_reference(dtype):
    w = random_linear(96, 128)
    q = Int8Linear(128, 96, dtype, kernel_layout=False).quantize_(w)
    deq = q.weight.float() * q.scales.float()[:, None]
    # symmetric per-channel rounding: error at most half a step (scale / 2) per weight
    assert ((deq - w).abs() <= q.scales.float()[:, None] / 2 + 1e-6).all()
    x = torch.randn(2, 5, 128, dtype=dtype)
    expected = x.float() @ deq.T
    atol = 1e-4 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(q(x).float(), expected, atol=atol, rtol=0.02)


def int8_activation_bound(x: torch.Tensor, weight_error: torch.Tensor, group: int) -> torch.Tensor:
    """How far llama.kernels' int8 / int4 kernels may be from the exact product: each x row is rounded
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
    q = Int8Linear(in_f, out_f, kernel_layout=True).quantize_(random_linear(out_f, in_f, seed=in_f))
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
    make = (
        (lambda kernel_layout: Int8Linear(128, 40, kernel_layout=kernel_layout))
        if scheme == "int8"
        else (lambda kernel_layout: Int4Linear(128, 40, 32, kernel_layout=kernel_layout))
    )
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
    q = Int4Linear(512, 64, group_size, kernel_layout=False).quantize_(w)
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
    m = Int4Linear(in_f, out_f, group, kernel_layout=compiled_kernels() is not None)
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
    q = Int4Linear(in_f, out_f, group, kernel_layout=True).quantize_(random_linear(out_f, in_f, seed=in_f))
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
