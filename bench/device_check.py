"""One command that proves a GPU machine: the device, torch and CUDA versions; the test suite, whose
tests/test_devices.py runs each invariant on every device present; then decode at batch 1, 8 and
32, prefill of 512 and 2048 tokens, complete_many over 64 prompts (ours, eager and compiled),
load time and peak GPU memory for this project (fp16, bf16, int8, int4, fp16 with compiled decode
steps) and Hugging Face transformers (fp16, bf16) on the same random Llama 2 7B-shaped weights,
beside the card's measured copy bandwidth and GEMM peak; last, what one eager batch-1 decode step
launches and how long its kernels take (bench/peers.py's step_profile), which says whether the host
or the card sets the step's pace. Prints tables and writes JSON. Without a
GPU it says so and runs the same steps on a tiny model on the CPU (CI's smoke run). Each peer runs
in its own process (bench/peers.py).

    python bench/device_check.py                  # -> bench/results/device_check.json
    python bench/device_check.py --smoke --out /tmp/device_check.json

On this workplace's GPU machines nothing can be installed: carry fire, termcolor and gguf as wheels
(`pip wheel --no-deps -w .whl fire termcolor gguf`, .whl ignored by git) and start each command with
`pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD`.
On an H200 machine (16 cores) the tests took 200 s and the benchmark over 5 minutes for five of
its seven peers (at 128 new tokens per decode; 64 since), more than one 10-minute call holds: run
`--part tests` in one call, put its JSON at bench/results/device_check.json, then `--part bench` in
a second call, which keeps those tests. Llama 3 8B's grouped-query layers, whose decode steps take
other attention kernels than the 7B's, are a third call (bench/report.py names it):
`--part bench --shape 8b --peers ours-fp16,ours-fp16-compiled,hf-fp16 --out bench/results/device_check_8b.json`.
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from speed import SHAPES, make_models, run_peer  # bench/speed.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("decode_b1", "decode_b8", "decode_b32", "prefill_512", "prefill_2048", "many_64")
# in this order: what a cut-short run must not miss first
GPU_PEERS = ("ours-fp16", "ours-fp16-compiled", "hf-fp16", "ours-bf16", "hf-bf16", "ours-int8", "ours-int4")
CPU_PEERS = ("ours-bf16", "ours-int8", "hf-bf16")
# Each compiled batch size compiles its own graph (a minute or so): the compiled variant decodes at batch 1 and
# runs complete_many (the batch completion script's job, one graph). That, many_64, is for this project's
# unquantized peers alone: transformers has no continuous batching.
ONLY = {"ours-fp16-compiled": ("decode_b1", "many_64")}
MANY_PEERS = ("ours-fp16", "ours-fp16-compiled", "ours-bf16")
# The step profile, last in each eager unquantized peer's process (a crash there would lose its whole row).
PROFILE, PROFILED_PEERS = "profile_b1", ("ours-fp16", "hf-fp16", "ours-bf16", "hf-bf16")


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env |= {"gpu": p.name, "gpu_memory_bytes": p.total_memory, "multiprocessors": p.multi_processor_count}
        env |= {
            "cuda": torch.version.cuda,
            "capability": f"{p.major}.{p.minor}",
            "cudnn": torch.backends.cudnn.version(),
        }
    else:
        env["cpu_count"] = os.cpu_count()
    return env


def run_tests(args: list[str], timeout: int) -> dict:
    """pytest in a subprocess with a JUnit report: counts, and each failure's name and first line."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *args]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        t = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"command": " ".join(cmd[1:]), "timed_out_s": timeout}
        result = {"command": " ".join(cmd[1:]), "exit_code": r.returncode, "seconds": time.perf_counter() - t}
        if not report.exists():
            return result | {"output_tail": (r.stdout + r.stderr)[-4000:]}
        cases = ET.parse(report).getroot().iter("testcase")
    counts, failures = {"passed": 0, "failed": 0, "skipped": 0}, []
    for case in cases:
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            name = f"{case.get('classname')}::{case.get('name')}"
            first = (bad.get("message") or "").strip().splitlines()[:1]
            failures.append(f"{name}: {first[0][:300] if first else ''}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return result | counts | {"failures": failures}


def ceilings(device: str, smoke: bool) -> dict:
    """Copy bandwidth (bytes read + written per second, best of five) and the bf16 GEMM peak."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    mb, n = (64, 512) if smoke else (2048, 8192)

    def best(fn, repeats: int = 5) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return min(times)

    a = torch.ones(mb << 18, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    copy_s = best(lambda: b.copy_(a))
    x = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    gemm_s = best(lambda: x @ x)
    return {"copy_gbs": 2 * a.numel() * 4 / copy_s / 1e9, "gemm_bf16_tflops": 2 * n**3 / gemm_s / 1e12}


def layer_parameters(shape: str) -> int:
    """The parameters a prompt token multiplies (2 flops each): all but the embedding, which is a
    lookup, and the output, which a prefill applies to the last position only."""
    from llama.model import ModelArgs

    args = ModelArgs(**SHAPES[shape], vocab_size=32000)
    return args.parameter_count() - 2 * args.vocab_size * args.dim


def benchmark(shape: str, peers: list[str], device: str, opts, limits: dict, save) -> dict:
    """Each peer's row as it comes (save is called with the rows so far: a run cut short keeps them)."""
    params = layer_parameters(shape)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paths = make_models(shape, Path(tmp), peers, device)
        print(
            f"{shape}: random weights written in Meta's and Hugging Face's layouts in {time.perf_counter() - t:.0f} s"
        )
        for peer in peers:
            allowed = ONLY.get(peer, [w for w in WORKLOADS if not w.startswith("many") or peer in MANY_PEERS])
            allowed = [*allowed, *([PROFILE] if peer in PROFILED_PEERS else [])]
            workloads = [w for w in opts.workloads.split(",") if w in allowed]
            try:
                runs = [run_peer(peer, paths[peer], workloads, opts, device) for _ in range(opts.rounds)]
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # one peer's failure is a finding
                rows[peer] = {"error": str(e)[-2000:]}
                print(f"{shape} {peer}: {str(e)[-2000:]}")
                continue
            # medians of the numbers; a profile is the first round's
            row = {k: v if isinstance(v, dict) else statistics.median(r[k] for r in runs) for k, v in runs[0].items()}
            row["rounds"] = runs
            if "decode_b1" in row:  # each step reads every weight once
                row["decode_b1_bandwidth_fraction"] = (
                    row["decode_b1"] * row["weight_bytes"] / (limits["copy_gbs"] * 1e9)
                )
            for w in (w for w in workloads if w.startswith("prefill")):  # attention's flops left out
                row[f"{w}_gemm_fraction"] = 2 * params * row[w] / (limits["gemm_bf16_tflops"] * 1e12)
            rows[peer] = row
            print(f"{shape} {peer}: " + ", ".join(f"{w} {row[w]:.1f}" for w in workloads if w != PROFILE))
            save({"layer_parameters": params, "peers": with_ratios(rows)})
    return {"layer_parameters": params, "peers": with_ratios(rows)}


def with_ratios(rows: dict) -> dict:
    """Each of our rows with its tokens/s over transformers' in the same dtype, where both ran."""
    for ours in (p for p in rows if p.startswith("ours") and "error" not in rows[p]):
        dtype = "bf16" if "bf16" in ours else "fp16"
        if (hf := rows.get(f"hf-{dtype}")) is not None and "error" not in hf:
            rows[ours][f"ratio_vs_hf-{dtype}"] = {
                w: rows[ours][w] / hf[w] for w in WORKLOADS if w in rows[ours] and w in hf
            }
    return rows


def print_table(result: dict) -> None:
    tests = result["tests"]
    print(f"\n{result['environment']}")
    print(f"tests: {', '.join(f'{k} {tests[k]}' for k in ('passed', 'failed', 'skipped') if k in tests)}")
    for failure in tests.get("failures", []):
        print(f"  FAILED {failure}")
    limits = result["limits"]
    print(f"copy bandwidth {limits['copy_gbs']:.0f} GB/s, bf16 GEMM {limits['gemm_bf16_tflops']:.1f} TFLOP/s")
    for shape, bench in result["shapes"].items():
        cols = [*WORKLOADS, "load_s", "peak_mb", "cache_mb", "b1_bw", "p512_gemm"]
        print(
            f"\n{shape} (tokens/s; peak memory of the process's device)\n{'peer':<20}"
            + "".join(f"{c:>13}" for c in cols)
        )
        for peer, row in bench["peers"].items():
            if "error" in row:
                print(f"{peer:<20}failed: {row['error'].strip().splitlines()[-1]}")
                continue
            peak = row.get("peak_gpu_bytes", row["peak_rss_bytes"]) / 1e6
            vals = [row.get(w) for w in WORKLOADS] + [row["load_s"], peak, row.get("cache_bytes", 0) / 1e6 or None]
            vals += [row.get("decode_b1_bandwidth_fraction"), row.get("prefill_512_gemm_fraction")]
            print(f"{peer:<20}" + "".join(f"{v:>13.2f}" if v is not None else f"{'-':>13}" for v in vals))
        profiled = {p: r for p, r in bench["peers"].items() if PROFILE in r}
        if profiled:
            cols = ("step_ms", "aten_ops", "kernels", "kernel_ms")
            print(f"\none decode step at batch 1\n{'peer':<20}" + "".join(f"{c:>10}" for c in cols))
            for peer, row in profiled.items():
                prof = row[PROFILE]
                vals = [1e3 / row["decode_b1"] if "decode_b1" in row else None, prof["aten_ops"]]
                vals += [prof["kernels"] or None, prof["kernel_ms"] or None]  # none on a CPU
                print(f"{peer:<20}" + "".join(f"{v:>10.2f}" if v is not None else f"{'-':>10}" for v in vals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the CPU steps on a tiny model, whatever the machine has")
    ap.add_argument("--shape", default=None, help=f"one of {', '.join(SHAPES)} (7b on a GPU, tiny without)")
    ap.add_argument("--peers", default=None, help=f"default on a GPU: {','.join(GPU_PEERS)}")
    ap.add_argument("--workloads", default=",".join([*WORKLOADS, PROFILE]))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--new_tokens", type=int, default=None, help="decode steps per workload (64 on a GPU)")
    ap.add_argument("--tests", default=None, help="pytest arguments (the whole suite on a GPU; '' skips)")
    ap.add_argument("--test_timeout", type=int, default=300)
    ap.add_argument("--peer_timeout", type=int, default=300, help="seconds for one peer's process")
    ap.add_argument("--out", default="bench/results/device_check.json")
    ap.add_argument(
        "--part",
        choices=("all", "tests", "bench"),
        default="all",
        help="tests: the suite alone; bench: the rest, keeping the tests of an earlier --part tests in --out",
    )
    opts = ap.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() and not opts.smoke else "cpu"
    if device == "cpu":
        print("no CUDA device here: the same steps on a tiny model on the CPU" if not opts.smoke else "smoke run")
    gpu = device == "cuda"
    shape = opts.shape or ("7b" if gpu else "tiny")
    peers = (opts.peers or ",".join(GPU_PEERS if gpu else CPU_PEERS)).split(",")
    opts.new_tokens = opts.new_tokens or (64 if gpu else 8)
    opts.threads = os.cpu_count()
    if not gpu:
        opts.workloads = ",".join(w for w in opts.workloads.split(",") if w != "prefill_2048")
    if opts.tests is None:  # on a GPU the whole suite, over most cores where pytest-xdist is installed
        n = min(14, (os.cpu_count() or 1) - 2)
        parallel = f"-n {n} " if gpu and n > 1 and importlib.util.find_spec("xdist") else ""
        opts.tests = f"{parallel}tests" if gpu else "tests/test_devices.py tests/test_compiled.py"
    tests = opts.tests

    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:  # after each step, so that a run stopped at a time limit keeps what it measured
        out.write_text(json.dumps(result, indent=2))

    result = {"date": time.strftime("%Y-%m-%d"), "environment": environment(device), "new_tokens": opts.new_tokens}
    print(result["environment"])
    if opts.part == "bench":
        earlier = json.loads(out.read_text()) if out.exists() else {}
        result["tests"] = earlier.get("tests", {"skipped_by_flag": True})
    else:
        result["tests"] = run_tests(tests.split(), opts.test_timeout) if tests else {"skipped_by_flag": True}
    print(f"tests: {result['tests']}")
    save(result)
    failed = result["tests"].get("failed") or result["tests"].get("exit_code") not in (0, None)
    if opts.part == "tests":
        print(f"wrote {out}")
        sys.exit(1 if failed else 0)
    result["limits"] = ceilings(device, not gpu)
    if gpu:
        torch.cuda.empty_cache()  # the probes' memory back to the card, for the peers' processes
    result["shapes"] = {}
    save(result)
    result["shapes"][shape] = benchmark(
        shape, peers, device, opts, result["limits"], lambda rows: save(result | {"shapes": {shape: rows}})
    )
    save(result)
    print_table(result)
    print(f"wrote {out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
