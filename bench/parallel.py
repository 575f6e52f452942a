"""Tensor parallel at world sizes 1 and 2 (or any given) on the same random Meta folder: load time,
per-rank weight bytes, batch-1 decode and a 512-token prefill, and the time one decode step's
collectives take alone (two all-reduces per layer and the logits' all-gather). On a CPU the ranks
share its cores, so a larger world is not faster; on GPUs the same script runs over NCCL.

    python bench/parallel.py --shapes 110m --worlds 1,2     # -> bench/results/parallel.json
    python bench/parallel.py --smoke                          # a tiny model: checks the harness works
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from speed import make_models  # bench/speed.py, beside this script


def worker(folder: str, new_tokens: int, prefill: int, threads: int) -> dict:
    """One rank's measurements (under torchrun, or alone for world size 1)."""
    import torch
    import torch.distributed as dist

    from llama import LLaMa
    from llama.parallel import join, local_bytes

    torch.set_num_threads(threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        join()
    world = dist.get_world_size() if dist.is_initialized() else 1
    start = time.perf_counter()
    llm = LLaMa.build(folder, max_seq_len=max(prefill, 32 + new_tokens) + 1, max_batch_size=1)
    load_s = time.perf_counter() - start
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else lambda: None
    prompt = [[1] + [7] * 31]
    llm.generate(prompt, 4, temperature=0)  # warm-up
    start = time.perf_counter()
    llm.generate(prompt, new_tokens, temperature=0)
    sync()
    decode = new_tokens / (time.perf_counter() - start)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.inference_mode():
            llm.model(torch.tensor([[1] + [7] * (prefill - 1)], device=llm.device), 0)
        sync()
        times.append(time.perf_counter() - start)
    comm_ms = 0.0
    if world > 1:  # one decode step's collectives, alone: 2 all-reduces per layer, the logits' all-gather
        args, dtype = llm.model.params, llm.model.tok_embeddings.weight.dtype
        hidden = torch.ones(1, 1, args.dim, dtype=dtype, device=llm.device)
        part = torch.ones(1, args.vocab_size // world, dtype=dtype, device=llm.device)
        whole = torch.empty(world * part.shape[0], part.shape[1], dtype=dtype, device=llm.device)
        steps = 20
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            for _ in range(2 * args.n_layers):
                dist.all_reduce(hidden)
            dist.all_gather_into_tensor(whole, part)
        sync()
        comm_ms = (time.perf_counter() - start) / steps * 1e3
    result = {
        "world": world,
        "device": str(llm.device),
        "dtype": str(llm.model.tok_embeddings.weight.dtype).removeprefix("torch."),
        "threads_per_rank": threads,
        "load_s": load_s,
        "weight_bytes_per_rank": local_bytes(llm.model),
        "decode_b1": decode,
        "decode_step_ms": 1e3 / decode,
        "prefill": prefill / statistics.median(times),
        "comm_ms_per_step": comm_ms,
    }
    return result


def run_world(world: int, folder: Path, opts) -> dict:
    here = Path(__file__).resolve()
    threads = max(1, (os.cpu_count() or 1) // world)
    args = ["--worker", str(folder), "--new_tokens", str(opts.new_tokens), "--prefill", str(opts.prefill)]
    args += ["--threads", str(threads)]
    launch = (
        [sys.executable]
        if world == 1
        else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world)]
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run([*launch, str(here), *args], capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"world size {world} failed:\n{r.stderr[-4000:]}")
    return json.loads(next(line for line in reversed(r.stdout.splitlines()) if line.startswith("{")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="110m")
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, 8 new tokens, a 32-token prefill")
    ap.add_argument("--out", default="bench/results/parallel.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.worker:  # a rank: rank 0 prints the result
        result = worker(opts.worker, opts.new_tokens, opts.prefill, opts.threads)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from llama.parallel import leave

            leave()
        return
    if opts.smoke:
        opts.shapes, opts.new_tokens, opts.prefill = "tiny", 8, 32
    results = {"shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in opts.shapes.split(","):
            folder = Path(make_models(shape, Path(tmp), ["ours"])["ours"])
            results["shapes"][shape] = {}
            for world in map(int, opts.worlds.split(",")):
                row = run_world(world, folder, opts)
                results["shapes"][shape][str(world)] = row
                print(
                    f"{shape} world {world}: "
                    + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
                )
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
