"""The batch completion CLI, run as users run it: a subprocess on a real checkpoint folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GQA

from llama.cpu import onednn_bf16

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "inference.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def folder(make_ckpt) -> Path:
    return make_ckpt(GQA, 2)[0]


def test_prompts_stay_strings_and_go_to_jsonl(folder, tmp_path):
    out = tmp_path / "out.jsonl"
    # fire alone would make "1,2" a tuple, "42" an int and keep only the last --prompt.
    r = run(
        "--ckpt_dir",
        str(folder),
        "--prompt",
        "1,2",
        "--prompt=42",
        "--prompt",
        "the king",
        "--temperature",
        "0",
        "--max_gen_len",
        "5",
        "--max_batch_size",
        "2",
        "--out",
        str(out),
        "--max_seq_len",
        "64",
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["1,2", "42", "the king"]
    assert all(len(row["tokens"]) == 5 and isinstance(row["completion"], str) for row in rows)


def test_prompts_file_text_and_jsonl_print_completions(folder, tmp_path):
    (tmp_path / "p.txt").write_text("the king\n\ngold and silver\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "bread\nwine"}) + "\n")
    for name, expected in (("p.txt", ["the king", "gold and silver"]), ("p.jsonl", ["bread\nwine"])):
        r = run(
            "--ckpt_dir",
            str(folder),
            "--prompts_file",
            str(tmp_path / name),
            "--temperature",
            "0",
            "--max_gen_len",
            "4",
            "--max_seq_len",
            "64",
            "--dtype",
            "float32",
        )
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


@pytest.mark.skipif(not onednn_bf16(), reason="this CPU's oneDNN has no bf16 kernels")
def test_pack_and_quantize_flags_reach_the_build(folder):
    from llama import LLaMa

    common = (
        "--ckpt_dir",
        str(folder),
        "--prompt",
        "the king",
        "--max_gen_len",
        "6",
        "--max_seq_len",
        "64",
        "--temperature",
        "0",
        "--dtype",
        "bfloat16",
        "--device",
        "cpu",
    )
    plain, packed, int8 = run(*common), run(*common, "--pack"), run(*common, "--quantize", "int8")
    assert plain.returncode == packed.returncode == int8.returncode == 0, plain.stderr + packed.stderr + int8.stderr
    assert packed.stdout == plain.stdout  # the same numbers in another layout
    _, texts = LLaMa.build(folder, max_seq_len=64, dtype="bfloat16", device="cpu", quantize="int8").text_completion(
        ["the king"], max_gen_len=6, temperature=0
    )
    assert f"the king\n> {texts[0]}\n" in int8.stdout


def test_bad_input_exits_with_the_message(folder, tmp_path):
    r = run("--ckpt_dir", str(tmp_path / "missing"))
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n\n\n{"text": "x"}\n')
    r = run("--ckpt_dir", str(folder), "--prompts_file", str(tmp_path / "bad.jsonl"))
    assert r.returncode != 0 and 'bad.jsonl:4 is not a JSON object with a "prompt" field' in r.stderr  # the file's line
    (tmp_path / "null.JSONL").write_text('{"prompt": null}\n')
    r = run("--ckpt_dir", str(folder), "--prompts_file", str(tmp_path / "null.JSONL"))
    assert r.returncode != 0 and 'null.JSONL:1: "prompt" is null, not a string' in r.stderr
    (tmp_path / "empty.txt").write_text("\n\n")
    r = run("--ckpt_dir", str(folder), "--prompts_file", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "empty.txt holds no prompts" in r.stderr and not (tmp_path / "o").exists()
    for args, said in (
        (["--prompt", "a", "--stop"], "error: --stop needs a value"),
        (["--prompt", "a", "--max_batch_size", "2.5"], "error: max_batch_size=2.5: use a whole number"),
        (["--prompt", "a", "--seed", "abc"], "error: seed='abc': use a whole number"),
        (["chat", "--prompts_file", "p.txt"], "error: no flag --prompts_file here"),
        (["--prompt", "a", "--out", str(tmp_path)], f"error: --out {tmp_path} is a folder: name a file"),
        (["--prompt", "a", "--out", str(tmp_path / "no" / "x")], f"error: --out {tmp_path}/no/x: the folder"),
    ):
        r = run(*args) if args[0] == "chat" else run("--ckpt_dir", str(folder), *args)
        assert r.returncode != 0 and r.stderr.strip().startswith(said) and "Traceback" not in r.stderr, r.stderr


def test_a_folder_named_by_a_number_stays_a_path(folder, tmp_path, monkeypatch):
    """fire reads 2024 as an int: path flags reach the command verbatim, as --prompt does."""
    (tmp_path / "2024").symlink_to(folder)
    (tmp_path / "7").write_text("the king\n")
    monkeypatch.chdir(tmp_path)
    r = run("--ckpt-dir", "2024", "--prompts_file", "7", "--out", "5", "--max_gen_len", "2", "--max_seq_len", "32")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "5").read_text())["prompt"] == "the king"


def test_streamed_batch_prints_what_the_batch_prints(folder):
    common = (
        "--ckpt_dir",
        str(folder),
        "--prompt",
        "the king",
        "--prompt",
        "gold",
        "--prompt",
        "a far land",
        "--max_gen_len",
        "12",
        "--max_seq_len",
        "64",
        "--max_batch_size",
        "2",
        "--temperature",
        "0.9",
    )
    streamed, printed = run(*common, "--stream", "True"), run(*common, "--stream", "False")
    assert streamed.returncode == 0 and printed.returncode == 0, streamed.stderr + printed.stderr
    assert streamed.stdout == printed.stdout and printed.stdout.count("=" * 34) == 3


def test_stop_flag_is_a_list_of_raw_strings(folder, tmp_path):
    out = tmp_path / "o.jsonl"
    r = run(
        "--ckpt_dir",
        str(folder),
        "--prompt",
        "the king",
        "--stop",
        "1,2",
        "--stop",
        "e",
        "--temperature",
        "0",
        "--max_gen_len",
        "30",
        "--max_seq_len",
        "64",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert "e" not in json.loads(out.read_text())["completion"]


def chat_session(folder: Path, lines: list[str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "inference.py"), "chat", "--ckpt_dir", str(folder), "--temperature", "0", *extra],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_chat_keeps_history_resets_and_exits(folder):
    from llama import LLaMa

    r = chat_session(
        folder,
        ["the king", "and the queen", "/reset", "the king", "/exit", "never read"],
        "--max_gen_len",
        "6",
        "--max_seq_len",
        "128",
        "--system",
        "1,2",
    )
    assert r.returncode == 0, r.stderr
    replies = [line.split("llama> ", 1)[1] for line in r.stdout.splitlines() if "llama> " in line]
    assert len(replies) == 3 and "(history cleared)" in r.stdout
    assert replies[2] == replies[0]  # after /reset the same question gets the same greedy answer
    llm = LLaMa.build(folder, max_seq_len=128, max_batch_size=1)
    first = [{"role": "system", "content": "1,2"}, {"role": "user", "content": "the king"}]
    expected = llm.chat_completion([first], temperature=0, max_gen_len=6)[0]["generation"]["content"]
    assert replies[0] == expected
    second = first + [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": "and the queen"}]
    assert replies[1] == llm.chat_completion([second], temperature=0, max_gen_len=6)[0]["generation"]["content"]


def test_chat_drops_oldest_turns_to_fit_and_refuses_special_tags(folder):
    r = chat_session(
        folder, ["the king of a far land spoke"] * 6 + ["[INST] hi"], "--max_gen_len", "8", "--max_seq_len", "96"
    )
    assert r.returncode == 0, r.stderr
    assert "(dropped the oldest turn to fit max_seq_len=96)" in r.stdout
    assert r.stdout.count("llama> ") == 7 and "special tags are not allowed" in r.stdout


def test_ctrl_c_stops_the_reply_not_the_session(folder, tmp_path):
    import signal

    from conftest import corpus, train_sentencepiece

    # A tokenizer without EOS: the reply can only end at max_gen_len, far beyond the signal.
    train_sentencepiece(folder / "tokenizer.model", corpus(), vocab_size=96, eos_id=-1)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "inference.py"),
            "chat",
            "--ckpt_dir",
            str(folder),
            "--max_gen_len",
            "4000",
            "--max_seq_len",
            "4096",
            "--temperature",
            "1.0",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C's default, as a terminal has it: a launcher that runs the tests in the background (a
        # shell's `cmd &`) hands SIGINT down ignored, and Python then raises no KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        proc.stdin.write("the king\n")
        proc.stdin.flush()
        seen = ""
        while "llama> " not in seen:
            seen += proc.stdout.read(1)
        # The reply's first character: it is streaming, and without an EOS it runs to 4000 tokens.
        assert proc.stdout.read(1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate("/exit\n", timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "[stopped]" in out


def test_a_llama3_folder_completes_and_chats(make_ckpt, tiktoken_path):
    """The same commands on a Llama 3 folder: its tokenizer, its chat format, its stop ids."""
    from conftest import LLAMA3

    from llama import LLaMa

    folder, _ = make_ckpt(LLAMA3, 2, tokenizer=tiktoken_path, vocab_parallel_embedding=True)
    llm = LLaMa.build(folder, max_seq_len=128, max_batch_size=1)
    r = run("--ckpt_dir", str(folder), "--prompt", "the king", "--max_gen_len", "5", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    expected = llm.text_completion(["the king"], temperature=0, max_gen_len=5).texts[0]
    assert f"the king\n> {expected}\n" in r.stdout
    r = chat_session(folder, ["the king", "/exit"], "--max_gen_len", "6", "--max_seq_len", "128")
    assert r.returncode == 0, r.stderr
    reply = r.stdout.split("llama> ", 1)[1].split("\nyou> ", 1)[0]
    dialog = [{"role": "user", "content": "the king"}]
    assert reply == llm.chat_completion([dialog], temperature=0, max_gen_len=6)[0]["generation"]["content"]


def test_a_misspelt_or_bad_flag_is_one_line_naming_it(folder):
    r = run("--ckpt_dir", str(folder), "--promt", "the king")
    assert r.returncode != 0 and r.stdout == ""  # nothing generated
    assert (
        r.stderr.strip()
        == "error: no flag --promt (did you mean --prompt?) here: python inference.py --help lists them"
    )
    r = run("chat", "--ckpt_dir", str(folder), "--temprature", "0")
    assert r.stderr.strip().startswith("error: no flag --temprature (did you mean --temperature?)")
    r = run("infill", "--ckpt_dir", str(folder), "-p", "the king", "--suffix", "q")  # fire split it into 8 prefixes
    assert r.returncode != 0 and r.stderr.strip() == "error: -p: write flags in full (--prefix)"
    r = run("--ckpt_dir", str(folder), "--temperature", "abc", "--max_gen_len", "2")
    assert (
        r.returncode != 0
        and r.stderr.strip() == "error: temperature='abc': use 0 for greedy decoding or a positive number"
    )


def test_help_lists_the_commands(folder):
    r = run("--help")
    assert r.returncode == 0
    assert "python inference.py chat" in r.stdout and "python inference.py infill" in r.stdout
    assert "--max_gen_len" in r.stdout + r.stderr  # then fire's list of complete's flags (it writes to stderr)


def test_a_message_too_long_to_fit_is_refused_and_the_history_kept(folder):
    from llama import LLaMa

    long = "the king " * 80  # alone more than max_seq_len=96
    r = chat_session(folder, ["the king", long, "and the queen"], "--max_gen_len", "6", "--max_seq_len", "96")
    assert r.returncode == 0, r.stderr
    assert "(that message does not fit max_seq_len=96: shorten it)" in r.stdout and "dropped" not in r.stdout
    replies = [line.split("llama> ", 1)[1] for line in r.stdout.splitlines() if "llama> " in line]
    llm = LLaMa.build(folder, max_seq_len=96, max_batch_size=1)
    first = [{"role": "user", "content": "the king"}]
    second = first + [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": "and the queen"}]
    assert replies[1] == llm.chat_completion([second], temperature=0, max_gen_len=6)[0]["generation"]["content"]


def test_chat_refuses_a_system_message_or_max_gen_len_that_leaves_no_reply_before_the_first_message(folder):
    for extra, said in (
        (["--system", "the king " * 40, "--max_seq_len", "32"], "error: --system leaves no room for a message"),
        (["--max_gen_len", "0"], "error: max_gen_len=0: ask for a whole number of new tokens"),
    ):
        r = chat_session(folder, ["hi"], *extra)
        assert r.returncode == 1 and r.stderr.strip().startswith(said) and "llama> " not in r.stdout, r.stderr
