"""What the matrix-vector kernels alone allow at batch 1: every linear of one decode step of a
shape (random weights), run back to back with one input row, as each linear module this project
(or plain PyTorch) can run. The step time of the linears bounds decode tokens/s before any other
work is counted. Every kernel's weights are held at once and the kernels take turns, pass by
pass; medians, and speed-ups over plain PyTorch taken within a round. Then the bf16 modules again
with the rows of a batched decode step (--rows), beside the machine's bf16 GEMM peak.

    python bench/kernels.py [--shapes 110m,1.1b] [--rounds 15] [--rows 8,32,512] [--out bench/results/kernels.json]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from speed import SHAPES, bandwidth_gbs, gemm_peak_gflops
from torch import nn

from llama.cpu import GemvLinear, PackedLinear, aten_linear, linear_around, weight_bytes
from llama.kernels import compiled_kernels
from llama.model import ModelArgs
from llama.quantized_linear import Int4Linear, Int8Linear


def step_shapes(args: ModelArgs) -> list[tuple[int, int]]:
    """(out, in) of every linear one decode step runs: 7 per layer, then the output projection."""
    kv, ffn = args.kv_heads * args.head_dim, args.ffn_hidden_dim
    layer = [
        (args.dim, args.dim),
        (kv, args.dim),
        (kv, args.dim),
        (args.dim, args.dim),
        (ffn, args.dim),
        (ffn, args.dim),
        (args.dim, ffn),
    ]
    return layer * args.n_layers + [(args.vocab_size, args.dim)]


PLAIN = "bf16 nn.Linear (plain PyTorch)"


def kernels() -> dict:
    """name -> (the module this project or plain PyTorch runs for a bf16 weight, input dtype)."""
    return {
        "bf16 GemvLinear (default)": (lambda w: linear_around(w, GemvLinear), torch.bfloat16),
        "bf16 ATen GEMV (no compiled kernel)": (lambda w: lambda x: aten_linear(x, w), torch.bfloat16),
        "bf16 PackedLinear (pack=True)": (PackedLinear, torch.bfloat16),
        PLAIN: (linear_around, torch.bfloat16),
        "fp16 nn.Linear (dtype=float16)": (lambda w: linear_around(w.half()), torch.float16),
        # quantized: the compiled kernels' layout (the default here), or the portable one, which
        # torch's own kernels read (where the compiled kernels cannot build)
        "int8 Int8Linear (quantize=int8)": (lambda w: Int8Linear(w.shape[1], w.shape[0]).quantize_(w), torch.bfloat16),
        "int8 torch _weight_int8pack_mm": (
            lambda w: Int8Linear(w.shape[1], w.shape[0], kernel_layout=False).quantize_(w),
            torch.bfloat16,
        ),
        "int4 Int4Linear (quantize=int4)": (lambda w: Int4Linear(w.shape[1], w.shape[0]).quantize_(w), torch.bfloat16),
        "int4 torch _weight_int4pack_mm_for_cpu": (
            lambda w: Int4Linear(w.shape[1], w.shape[0], kernel_layout=False).quantize_(w),
            torch.bfloat16,
        ),
    }


def time_once(calls: list) -> float:
    """Seconds of running every call once, back to back."""
    t = time.perf_counter()
    for call in calls:
        call()
    return time.perf_counter() - t


BATCHED = ("bf16 GemvLinear (default)", "bf16 PackedLinear (pack=True)", PLAIN)


def batched(dense: list[torch.Tensor], row_counts: list[int], rounds: int, gen: torch.Generator) -> dict:
    """The bf16 linears of one decode step at several batch sizes: rows -> module -> step ms and GFLOP/s."""
    params = sum(w.numel() for w in dense)
    out = {}
    for rows in row_counts:
        steps = {}
        for name in BATCHED:
            make, dtype = kernels()[name]
            inputs = {d: torch.randn(rows, d, generator=gen).to(dtype) for d in {w.shape[1] for w in dense}}
            modules = [make(w) for w in dense]
            steps[name] = [lambda m=m, x=inputs[w.shape[1]]: m(x) for m, w in zip(modules, dense)]
        times = {name: [] for name in steps}
        with torch.inference_mode():
            for calls in steps.values():
                time_once(calls)
            for _ in range(rounds):
                for name, calls in steps.items():
                    times[name].append(time_once(calls))
        out[str(rows)] = {}
        for name, ts in times.items():
            seconds = statistics.median(ts)
            row = out[str(rows)][name] = {"step_ms": seconds * 1e3, "gflops": 2 * rows * params / seconds / 1e9}
            print(f"{rows:>3} rows {name:<40} {row['step_ms']:8.2f} ms/step {row['gflops']:7.1f} GFLOP/s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="110m,1.1b")
    ap.add_argument("--rounds", type=int, default=15, help="passes of every kernel, interleaved")
    ap.add_argument("--rows", default="8,32,512", help="rows at which the bf16 linears are also timed")
    ap.add_argument("--out", default="bench/results/kernels.json")
    opts = ap.parse_args()
    opts.rows = [int(r) for r in opts.rows.split(",") if r]
    compiled_kernels()  # built (once per machine) before anything is timed
    bw, gemm = bandwidth_gbs(), gemm_peak_gflops(torch.get_num_threads())
    print(f"memory bandwidth (copy): {bw:.1f} GB/s, bf16 GEMM: {gemm:.0f} GFLOP/s, threads: {torch.get_num_threads()}")
    results = {"bandwidth_gbs": bw, "gemm_bf16_gflops": gemm, "threads": torch.get_num_threads()}
    results |= {"torch": torch.__version__, "shapes": {}}
    gen = torch.Generator().manual_seed(0)
    for shape in opts.shapes.split(","):
        args = ModelArgs(**SHAPES[shape], vocab_size=32000)
        dense = [torch.randn(o, i, generator=gen).to(torch.bfloat16) for o, i in step_shapes(args)]
        bf16_bytes = sum(w.numel() * 2 for w in dense)
        steps, own_bytes = {}, {}  # every kernel's modules at once, so that rounds can interleave them
        for name, (make, dtype) in kernels().items():
            inputs = {d: torch.randn(1, d, generator=gen).to(dtype) for d in {w.shape[1] for w in dense}}
            modules = [make(w) for w in dense]
            own_bytes[name] = sum(
                weight_bytes(m) if isinstance(m, nn.Module) else w.numel() * 2 for m, w in zip(modules, dense)
            )
            steps[name] = [lambda m=m, x=inputs[w.shape[1]]: m(x) for m, w in zip(modules, dense)]
        times = {name: [] for name in steps}
        with torch.inference_mode():
            for calls in steps.values():
                time_once(calls)  # warm-up
            for _ in range(opts.rounds):
                for name, calls in steps.items():
                    times[name].append(time_once(calls))
        rows = {}
        for name, ts in times.items():
            seconds = statistics.median(ts)
            rows[name] = {
                "step_ms": seconds * 1e3,
                "bf16_equivalent_gbs": bf16_bytes / seconds / 1e9,
                "weight_bytes": own_bytes[name],
                "weight_gbs": own_bytes[name] / seconds / 1e9,
                "tokens_per_s_bound": 1 / seconds,
                "speedup_vs_plain": statistics.median(p / t for p, t in zip(times[PLAIN], ts)),
            }
            print(
                f"{shape:<5} {name:<40} {seconds * 1e3:8.2f} ms/step {bf16_bytes / seconds / 1e9:6.1f} GB/s (bf16 "
                f"bytes), {rows[name]['weight_gbs']:5.1f} GB/s (its own) -> at most {1 / seconds:6.1f} tokens/s, "
                f"{rows[name]['speedup_vs_plain']:.2f}x plain"
            )
        del steps
        results["shapes"][shape] = {"bf16_weight_bytes": bf16_bytes, "kernels": rows}
        results["shapes"][shape]["batched"] = batched(dense, opts.rows, max(3, opts.rounds // 3), gen)
        del dense
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
