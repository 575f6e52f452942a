"""The built-in model shipped in llama/models/shakespeare: a real Meta folder, two shards that merge
to the model, and text that looks like a play."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import meta_split

from llama import LLaMa, Tokenizer
from llama.loading import BUILTIN_MODEL
from llama.model import ModelArgs

ROOT = Path(__file__).resolve().parents[1]


def test_folder_is_meta_layout_within_25_mb_and_checksums_verify():
    files = sorted(p.name for p in BUILTIN_MODEL.iterdir())
    assert files == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    assert sum(p.stat().st_size for p in BUILTIN_MODEL.iterdir()) <= 25 * 1024 * 1024
    listed = {}
    for line in (BUILTIN_MODEL / "checklist.chk").read_text().splitlines():
        digest, name = line.split("  ")
        listed[name] = digest
    assert sorted(listed) == [f for f in files if f != "checklist.chk"]
    for name, digest in listed.items():
        assert hashlib.md5((BUILTIN_MODEL / name).read_bytes()).hexdigest() == digest, name


def test_architecture_uses_gqa_and_the_ffn_rounding_rule():
    args = ModelArgs.from_params(json.loads((BUILTIN_MODEL / "params.json").read_text()))
    assert args.kv_heads < args.n_heads and args.n_heads % 2 == args.kv_heads % 2 == 0
    unrounded = int(2 * 4 * args.dim / 3)
    assert unrounded % args.multiple_of != 0 and args.ffn_hidden_dim > unrounded


def test_tokenizer_keeps_newlines_and_runs_of_spaces():
    tok = Tokenizer(BUILTIN_MODEL / "tokenizer.model")
    text = "KING HENRY VI:\nWhat,  ho!\n\n   Sir,\n"
    assert tok.decode(tok.encode(text, bos=True, eos=False)) == text


def test_both_shards_are_metas_split_of_the_loaded_model():
    llm = LLaMa.build(max_seq_len=16, dtype="bfloat16", device="cpu")
    merged = llm.model.state_dict()
    shards = [torch.load(BUILTIN_MODEL / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    for expected, shard in zip(meta_split(merged, 2), shards):
        assert expected.keys() == shard.keys()
        for key in shard:
            assert torch.equal(expected[key], shard[key]), key


def test_completions_look_like_a_play():
    llm = LLaMa.build(max_seq_len=256)
    _, texts = llm.text_completion(["ROMEO:\n", "First Citizen:\n"], temperature=0, max_gen_len=80)
    for text in texts:
        assert "\n" in text and len(text.split()) > 20
    speakers = [line for text in texts for line in text.splitlines() if re.fullmatch(r"[A-Z][A-Za-z ]+:", line)]
    assert speakers, texts  # a new speaker's name on its own line, as in the plays


def test_inference_py_with_no_arguments_runs_the_built_in_model():
    r = subprocess.run(
        [sys.executable, str(ROOT / "inference.py")],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("==================================") == 4 and "ROMEO:\n\n> " in r.stdout


def test_a_plain_install_carries_the_presets_and_the_builtin_model(tmp_path):
    """`pip install .` (not editable) puts params/ inside the package, as llama/presets."""
    pytest.importorskip("setuptools")
    repo = Path(__file__).resolve().parents[1]
    wheel = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(repo),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert wheel.returncode == 0, wheel.stderr
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site")]
    assert (
        subprocess.run([*install, *map(str, tmp_path.glob("*.whl"))], capture_output=True, timeout=300).returncode == 0
    )
    code = (
        "import llama.loading as l; assert 'site' in str(l.PRESETS_DIR), l.PRESETS_DIR; "
        "print(l.preset_args('llama-3.2-1b').dim, l.BUILTIN_MODEL.is_dir())"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["2048", "True"], r.stderr
