"""Quantized models: close to the float one, saved once and loaded again, batches, bad folders and
schemes, the quantize command, memory while quantizing a mapped shard."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GQA, write_checkpoint

from llama import LLaMa
from llama.quantize import make_quantized, save_quantized


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_stays_close_and_saves_once(make_ckpt, tmp_path, scheme):
    folder, _ = make_ckpt(dict(GQA, multiple_of=64), 2)  # FFN 256: int4's groups of 32 divide it
    base = LLaMa.build(folder, max_seq_len=32, dtype="float32", device="cpu")
    quant = LLaMa.build(folder, max_seq_len=32, dtype="float32", device="cpu", quantize=scheme)
    assert not any(isinstance(m, torch.nn.Linear) for m in quant.model.modules())
    x = torch.tensor([[1, 5, 9, 14, 3, 40, 22, 7]])
    ref, got = base.model(x, 0), quant.model(x, 0)
    rel = ((got - ref).norm() / ref.norm()).item()
    # random gaussian weights are the worst case for 4 bits (about 8% error per weight)
    assert rel < (0.02 if scheme == "int8" else 0.25), rel
    out = save_quantized(quant.model, tmp_path / "q", folder / "tokenizer.model")
    again = LLaMa.build(out, max_seq_len=32, dtype="float32", device="cpu")
    torch.testing.assert_close(again.model(x, 0), got)
    assert again.generate([[1, 2, 3]], 5, temperature=0) == quant.generate([[1, 2, 3]], 5, temperature=0)
    with pytest.raises(ValueError, match="already quantized"):
        LLaMa.build(out, max_seq_len=32, quantize="int8")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_bf16_batches_decode(make_ckpt, scheme):
    """Generation projects the last position of each row, a strided [B, dim] view: every kernel
    path (up to 4 rows, more) takes it and gives what a contiguous copy gives."""
    folder, _ = make_ckpt(dict(GQA, multiple_of=64), 1)
    llm = LLaMa.build(folder, max_seq_len=32, max_batch_size=5, dtype="bfloat16", device="cpu", quantize=scheme)
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
    out = save_quantized(
        LLaMa.build(folder, max_seq_len=8, quantize="int4").model, tmp_path / "q", folder / "tokenizer.model"
    )
    state = torch.load(out / "consolidated.00.pth", weights_only=True)
    state["layers.0.feed_forward.w2.weight"] = state["layers.0.feed_forward.w2.weight"][:, :-1]
    del state["layers.1.attention.wq.scales_and_zeros"]
    torch.save(state, out / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated.00.pth does not match .*int4") as e:
        LLaMa.build(out, max_seq_len=8)
    assert "layers.0.feed_forward.w2.weight: shape" in str(e.value) and "layers.1.attention.wq.scales_and_zeros" in str(
        e.value
    )


def test_bad_scheme_is_refused_before_loading(make_ckpt):
    folder, _ = make_ckpt(GQA, 1)
    with pytest.raises(ValueError, match="quantize='int3': use one of int8, int4"):
        LLaMa.build(folder, quantize="int3")
    with pytest.raises(
        ValueError, match="group_size=48 does not divide in_features=64: use make_quantized.*group_size=64"
    ):
        make_quantized(LLaMa.build(folder, max_seq_len=8).model, "int4", group_size=48)


def quantize_command(src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llama.convert.quantized", str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_quantize_command_writes_a_folder_that_checks_out(make_ckpt, tmp_path):
    folder, _ = make_ckpt(GQA, 2)
    r = quantize_command(folder, tmp_path / "q8")
    assert r.returncode == 0, r.stderr
    check = subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=tmp_path / "q8", capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 4
    assert LLaMa.build(tmp_path / "q8", max_seq_len=8).model.quantization == {"scheme": "int8", "group_size": None}


def test_a_folder_that_holds_a_checkpoint_is_never_written_over(make_ckpt, tmp_path):
    """Quantizing a one-shard bf16 folder into itself wrote over the shard it was mapped from (a bus
    error, the source cut to a few KB): any folder holding a checkpoint is refused before writing."""
    folder, _ = make_ckpt(GQA, 1, dtype=torch.bfloat16)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    save_quantized(make_quantized(LLaMa.build(folder, device="cpu").model, "int8"), tmp_path / "q")
    for out in (folder, tmp_path / "q"):
        r = quantize_command(folder, out)
        said = f"error: {out} already holds a model (consolidated.00.pth, params.json): write to a new"
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(said), r.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    with pytest.raises(ValueError, match="the model is not quantized: make_quantized"):
        save_quantized(LLaMa.build(folder, device="cpu").model, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    # The folder holding the tokenizer (Meta's parent layout) takes the quantized files beside it.
    (tmp_path / "parent" / "m").mkdir(parents=True)
    for name in ("params.json", "consolidated.00.pth", "tokenizer.model"):
        (tmp_path / "parent" / "m" / name).write_bytes(before[name])
    (tmp_path / "parent" / "m" / "tokenizer.model").rename(tmp_path / "parent" / "tokenizer.model")
    r = quantize_command(tmp_path / "parent" / "m", tmp_path / "parent")
    assert r.returncode == 0, r.stderr
    assert LLaMa.build(tmp_path / "parent", max_seq_len=8).model.quantization["scheme"] == "int8"


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
    r = subprocess.run(
        [sys.executable, "-c", PEAK, str(tmp_path / "m"), str(sp_model_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["weights"] < 0.55 * bf16_bytes
    assert got["peak"] < 0.7 * bf16_bytes, (got, bf16_bytes)  # the int8 weights and one float matrix


@pytest.mark.parametrize(
    "text, match",
    [
        ("{scheme: int8", "quantization.json is not JSON"),
        ('{"scheme": "int3"}', "scheme 'int3' is not one this version reads"),
        ('["int8"]', "scheme \\['int8'\\] is not one"),
        ('{"scheme": "int4", "group_size": "64"}', "group_size '64' for int4: it is one of 32, 64, 128, 256"),
        ('{"scheme": "int4", "group_size": 64.0}', "group_size 64.0 for int4"),
        ('{"scheme": "int8", "group_size": 64}', "group_size 64 for int8: it is null"),
    ],
)
def test_a_damaged_quantization_json_names_the_file_and_field(make_ckpt, tmp_path, text, match):
    folder, _ = make_ckpt(GQA, 1)
    llm = LLaMa.build(folder, max_seq_len=8, quantize="int8")
    out = save_quantized(llm.model, tmp_path / "q8", folder / "tokenizer.model")
    (out / "quantization.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        LLaMa.build(out, max_seq_len=8)
