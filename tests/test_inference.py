"""The batch completion CLI, run as users run it: a subprocess on a real checkpoint folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GQA

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "inference.py"), *args], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.fixture
def folder(make_ckpt) -> Path:
    return make_ckpt(GQA, 2)[0]


def test_prompts_stay_strings_and_go_to_jsonl(folder, tmp_path):
    out = tmp_path / "out.jsonl"
    # fire alone would make "1,2" a tuple, "42" an int and keep only the last --prompt.
    r = run("--ckpt_dir", str(folder), "--prompt", "1,2", "--prompt=42", "--prompt", "the king",
            "--temperature", "0", "--max_gen_len", "5", "--max_batch_size", "2", "--out", str(out), "--max_seq_len", "64")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["1,2", "42", "the king"]
    assert all(len(row["tokens"]) == 5 and isinstance(row["completion"], str) for row in rows)


def test_prompts_file_text_and_jsonl_print_completions(folder, tmp_path):
    (tmp_path / "p.txt").write_text("the king\n\ngold and silver\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "bread\nwine"}) + "\n")
    for name, expected in (("p.txt", ["the king", "gold and silver"]), ("p.jsonl", ["bread\nwine"])):
        r = run("--ckpt_dir", str(folder), "--prompts_file", str(tmp_path / name), "--temperature", "0",
                "--max_gen_len", "4", "--max_seq_len", "64", "--dtype", "float32")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("\n> ") == len(expected)
        for p in expected:
            assert f"{p}\n> " in r.stdout


def test_cli_output_equals_library_output(folder):
    from llama import LLaMa

    r = run("--ckpt_dir", str(folder), "--prompt", "the king", "--max_gen_len", "8", "--max_seq_len", "64")
    assert r.returncode == 0, r.stderr
    _, texts = LLaMa.build(folder, max_seq_len=64).text_completion(["the king"], max_gen_len=8)
    assert f"the king\n> {texts[0]}\n" in r.stdout


def test_bad_input_exits_with_the_message(folder, tmp_path):
    r = run("--ckpt_dir", str(tmp_path / "missing"))
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    r = run("--ckpt_dir", str(folder), "--prompts_file", str(tmp_path / "bad.jsonl"))
    assert r.returncode != 0 and 'bad.jsonl:1 is not a JSON object with a "prompt" field' in r.stderr
