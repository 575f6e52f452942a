"""The benchmark report: bench/README.md, written from the JSON files that the bench/ scripts leave in
bench/results/, so that every number in it is printed by this script and none is typed by hand.

    python bench/report.py                # write bench/README.md from every JSON file in bench/results/
    python bench/report.py --check        # exit 1 when bench/README.md, or README.md's table, is out of date
    python bench/report.py --summary      # print the short table the main README shows
    python bench/report.py FILE.json ...  # print the tables of the given result files

Each result file has a section: the command that wrote it (COMMANDS), what was measured in plain
words, its tables, and what they say in a sentence or two, every figure taken from the file.
"""

import argparse
import json
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path

from device_check import PROFILE  # bench/device_check.py, beside this script
from speed import SHAPES  # bench/speed.py: this script's folder is on sys.path when it runs

BENCH = Path(__file__).resolve().parent
RESULTS, README, MAIN_README = BENCH / "results", BENCH / "README.md", BENCH.parent / "README.md"

# The command line that wrote each result file, run from the repository root after `pip install -e '.[bench]'`.
COMMANDS = {
    "speed.json": "python bench/speed.py --shapes 110m,1.1b --peers ours,ours-packed,hf,llamacpp --rounds 2",
    "speed_b1.json": (
        "python bench/speed.py --shapes 110m,1.1b --peers ours,llamacpp --workloads decode_b1 --rounds 5 \\\n"
        "    --out bench/results/speed_b1.json"
    ),
    "speed_b1_variants.json": (
        "python bench/speed.py --shapes 110m,1.1b --workloads decode_b1,prefill_512 --rounds 2 \\\n"
        "    --peers ours,ours-packed,ours-fp16,ours-int8,ours-int4,llamacpp,llamacpp-q8_0,llamacpp-q4_0 \\\n"
        "    --out bench/results/speed_b1_variants.json"
    ),
    "speed_b1_quantized.json": (
        "python bench/speed.py --shapes 1.1b --workloads decode_b1 --rounds 5 \\\n"
        "    --peers ours-int8,ours-int4,llamacpp-q8_0,llamacpp-q4_0 --out bench/results/speed_b1_quantized.json"
    ),
    "kernels.json": "python bench/kernels.py",
    "load_memory.json": "python bench/load_memory.py",
    "quantize.json": "python bench/quantize.py",
    "parallel.json": "python bench/parallel.py --shapes 110m --worlds 1,2",
    "throughput.json": "python bench/throughput.py",
    "throughput_1.1b.json": (
        "python bench/throughput.py --shape 1.1b --prompts 64 --check 8 --out bench/results/throughput_1.1b.json"
    ),
    "device_check.json": "python bench/device_check.py",
    "device_check_8b.json": (
        "python bench/device_check.py --part bench --shape 8b --peers ours-fp16,ours-fp16-compiled,hf-fp16 \\\n"
        "    --out bench/results/device_check_8b.json"
    ),
}
# Peers whose weights are quantized (name endings): not the 16-bit weights speed.roofline counts.
QUANTIZED = ("int8", "int4", "q8_0", "q4_0")
# The comparisons shown: each of ours against the peer of the same kind, in this order.
COUNTERPARTS = (
    ("ours", "hf"),
    ("ours", "llamacpp"),
    ("ours-packed", "hf"),
    ("ours-packed", "llamacpp"),
    ("ours-fp16", "llamacpp"),
    ("ours-int8", "llamacpp-q8_0"),
    ("ours-int4", "llamacpp-q4_0"),
)
WORKLOADS = {
    "decode_b1": "decode b1",
    "decode_b8": "decode b8",
    "decode_b32": "decode b32",
    "prefill_512": "prefill 512",
}
SUMMARY_WORKLOADS = {
    "decode_b1": "decode, batch 1",
    "decode_b8": "decode, batch 8",
    "prefill_512": "prefill, 512 tokens",
}
SHAPE_NOTES = {"1.1b": "TinyLlama's shape: "}  # of bench/speed.py's SHAPES
WIDTH = 100  # of the prose lines in bench/README.md


# --- formatting -------------------------------------------------------------------------------------------------


def md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(map(str, cells)) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def paragraph(text: str) -> str:
    return textwrap.fill(text, WIDTH, break_long_words=False, break_on_hyphens=False)


def times(r: float) -> str:
    return f"{r:.2f}x"


def mb(n: float) -> str:
    return f"{n / 1e6:.0f}"


def span(values: Iterable[float], fmt: str = ".2f") -> str:
    """The range of some values, "0.34-1.06", or the one value."""
    values = list(values)
    lo, hi = f"{min(values):{fmt}}", f"{max(values):{fmt}}"
    return lo if lo == hi else f"{lo}-{hi}"


# --- speed.py results -------------------------------------------------------------------------------------------


def workloads(result: dict) -> list[str]:
    first_row = next(iter(next(iter(result["shapes"].values())).values()))
    return [w for w in WORKLOADS if w in first_row]


def comparisons(result: dict) -> Iterator[tuple[str, str, str]]:
    """(shape, ours, other) for every comparison in COUNTERPARTS that the result holds."""
    for shape, peers in result["shapes"].items():
        yield from ((shape, ours, other) for ours, other in COUNTERPARTS if ours in peers and other in peers)


def ratio(result: dict, shape: str, ours: str, other: str, workload: str) -> float:
    """Median over rounds of ours' tokens/s over the other's, both taken in the same round."""
    return result["shapes"][shape][ours][f"ratio_vs_{other}"][workload]


def shape_ratios(result: dict, ours: str, other: str, workload: str) -> str:
    """The ratio on every shape of the result, "0.76x / 0.87x" (in the order of shape_names)."""
    found = [shape for shape, o, p in comparisons(result) if (o, p) == (ours, other)]
    return " / ".join(times(ratio(result, shape, ours, other, workload)) for shape in found)


def shape_names(result: dict) -> str:
    return " / ".join(result["shapes"])


def rounds(result: dict) -> int:
    return min(len(row["rounds"]) for peers in result["shapes"].values() for row in peers.values())


def ceiling(row: dict) -> str:
    return "-" if row.get("bandwidth_fraction_b1") is None else f"{row['bandwidth_fraction_b1']:.2f}"


def speed_tables(result: dict) -> str:
    ws = workloads(result)
    names = [WORKLOADS[w] for w in ws]
    speeds = md_table(
        ["shape", "peer", *names, "b1 / ceiling", "load s", "peak RSS MB"],
        (
            [
                shape,
                peer,
                *(f"{row[w]:.1f}" for w in ws),
                ceiling(row),
                f"{row['load_s']:.2f}",
                mb(row["peak_rss_bytes"]),
            ]
            for shape, peers in result["shapes"].items()
            for peer, row in peers.items()
        ),
    )
    ratios = md_table(
        ["shape", "ratio", *names],
        (
            [shape, f"{ours} / {other}", *(times(ratio(result, shape, ours, other, w)) for w in ws)]
            for shape, ours, other in comparisons(result)
        ),
    )
    text = f"Tokens per second (medians):\n\n{speeds}\n\nRatios:\n\n{ratios}"
    return text + roofline_table(result) + round_by_round(result)


def roofline_table(result: dict) -> str:
    """Each workload's roofline on the machine of the run beside every peer's tokens/s and its share of it."""
    if "rooflines" not in result:
        return ""
    # the rooflines count 16-bit weights: quantized rows have theirs in `b1 / ceiling`, from their own bytes
    peers = [p for shape in result["shapes"].values() for p in shape if not p.endswith(QUANTIZED)]
    peers = list(dict.fromkeys(peers))
    if not peers:
        return ""
    rows = []
    for shape, limits in result["rooflines"].items():
        for w, limit in limits.items():
            cells = [
                f"{result['shapes'][shape][p][w]:.1f} ({result['shapes'][shape][p][w] / limit['tokens_per_s']:.0%})"
                if p in result["shapes"][shape]
                else "-"
                for p in peers
            ]
            rows.append([shape, WORKLOADS[w], f"{limit['tokens_per_s']:.1f}", limit["bound"], *cells])
    table = md_table(["shape", "workload", "roofline tok/s", "bound", *peers], rows)
    return (
        f"\n\nAgainst the roofline of each row, from this run's {result['bandwidth_gbs']:.1f} GB/s copy bandwidth and "
        f"{result['gemm_bf16_gflops']:.0f} GFLOP/s bf16 GEMM (`speed.roofline` says what each counts):\n\n{table}"
    )


def round_by_round(result: dict, workload: str = "decode_b1") -> str:
    """One line per comparison, where there are more than two rounds to show a spread."""
    if rounds(result) <= 2:
        return ""
    lines = []
    for shape, ours, other in comparisons(result):
        peers = result["shapes"][shape]
        rs = [a[workload] / b[workload] for a, b in zip(peers[ours]["rounds"], peers[other]["rounds"], strict=True)]
        lines.append(f"- {shape} {ours} / {other}: {', '.join(map(times, rs))}")
    return f"\n\n{WORKLOADS[workload].capitalize()}, round by round:\n\n" + "\n".join(lines)


def speed_paragraphs(result: dict) -> list[str]:
    method = (
        f"Tokens per second, greedy: `decode b1`, `b8` and `b32` generate {result['new_tokens']} new tokens for each "
        "of 1, 8 or 32 sequences after a 32-token prompt (its time included); `prefill 512` reads one 512-token "
        "prompt (median of three). `load s` is the time to build the model; `peak RSS MB` the most memory the "
        "process held above its imports', over the load and every workload (the largest batch's KV cache "
        "included). `ours` is `LLaMa.build` as it comes (bf16 on the CPU), `ours-packed` adds `pack=True` (weights "
        "reordered for oneDNN's matrix kernels, which batches use); `hf` is transformers' `LlamaForCausalLM` in "
        "bf16; `llamacpp` reads an F16 GGUF file."
    )
    r = partial(shape_ratios, result)
    findings = (
        f"For {shape_names(result)}: at batch 1 ours decodes at {r('ours', 'llamacpp', 'decode_b1')} llama.cpp's "
        f"speed and {r('ours', 'hf', 'decode_b1')} transformers'. At batch 8 it is "
        f"{r('ours', 'llamacpp', 'decode_b8')} llama.cpp by default and {r('ours-packed', 'llamacpp', 'decode_b8')} "
        f"with `pack=True`; at batch 32, {r('ours', 'llamacpp', 'decode_b32')} and "
        f"{r('ours-packed', 'llamacpp', 'decode_b32')}. A 512-token prompt runs at "
        f"{r('ours', 'llamacpp', 'prefill_512')} llama.cpp's speed and {r('ours', 'hf', 'prefill_512')} "
        "transformers' (both run PyTorch's matrix kernels for prompts)."
    )
    return [method, findings, *roofline_findings(result)]


def roofline_findings(result: dict) -> list[str]:
    """Where each workload of ours and llama.cpp stands against its roofline, shape by shape."""
    if "rooflines" not in result:
        return []

    def share(peer: str, w: str) -> str:
        found = [s for s in result["rooflines"] if peer in result["shapes"][s]]
        return " / ".join(
            f"{result['shapes'][s][peer][w] / result['rooflines'][s][w]['tokens_per_s']:.0%}" for s in found
        )

    def bound(w: str) -> str:
        return " / ".join(limits[w]["bound"] for limits in result["rooflines"].values())

    return [
        f"Against each row's roofline ({shape_names(result)}), ours reaches {share('ours', 'decode_b1')} at batch 1 "
        f"({bound('decode_b1')}), {share('ours', 'decode_b8')} at batch 8 ({bound('decode_b8')}) and "
        f"{share('ours', 'decode_b32')} at batch 32 ({bound('decode_b32')}; {share('ours-packed', 'decode_b32')} "
        f"with `pack=True`), and reads a 512-token prompt at {share('ours', 'prefill_512')} of its compute roofline; "
        "llama.cpp "
        f"{share('llamacpp', 'decode_b1')}, {share('llamacpp', 'decode_b8')}, {share('llamacpp', 'decode_b32')} and "
        f"{share('llamacpp', 'prefill_512')}. The kernels section below times the linears alone at the same rows; "
        "what separates the two is the rest of a step: attention over each row's cache, norms, RoPE, sampling and "
        "the Python around them.",
        "Tried for batched decode, and kept: the GEMV asks the L2 cache for the next tile's weight rows while a tile "
        "computes, and sums a tile's 16 outputs in one pass, each row's numbers unchanged; attention over each row's "
        "own cache length in one kernel call. oneDNN's packed layout (`ours-packed`) stays an option: it is faster "
        "where the tables show it, slower at batch 1, and its rows are not bound to the numbers they get alone. "
        "Not tried yet: fusing a step's small operators (norms, RoPE, SwiGLU, sampling) into fewer calls, or "
        "compiling the CPU step; for prompts, anything around oneDNN's GEMM and PyTorch's SDPA, which transformers "
        "shares.",
    ]


def speed_b1_paragraphs(result: dict) -> list[str]:
    method = (
        "Batch-1 decode is the number that a shared machine's noise moves most, so this run repeats it alone, "
        f"{rounds(result)} rounds, ours against llama.cpp's F16; columns as in the first speed table."
    )
    return [method]


def variants_paragraphs(result: dict) -> list[str]:
    method = (
        "Batch-1 decode and prefill in each weight format, against llama.cpp's file of the same kind: `ours`, "
        '`ours-packed` and `ours-fp16` (`dtype="float16"`) against F16, `ours-int8` / `ours-int4` (`quantize=` on a '
        "bf16 build) against `q8_0` / `q4_0`. `b1 / ceiling` counts each format's own weight bytes."
    )
    r = partial(shape_ratios, result)
    findings = (
        f"For {shape_names(result)}: at batch 1, int8 decodes at {r('ours-int8', 'llamacpp-q8_0', 'decode_b1')} "
        f"q8_0's speed and int4 at {r('ours-int4', 'llamacpp-q4_0', 'decode_b1')} q4_0's; for a 512-token prompt, "
        f"int8 runs at {r('ours-int8', 'llamacpp-q8_0', 'prefill_512')} q8_0's speed and int4 at "
        f"{r('ours-int4', 'llamacpp-q4_0', 'prefill_512')} q4_0's. `ours-fp16` is "
        f"{r('ours-fp16', 'llamacpp', 'decode_b1')} llama.cpp's F16 at batch 1 and "
        f"{r('ours-fp16', 'llamacpp', 'prefill_512')} for a prompt: on a CPU, use bf16."
    )
    return [method, findings]


def quantized_paragraphs(result: dict) -> list[str]:
    method = (
        f"Quantized batch-1 decode alone, {rounds(result)} rounds: `ours-int8` and `ours-int4` against llama.cpp's "
        "`q8_0` and `q4_0`; columns as in the first speed table."
    )
    return [method]


# --- kernels.py, load_memory.py and quantize.py results ---------------------------------------------------------


def kernels_table(result: dict) -> str:
    return md_table(
        ["shape", "kernel", "ms per step", "weight MB", "GB/s of its weights", "at most tokens/s", "vs plain PyTorch"],
        (
            [
                shape,
                name,
                f"{k['step_ms']:.1f}",
                mb(k["weight_bytes"]),
                f"{k['weight_gbs']:.1f}",
                f"{k['tokens_per_s_bound']:.1f}",
                times(k["speedup_vs_plain"]),
            ]
            for shape, r in result["shapes"].items()
            for name, k in r["kernels"].items()
        ),
    )


PLAIN_LINEAR = "bf16 nn.Linear (plain PyTorch)"  # bench/kernels.py's PLAIN


def batched_table(result: dict) -> str:
    """The bf16 linears at a batched decode step's rows, against the GEMM peak, where the file has them."""
    if "gemm_bf16_gflops" not in result:
        return ""
    peak = result["gemm_bf16_gflops"]
    rows = [
        [shape, rows, name, f"{k['step_ms']:.1f}", f"{k['gflops']:.0f}", f"{k['gflops'] / peak:.0%}"]
        for shape, r in result["shapes"].items()
        for rows, by_module in r.get("batched", {}).items()
        for name, k in by_module.items()
    ]
    table = md_table(["shape", "rows", "kernel", "ms per step", "GFLOP/s", "of the GEMM peak"], rows)
    return (
        f"\n\nThe bf16 linears of one step with a batch's rows, against this run's bf16 GEMM peak "
        f"({peak:.0f} GFLOP/s, `speed.gemm_peak_gflops`):\n\n{table}"
    )


def kernels_paragraphs(result: dict) -> list[str]:
    method = (
        "What the linear layers alone allow at batch 1: every linear of one decode step, back to back on one input "
        "row, in each module this project (or plain PyTorch) can run, the modules taking turns pass by pass; "
        "medians. `at most tokens/s` is the decode speed if nothing but these linears took time. `weight MB` is "
        "what each module holds (quantized ones with their scales), and `GB/s of its weights` that read once per "
        "step. `vs plain PyTorch` is the speed-up over bf16 `nn.Linear` (which PyTorch sends to oneDNN), taken "
        "within each pass."
    )
    kernels = [r["kernels"] for r in result["shapes"].values()]

    def gbs(name: str) -> str:
        return " / ".join(f"{k[name]['weight_gbs']:.1f}" for k in kernels)

    def faster(ours: str, torch: str) -> str:
        return " / ".join(times(k[torch]["step_ms"] / k[ours]["step_ms"]) for k in kernels)

    findings = (
        f"For {shape_names(result)}: this project's bf16 GEMV (`GemvLinear`) streams its weights at "
        f"{gbs('bf16 GemvLinear (default)')} GB/s, ATen's own GEMV at {gbs('bf16 ATen GEMV (no compiled kernel)')} "
        f"and plain `nn.Linear` at {gbs('bf16 nn.Linear (plain PyTorch)')}, in a run where the copy probe read "
        f"{result['bandwidth_gbs']:.1f} GB/s. Its int8 layers run a step "
        f"{faster('int8 Int8Linear (quantize=int8)', 'int8 torch _weight_int8pack_mm')} as fast as torch's "
        "`_weight_int8pack_mm`, its int4 layers "
        f"{faster('int4 Int4Linear (quantize=int4)', 'int4 torch _weight_int4pack_mm_for_cpu')} as fast as "
        "`_weight_int4pack_mm_for_cpu`."
    )
    return [method, findings, *batched_findings(result)]


def batched_findings(result: dict) -> list[str]:
    """What the linears alone reach at a batched step's rows: their share of the roofline, which is
    reading the weights once per step at the copy speed or the products at the GEMM peak, whichever
    takes longer, shape by shape."""
    if "gemm_bf16_gflops" not in result:
        return []
    found = {s: r for s, r in result["shapes"].items() if r.get("batched")}
    peak, bw = result["gemm_bf16_gflops"], result["bandwidth_gbs"]

    def limit(k: dict, weight_bytes: int) -> tuple[float, str]:
        memory_ms, compute_ms = weight_bytes / bw / 1e6, k["step_ms"] * k["gflops"] / peak
        return (memory_ms, "memory") if memory_ms > compute_ms else (compute_ms, "compute")

    def shares(rows: str, name: str) -> tuple[str, str]:
        at = [(r["batched"][rows][name], r["bf16_weight_bytes"]) for r in found.values() if rows in r["batched"]]
        limits = [limit(k, w) for k, w in at]
        share = " / ".join(f"{ms / k['step_ms']:.0%}" for (k, _), (ms, _) in zip(at, limits))
        bounds = [bound for _, bound in limits]
        return share, bounds[0] if len(set(bounds)) == 1 else " / ".join(bounds)

    lines = []
    for n in sorted({int(n) for r in found.values() for n in r["batched"]}):
        (ours, bound), (onednn, _) = shares(str(n), "bf16 GemvLinear (default)"), shares(str(n), PLAIN_LINEAR)
        lines.append(f"at {n} rows ({bound}-bound) the default linears reach {ours} of it, oneDNN's {onednn}")
    return [
        f"For {' / '.join(found)}, the linears alone against their roofline (their weights read once per step at "
        "the copy speed, or their products at the GEMM peak, whichever takes longer): " + "; ".join(lines) + "."
    ]


def load_table(result: dict) -> str:
    return md_table(
        [
            "shards",
            "dtype",
            "pack",
            "quantize",
            "weights MB",
            "peak RSS MB",
            "peak / weights",
            "load s",
            "again s",
            "read s",
        ],
        (
            [
                r["shards"],
                r["dtype"],
                r["pack"],
                r["quantize"] or "-",
                mb(r["weight_bytes"]),
                mb(r["peak_rss_bytes"]),
                f"{r['peak_rss_bytes'] / r['weight_bytes']:.2f}",
                f"{r['load_s']:.2f}",
                f"{r['load_again_s']:.2f}",
                f"{r['read_s']:.2f}",
            ]
            for r in result["rows"]
        ),
    )


def load_paragraphs(result: dict) -> list[str]:
    rows, args = result["rows"], result["args"]
    plain = [r for r in rows if not r["quantize"]]
    quantized = [r for r in rows if r["quantize"]]
    base = next(r for r in plain if r["shards"] == 1 and r["dtype"] == "bfloat16" and not r["pack"])
    method = (
        f"`LLaMa.build` on a {mb(base['file_bytes'])} MB bf16 checkpoint (dim {args['dim']}, {args['n_layers']} "
        "layers), each case in a fresh process. `peak RSS MB` is the peak resident memory above the process's "
        "before the build, after loading and one forward pass (which pages in mapped weights); `peak / weights` "
        "sets it against the bytes of the weights as built. `load s` is the process's first build, `again s` a "
        "second one (without one-time imports and setup), `read s` the time to read the shard files from the page "
        "cache. `quantize` rows are quantized while loading."
    )
    findings = (
        f"Every unquantized path peaks at {span(r['peak_rss_bytes'] / r['weight_bytes'] for r in plain)}x its "
        f"weights. Quantized while loading, {' / '.join(r['quantize'] for r in quantized)} peak at "
        f"{' / '.join(times(r['peak_rss_bytes'] / r['weight_bytes']) for r in quantized)} their own bytes, which is "
        f"{' / '.join(times(r['peak_rss_bytes'] / base['weight_bytes']) for r in quantized)} of the bf16 weights: "
        "those are never all resident (the quantized peaks vary from run to run, as glibc may keep the quantizer's "
        f"freed temporaries). A second build from one bf16 shard takes {base['load_again_s']:.2f} s, against "
        f"{base['read_s']:.2f} s to read the file; a process's first build takes "
        f"{span(r['load_s'] - r['load_again_s'] for r in rows)} s longer than its second."
    )
    return [method, findings]


def quantize_table(result: dict) -> str:
    def perplexity(r: dict, key: str) -> list[str]:
        return [f"{r[key]:.3f}", f"{r[key + '_change']:+.2%}"] if key in r else ["-", "-"]

    return md_table(
        [
            "scheme",
            "perplexity, one pass",
            "change",
            "perplexity, decode steps",
            "change",
            "built-in MB",
            "Llama 2 7B GB",
            "max logit diff, pass / step",
        ],
        (
            [
                r["scheme"],
                *perplexity(r, "perplexity"),
                *perplexity(r, "decode_perplexity"),
                f"{r['builtin_weight_bytes'] / 1e6:.1f}",
                f"{r['llama2_7b_weight_bytes'] / 1e9:.2f}",
                f"{r['random_110m_max_logit_diff']:.3f} / {r['random_110m_decode_max_logit_diff']:.3f}",
            ]
            for r in result["rows"]
        ),
    )


def quantize_paragraphs(result: dict) -> list[str]:
    rows = result["rows"]
    method = (
        f"Perplexity of the built-in model on {result['tokens']:,} held-out tokens of its corpus, in windows of "
        f"{result['window']}, scored in one pass per window (the prompt kernels) and a token at a time through the "
        "KV cache (the decode-step kernels); `change` is against bf16. `max logit diff`: the largest difference "
        "from bf16's logits on a random 110m-shape checkpoint, both ways (the largest logit is "
        f"{rows[0]['random_110m_logit_scale']:.1f}). Weight sizes: the built-in model, and Llama 2 7B with every "
        "linear quantized and the embedding in bf16."
    )
    bf16 = rows[0]["llama2_7b_weight_bytes"]
    moves = "; ".join(
        f"`{r['scheme']}` within {max(abs(r['perplexity_change']), abs(r['decode_perplexity_change'])):.2%} at "
        f"{r['llama2_7b_weight_bytes'] / bf16:.0%}"
        for r in rows[1:]
        if "perplexity_change" in r
    )
    findings = f"Against bf16, perplexity (either way) and Llama 2 7B's weight bytes: {moves}."
    return [method, findings] if moves else [method]


# --- the report -------------------------------------------------------------------------------------------------


def parallel_table(result: dict) -> str:
    rows = [(shape, row) for shape, worlds in result["shapes"].items() for row in worlds.values()]
    return md_table(
        [
            "shape",
            "processes",
            "device",
            "threads each",
            "weight MB each",
            "load s",
            "decode b1",
            "ms per step",
            "of which collectives alone",
            "prefill 512",
        ],
        (
            [
                shape,
                row["world"],
                row["device"],
                row["threads_per_rank"],
                mb(row["weight_bytes_per_rank"]),
                f"{row['load_s']:.2f}",
                f"{row['decode_b1']:.1f}",
                f"{row['decode_step_ms']:.1f}",
                f"{row['comm_ms_per_step']:.1f}",
                f"{row['prefill']:.1f}",
            ]
            for shape, row in rows
        ),
    )


def parallel_paragraphs(result: dict) -> list[str]:
    method = (
        "Tensor parallel (`torchrun --nproc_per_node N`) on one random Meta folder: each process's weight "
        "bytes, its load time, batch-1 decode (tokens/s, 64 new tokens after a 32-token prompt) and a 512-token "
        "prompt (tokens/s), in the default dtype of the device. `of which collectives alone` times one decode "
        "step's all-reduces (two per layer) and the logits' all-gather by themselves. The processes share the "
        "CPU's cores (threads each), and a split model runs PyTorch's operators on DTensors where one process "
        "runs the compiled bf16 kernels, so more processes are slower here: what this measures on a CPU is "
        "the split's memory and the cost of its communication."
    )
    findings = []
    for shape, worlds in result["shapes"].items():
        one, most = worlds[min(worlds, key=int)], worlds[max(worlds, key=int)]
        if most is not one:
            share = most["weight_bytes_per_rank"] / one["weight_bytes_per_rank"]
            speed = most["decode_b1"] / one["decode_b1"]
            findings.append(
                f"{shape}: {most['world']} processes hold {share:.2f} of one process's weight bytes each and decode "
                f"at {speed:.2f}x its speed, the collectives alone taking "
                f"{most['comm_ms_per_step'] / most['decode_step_ms']:.0%} of a step."
            )
    return [method, *findings]


# --- throughput.py results ---------------------------------------------------------------------------------------

THROUGHPUT_PEERS = {
    "ours": "ours, continuous batching (`complete_many`)",
    "ours-meta": "ours, Meta's schedule (`--meta_schedule`)",
    "hf": "transformers, padded batches",
    "llamacpp": "llama.cpp, batched API",
}


def throughput_table(result: dict) -> str:
    rows = []
    for peer, row in result["peers"].items():
        same = f"{row['same_ids_as_ours']}/{result['prompts']}" if "same_ids_as_ours" in row else "-"
        rows.append([THROUGHPUT_PEERS.get(peer, peer), f"{row['tokens_per_s']:.1f}", f"{row['seconds']:.0f}", same])
    return md_table(["peer", "new tokens/s", "seconds", "greedy ids equal to ours"], rows)


def throughput_paragraphs(result: dict) -> list[str]:
    (lo, hi), (nlo, nhi) = result["ranges"]["prompt"], result["ranges"]["new"]
    method = (
        f"The batch completion script's workload on the `{result['shape']}` shape: {result['prompts']} prompts of "
        f"{lo} to {hi} tokens ({result['prompt_tokens']} in all), each with its own number of new tokens, {nlo} to "
        f"{nhi} ({result['new_tokens']} in all), greedy, bf16 (llama.cpp: F16), {result['slots']} rows at a time, "
        f"{result['threads']} threads. New tokens/s counts the tokens asked for over the whole run after loading; "
        "a padded batch's extra tokens are waste. Each peer in its own process, one run."
    )
    findings = []
    ours = result["peers"].get("ours", {})
    if "checked_alone" in ours:
        findings.append(
            f"Ours: greedy ids equal each prompt's run alone for {ours['equal_alone']} of the "
            f"{ours['checked_alone']} prompts checked."
        )
    findings.append(
        "Where ids differ from ours, a run adds bf16 products in another order (Meta's schedule feeds a longer "
        "prompt's tokens through decode steps, padded batches shift positions, llama.cpp has its own kernels), "
        "and random weights leave the top logits near ties, so greedy paths part after a few tokens."
    )
    if "ours_vs_faster_peer" in result:
        findings.append(
            f"Ours against the faster of transformers and llama.cpp: {times(result['ours_vs_faster_peer'])}."
        )
    if "ours-meta" in result["peers"] and ours:
        gain = ours["tokens_per_s"] / result["peers"]["ours-meta"]["tokens_per_s"]
        findings.append(f"Continuous batching against Meta's schedule on the same model: {times(gain)}.")
    return [method, *findings]


# --- device_check.py results -------------------------------------------------------------------------------------

GPU_WORKLOADS = {**WORKLOADS, "prefill_2048": "prefill 2048", "many_64": "complete_many 64 prompts"}


def device_check_table(result: dict) -> str:
    bench = next(iter(result["shapes"].values()))  # one shape
    head = ["peer", *(GPU_WORKLOADS[w] + " tok/s" for w in GPU_WORKLOADS), "load s", "peak MB", "of it KV cache MB"]
    head.append("b1 / ceiling")
    rows = []
    for peer, row in bench["peers"].items():
        if "error" in row:
            rows.append([peer, "failed: " + row["error"].strip().splitlines()[-1][:120], *["-"] * (len(head) - 2)])
            continue
        peak = row.get("peak_gpu_bytes", row["peak_rss_bytes"])
        cells = [f"{row[w]:.1f}" if w in row else "-" for w in GPU_WORKLOADS]
        cache = mb(row["cache_bytes"]) if "cache_bytes" in row else "-"
        share = row.get("decode_b1_bandwidth_fraction")
        rows.append([peer, *cells, f"{row['load_s']:.1f}", mb(peak), cache, "-" if share is None else f"{share:.0%}"])
    return md_table(head, rows) + step_table(bench["peers"])


def step_table(peers: dict) -> str:
    """What one eager batch-1 decode step launched (peers.step_profile), where the run profiled it."""
    rows = []
    for peer, row in ((p, r) for p, r in peers.items() if PROFILE in r):
        prof, step = row[PROFILE], 1e3 / row["decode_b1"] if "decode_b1" in row else None
        busy = f"{prof['kernel_ms'] / step:.0%}" if step and prof["kernels"] else "-"
        top = "; ".join(f"`{name[:60]}` {ms:.2f}" for name, ms in prof["top_kernels_ms"][:3]) or "-"
        cells = [
            f"{step:.2f}" if step else "-",
            f"{prof['aten_ops']:.0f}",
            f"{prof['kernels']:.0f}" if prof["kernels"] else "-",
        ]
        rows.append([peer, *cells, f"{prof['kernel_ms']:.2f}" if prof["kernels"] else "-", busy, top])
    if not rows:
        return ""
    head = ["peer", "step ms", "operators", "kernels", "kernel ms", "of the step", "longest kernels, ms"]
    intro = paragraph(
        "One batch-1 decode step (eager), profiled: `step ms` is the unprofiled step (1000 / decode tokens/s), "
        "`operators` the PyTorch operators Python called, `kernels` what ran on the card and `kernel ms` their "
        "summed time, per step:"
    )
    return f"\n\n{intro}\n\n{md_table(head, rows)}"


def device_check_paragraphs(result: dict) -> list[str]:
    env, tests, limits = result["environment"], result["tests"], result["limits"]
    where = env.get("gpu", f"the CPU ({env.get('cpu_count')} cores)")
    versions = f"torch {env['torch']}" + (f", CUDA {env['cuda']}" if "cuda" in env else "")
    ((shape, _),) = result["shapes"].items()
    method = (
        f"Run on {result['date']} on {where} ({versions}): the test suite on that machine, then this project and "
        f"transformers on the same random `{shape}`-shaped weights, {result['new_tokens']} new tokens per decode "
        "workload, each peer in its own process. Peak memory is the process's GPU allocator peak (resident memory "
        "on a CPU); ours includes the KV cache that `LLaMa.build` allocates once for the largest batch and the "
        "longest workload (`of it KV cache MB`), where transformers grows one per call. `b1 / ceiling` is batch-1 "
        "decode against the card's copy bandwidth "
        f"({limits['copy_gbs']:.0f} GB/s measured; its bf16 GEMM ran at {limits['gemm_bf16_tflops']:.1f} TFLOP/s)."
    )
    counts = ", ".join(f"{tests[k]} {k}" for k in ("passed", "failed", "skipped") if k in tests)
    files = Counter(f.split("::", 1)[0].removeprefix("tests.") for f in tests.get("failures", []))
    failed = ", ".join(f"{name} {n}" for name, n in files.most_common())
    findings = [f"Tests: {counts or 'not run'}" + (f" (failures by file: {failed})." if failed else ".")]
    peers = next(iter(result["shapes"].values()))["peers"]
    for ours, row in peers.items():
        for key, ratios in ((k, v) for k, v in row.items() if k.startswith("ratio_vs_")):
            each = ", ".join(f"{GPU_WORKLOADS[w]} {times(r)}" for w, r in ratios.items())
            findings.append(f"{ours} against {key.removeprefix('ratio_vs_')}, tokens/s: {each}.")
    compiled, eager = peers.get("ours-fp16-compiled", {}), peers.get("ours-fp16", {})
    if "decode_b1" in compiled and "decode_b1" in eager:
        ws = [w for w in GPU_WORKLOADS if w in compiled and w in eager]
        findings.append(
            "compile=True against ours-fp16: "
            + ", ".join(f"{GPU_WORKLOADS[w]} {times(compiled[w] / eager[w])}" for w in ws)
            + "; its warm-up (compiling and capturing: a prefill and three steps) took "
            + ", ".join(f"{compiled[w + '_warmup_s']:.0f} s at {GPU_WORKLOADS[w]}" for w in ws)
            + "."
        )
    return [method, *result.get("notes", []), *findings]


def tables(name: str, result: dict) -> str:
    """The tables of one result file, by the script that wrote it."""
    if name.startswith("device_check"):
        return device_check_table(result)
    if name.startswith("parallel"):
        return parallel_table(result)
    if name.startswith("throughput"):
        return throughput_table(result)
    if "shapes" in result:
        if "kernels" in next(iter(result["shapes"].values())):
            return kernels_table(result) + batched_table(result)
        return speed_tables(result)
    return load_table(result) if "shards" in result["rows"][0] else quantize_table(result)


# file -> (section title, its paragraphs: what was measured, then what the numbers say)
SECTIONS: dict[str, tuple[str, Callable[[dict], list[str]]]] = {
    "speed.json": ("Speed: ours, transformers and llama.cpp", speed_paragraphs),
    "speed_b1.json": ("Batch 1, more rounds", speed_b1_paragraphs),
    "speed_b1_variants.json": ("Each weight format against llama.cpp's", variants_paragraphs),
    "speed_b1_quantized.json": ("Quantized batch 1, more rounds", quantized_paragraphs),
    "kernels.json": ("The linear layers alone", kernels_paragraphs),
    "load_memory.json": ("Load time and memory", load_paragraphs),
    "quantize.json": ("Quantization: quality and size", quantize_paragraphs),
    "parallel.json": ("More than one process: tensor parallel", parallel_paragraphs),
    "throughput.json": ("Many prompts: the batch completion script's workload", throughput_paragraphs),
    "throughput_1.1b.json": ("Many prompts on the 1.1B shape", throughput_paragraphs),
    "device_check.json": ("On a GPU", device_check_paragraphs),
    "device_check_8b.json": ("On a GPU, Llama 3 8B's layers (GQA)", device_check_paragraphs),
}
NO_GPU_RUN = (
    "No GPU has run this code yet. `python bench/device_check.py` is the one command for a GPU "
    "machine: it runs the test suite there, then decode (batch 1, 8, 32), prefill (512, 2048 tokens), load time "
    "and peak memory for this project in fp16, bf16, int8, int4 and fp16 with `compile=True`, against "
    "transformers in fp16 and bf16, on Llama 2 7B-shaped random weights, beside the card's copy bandwidth and "
    "GEMM peak, and writes `bench/results/device_check.json`, whose table then appears here."
)


def load_results() -> dict[str, dict]:
    """Every JSON file in bench/results/, in the order of COMMANDS; one without a command is refused."""
    found = {p.name: json.loads(p.read_text()) for p in RESULTS.glob("*.json")}
    unknown = sorted(set(found) - set(COMMANDS))
    if unknown:
        sys.exit(f"bench/report.py: no command for {', '.join(unknown)}: add the line that wrote it to COMMANDS")
    return {name: found[name] for name in COMMANDS if name in found}


def summary(results: dict[str, dict]) -> str:
    """One short table for the main README: ours against transformers and llama.cpp on both shapes."""
    speed, quant = results["speed.json"], results.get("speed_b1_quantized.json")

    def cell(row: dict, workload: str) -> str:
        share = f" ({row['bandwidth_fraction_b1']:.0%})" if workload == "decode_b1" else ""
        return f"{row[workload]:.1f}{share}"

    rows = [
        [
            shape,
            label,
            *(cell(peers[p], w) for p in ("ours", "hf", "llamacpp")),
            times(ratio(speed, shape, "ours", "hf", w)),
            times(ratio(speed, shape, "ours", "llamacpp", w)),
        ]
        for shape, peers in speed["shapes"].items()
        for w, label in SUMMARY_WORKLOADS.items()
    ]
    for shape, ours, other in comparisons(quant) if quant else ():
        peers = quant["shapes"][shape]
        rows.append(
            [
                shape,
                f"decode, batch 1: {ours.removeprefix('ours-')} vs {other.removeprefix('llamacpp-')}",
                cell(peers[ours], "decode_b1"),
                "-",
                cell(peers[other], "decode_b1"),
                "-",
                times(ratio(quant, shape, ours, other, "decode_b1")),
            ]
        )
    table = md_table(
        [
            "shape",
            f"tokens/s, {speed['threads']} threads",
            "ours",
            "Hugging Face",
            "llama.cpp",
            "ours / HF",
            "ours / llama.cpp",
        ],
        rows,
    )
    legend = (
        f"Medians of {rounds(speed)} rounds on the same random weights, bf16 against llama.cpp's F16; ratios are "
        "medians of the ratios within each round. In brackets: batch-1 decode as a share of the memory-bandwidth "
        "ceiling (every weight read once per token at the speed of a copy; reading alone can beat a copy, hence "
        "over 100%)."
    )
    if quant:
        legend += (
            f" The int8 / int4 rows (`quantize=`) are against llama.cpp's q8_0 / q4_0, {rounds(quant)} rounds in a "
            "separate run (speed_b1_quantized.json)."
        )
    return f"{table}\n\n{paragraph(legend)}"


def intro(results: dict[str, dict]) -> str:
    speed = next(r for name, r in results.items() if name.startswith("speed"))
    bandwidths = [r["bandwidth_gbs"] for r in results.values() if "bandwidth_gbs" in r]
    threads = sorted({r["threads"] for r in results.values() if "threads" in r})

    def shape(name: str, peers: dict) -> str:
        s = SHAPES[name]
        kv = f", {s['n_kv_heads']} KV heads" if "n_kv_heads" in s else ""
        return (
            f"`{name}` ({SHAPE_NOTES.get(name, '')}dim {s['dim']}, {s['n_layers']} layers, {s['n_heads']} "
            f"heads{kv}; {mb(peers['ours']['weight_bytes'])} MB of bf16 weights)"
        )

    what = (
        "This project (`ours`) against the tools people would pick instead, Hugging Face `transformers` and "
        "llama.cpp (through `llama-cpp-python`, GGUF files written with the `gguf` package), on the same random "
        "weights in Meta's layout, made by `bench/speed.py`. Two shapes, both Llama 2's architecture: "
        f"{' and '.join(shape(n, p) for n, p in speed['shapes'].items() if 'ours' in p)}."
    )
    how = (
        f"Every run uses {' or '.join(map(str, threads))} CPU threads. Each peer runs in its own process, the peers "
        "taking turns round by round; tables show medians over rounds, and a ratio is the median of the ratios "
        "within each round (not the quotient of two medians). Each run also measures memory bandwidth with a copy "
        "probe (bytes read plus written per second). `b1 / ceiling` is batch-1 decode as a share of the ceiling "
        "that bandwidth sets if every token reads every weight once: tokens/s times the bytes of the weights, over "
        "the probe's bytes per second. A stream that only reads can beat a copy, so the share can pass 1."
    )
    noise = (
        "The runs were made at different times on a shared machine (the copy probe read "
        f"{span(bandwidths, '.1f')} GB/s across them): compare numbers within a table, not across tables. Run the "
        "scripts from the repository root after `pip install -e '.[bench]'`."
    )
    return "\n\n".join(map(paragraph, (what, how, noise)))


def section(name: str, result: dict) -> str:
    title, paragraphs = SECTIONS[name]
    method, *findings = paragraphs(result)
    return "\n\n".join(
        [
            f"## {title}",
            f"`bench/results/{name}`, written by:",
            f"```bash\n{COMMANDS[name]}\n```",
            paragraph(method),
            tables(name, result),
            *map(paragraph, findings),
        ]
    )


def report(results: dict[str, dict]) -> str:
    head = "# Benchmarks\n\n" + paragraph(
        "Every number in this file is printed by `python bench/report.py` from the JSON files in `bench/results/`, "
        "which the command named in each section wrote: edit that script, not this file (`python bench/report.py "
        "--check` fails when the two differ)."
    )
    glance = "## At a glance\n\n`python bench/report.py --summary` prints this table:\n\n" + summary(results)
    sections = [section(name, result) for name, result in results.items()]
    if "device_check.json" not in results:
        sections.append(f"## {SECTIONS['device_check.json'][0]}\n\n{paragraph(NO_GPU_RUN)}")
    return "\n\n".join([head, intro(results), *([glance] if "speed.json" in results else []), *sections]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="print these result files' tables instead")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if bench/README.md is out of date")
    mode.add_argument("--summary", action="store_true", help="print the main README's table")
    opts = ap.parse_args()
    if opts.files:
        for path in opts.files:
            print(f"<!-- {path} -->\n{tables(path.name, json.loads(path.read_text()))}\n")
        return
    results = load_results()
    if opts.summary:
        print(summary(results))
        return
    text = report(results)
    if opts.check:
        if not README.is_file() or README.read_text(encoding="utf-8") != text:
            sys.exit(
                "bench/README.md differs from what bench/report.py writes from bench/results/: "
                "run `python bench/report.py` and commit the result"
            )
        if "speed.json" in results and summary(results) not in MAIN_README.read_text(encoding="utf-8"):
            sys.exit("README.md's speed table is not what `python bench/report.py --summary` prints: paste it again")
        print("bench/README.md and README.md's speed table are up to date")
        return
    README.write_text(text, encoding="utf-8")
    print(f"wrote {README.relative_to(BENCH.parent)} ({len(text.encode()):,} bytes)")


if __name__ == "__main__":
    main()
