"""Tensor parallel runs (llama.parallel) in spawned CPU processes over gloo, against one process on
the same folder: float32 logits within 1e-5, the same greedy ids and seeded samples, the cache's
decode equal to a full forward, ~1/N of the weights per rank; errors on one rank end them all; the
CLI under torchrun prints and writes once."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import GQA, MHA

from llama import LLaMa
from llama.cpu import weight_bytes
from llama.parallel import leave

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[1, 5, 9, 14, 3], [1, 40]]


def torchrun_command(n: int) -> list[str]:
    """torchrun with n processes on this machine, on a port nothing else holds."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(n),
        "--master_port",
        str(free_port()),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str, out: str, build: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    code = 1
    try:
        result = {}
        try:
            mine = {k: v for k, v in build.items() if k != "on_rank_1"}
            result = run_rank(folder, mine | (build.get("on_rank_1", {}) if rank == 1 else {}))
        except (ValueError, FileNotFoundError) as e:  # what the CLI prints as its one-line error
            result = {"error": str(e)}
        torch.save(result, Path(out) / f"rank{rank}.pt")
        code = 0
    except Exception:
        traceback.print_exc()
    finally:
        leave(code)  # as the CLI's ranks end


def run_rank(folder: str, build: dict) -> dict:
    from llama.parallel import local_bytes

    llm = LLaMa.build(folder, **({"max_seq_len": 32, "max_batch_size": 2, "dtype": "float32", "device": "cpu"} | build))
    x = torch.tensor([[1, 5, 9, 14, 3, 7], [1, 40, 41, 2, 8, 9]])
    full = llm.model(x, 0)
    llm.model(x[:, :4], 0)
    steps = [llm.model(x[:, i : i + 1], i) for i in (4, 5)]  # the cache's decode
    return {
        "logits": full,
        "steps": torch.cat(steps, dim=1),
        "greedy": llm.generate(PROMPTS, 8, temperature=0)[0],
        "sampled": llm.generate(PROMPTS, 8, temperature=1.0, top_p=0.95)[0],
        # more prompts than rows, each with its own budget: rows end apart and slots are refilled
        "many": [c.tokens for c in llm.complete_many(PROMPTS * 2, temperature=0, max_gen_len=[8, 3, 5, 6])],
        "bytes": local_bytes(llm.model),
    }


def spawn(world: int, folder: Path, tmp_path: Path, **build) -> list[dict]:
    """Each rank's results (or its error) from `world` spawned processes building `folder`;
    build["on_rank_1"] holds arguments for rank 1 alone."""
    out = Path(tempfile.mkdtemp(dir=tmp_path))
    mp.start_processes(_worker, (world, free_port(), str(folder), str(out), build), nprocs=world, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize(
    "params, shards, world",
    [(MHA, 4, 2), (MHA, 1, 4), (GQA, 2, 4), (GQA, 1, 2)],
    ids=["mha-4shards-2ranks", "mha-1shard-4ranks", "gqa-2shards-4ranks-kv-repeated", "gqa-1shard-2ranks"],
)
def test_n_processes_compute_what_one_does(make_ckpt, tmp_path, params, shards, world):
    folder, _ = make_ckpt(params, shards)
    one = run_rank(str(folder), {})
    ranks = spawn(world, folder, tmp_path)
    total = weight_bytes(LLaMa.build(folder, max_seq_len=32, dtype="float32", device="cpu").model)
    for rank, got in enumerate(ranks):
        torch.testing.assert_close(got["logits"], one["logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(got["steps"], one["logits"][:, 4:6], atol=1e-5, rtol=0)
        assert got["greedy"] == one["greedy"] and got["sampled"] == one["sampled"], rank
        assert got["many"] == one["many"], rank
        # its slice of every matrix; the norms (a few hundred values) are whole on each rank
        assert got["bytes"] < total / world * 1.1, (rank, got["bytes"], total)


def test_process_counts_that_cannot_split_the_heads_name_those_that_can(make_ckpt, tmp_path):
    folder, _ = make_ckpt(GQA, 1)
    ranks = spawn(3, folder, tmp_path)
    assert all("3 processes cannot split" in r["error"] and "use one of 1, 2, 4" in r["error"] for r in ranks)


def test_the_feed_forward_width_and_vocabulary_limit_the_process_count_too():
    from llama.model import ModelArgs
    from llama.parallel import check_world_size

    args = ModelArgs.from_params(dict(MHA, multiple_of=34))  # 4 heads, but a feed-forward width of 170
    with pytest.raises(
        ValueError, match="4 processes cannot split .*feed-forward width 170, vocab 96.: use one of 1, 2"
    ):
        check_world_size(args, 4, Path("m"))


def test_an_error_on_one_rank_ends_every_rank_with_its_message(make_ckpt, tmp_path):
    """Rank 1 alone is given a tokenizer that is not there: rank 0 must not wait for it forever."""
    folder, _ = make_ckpt(MHA, 2)
    ranks = spawn(2, folder, tmp_path, on_rank_1={"tokenizer_path": str(tmp_path / "missing.model")})
    assert ranks[0]["error"].startswith("rank 1 failed: FileNotFoundError: no tokenizer model at")
    assert ranks[1]["error"].startswith("no tokenizer model at")


def test_more_processes_than_gpus_are_refused_on_every_rank(monkeypatch):
    """As on a 1-GPU machine under torchrun --nproc_per_node 2 (seen on an H200: rank 1 asked for
    cuda:1 and died in CUDA). The check runs before any CUDA call, so it is reached here without one."""
    from llama.parallel import local_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(ValueError, match=r"started 2 processes on this machine but it has 1 CUDA .*--device cpu"):
            local_device()


def test_quantize_and_random_weights_stay_single_process(make_ckpt, tmp_path):
    folder, _ = make_ckpt(MHA, 1)
    ranks = spawn(2, folder, tmp_path, quantize="int8")
    assert all("quantize= run in one process" in r["error"] for r in ranks)


def test_the_cli_under_torchrun_prints_and_writes_once(make_ckpt, tmp_path):
    folder, _ = make_ckpt(GQA, 2)
    args = ["--ckpt_dir", str(folder), "--prompt", "the king", "--prompt", "war", "--temperature", "0"]
    args += ["--max_gen_len", "6", "--max_seq_len", "64", "--dtype", "float32", "--device", "cpu"]
    torchrun = torchrun_command(2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run(
        [*torchrun, str(REPO / "inference.py"), *args], capture_output=True, text=True, env=env, timeout=300
    )
    one = subprocess.run(
        [sys.executable, str(REPO / "inference.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and two.stdout.count("the king\n> ") == 1
    out = tmp_path / "out.jsonl"
    written = subprocess.run(
        [*torchrun, str(REPO / "inference.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert written.returncode == 0, written.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["the king", "war"]


def test_the_chat_under_torchrun_reads_once_and_answers_as_one_process(make_ckpt):
    folder, _ = make_ckpt(GQA, 2)
    args = ["chat", "--ckpt_dir", str(folder), "--max_gen_len", "6", "--temperature", "0", "--max_seq_len", "64"]
    args += ["--dtype", "float32", "--device", "cpu"]
    torchrun = torchrun_command(2)
    talk = "the king\nand the queen\n/exit\n"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run(
        [*torchrun, str(REPO / "inference.py"), *args], input=talk, capture_output=True, text=True, env=env, timeout=300
    )
    one = subprocess.run(
        [sys.executable, str(REPO / "inference.py"), *args], input=talk, capture_output=True, text=True, timeout=300
    )
    assert two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and two.stdout.count("llama> ") == 2
