"""README's tables from the JSON that the bench/ scripts wrote (speed, kernels, load_memory,
quantize), so the numbers in README are copied by a script, never by hand.

    python bench/report.py bench/results/speed.json [bench/results/kernels.json ...]
"""

import json
import sys
from pathlib import Path

# The comparisons README shows: each of ours against the peer of the same kind.
COUNTERPARTS = {("ours", "hf"), ("ours", "llamacpp"), ("ours-packed", "hf"), ("ours-packed", "llamacpp"),
                ("ours-fp16", "llamacpp"), ("ours-int8", "llamacpp-q8_0"), ("ours-int4", "llamacpp-q4_0")}  # fmt: skip
NAMES = {"decode_b1": "decode b1", "prefill_512": "prefill 512", "decode_b8": "decode b8", "decode_b32": "decode b32"}


def speed_table(result: dict) -> str:
    shapes = result["shapes"]
    workloads = [w for w in NAMES if w in next(iter(next(iter(shapes.values())).values()))]
    lines = [f"| shape | peer | {' | '.join(NAMES[w] for w in workloads)} | load s | peak RSS MB | b1 / ceiling |",
             "|---" * (len(workloads) + 5) + "|"]  # fmt: skip
    for shape, peers in shapes.items():
        for peer, row in peers.items():
            cells = [f"{row[w]:.1f}" for w in workloads]
            frac = row.get("bandwidth_fraction_b1")
            frac = "-" if frac is None else f"{frac:.2f}"
            lines.append(f"| {shape} | {peer} | {' | '.join(cells)} | {row['load_s']:.2f} | "
                         f"{row['peak_rss_bytes'] / 1e6:.0f} | {frac} |")  # fmt: skip
        for peer, row in peers.items():
            for key, ratios in row.items():
                if key.startswith("ratio_vs_") and (peer, key.removeprefix("ratio_vs_")) in COUNTERPARTS:
                    cells = [f"{ratios[w]:.2f}x" for w in workloads]
                    lines.append(f"| {shape} | {peer} / {key.removeprefix('ratio_vs_')} | {' | '.join(cells)} | | | |")
    notes = [f"memory bandwidth (copy probe): {result['bandwidth_gbs']:.1f} GB/s, {result['threads']} threads, "
             f"{result['new_tokens']} new tokens"]  # fmt: skip
    for shape, peers in shapes.items():  # with several rounds, the spread of the batch-1 ratio
        for peer, row in peers.items():
            other = next((o for p, o in COUNTERPARTS if p == peer and o.startswith("llamacpp")), None)
            if other in peers and len(row["rounds"]) > 2:
                ratios = [a["decode_b1"] / b["decode_b1"] for a, b in zip(row["rounds"], peers[other]["rounds"])]
                notes.append(f"{shape} {peer} / {other} decode b1, round by round: {', '.join(f'{r:.2f}x' for r in ratios)}")
    return "\n".join(lines) + "\n\n" + "; ".join(notes)


def quantize_table(result: dict) -> str:
    lines = ["| scheme | perplexity, one pass | change | perplexity, decode steps | change | built-in weights MB | "
             "Llama 2 7B weights GB | max logit diff, random 110M: pass / step |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        ppl = " | ".join(f"{r[k]:.3f} | {r[k + '_change']:+.2%}" if k in r else "- | -"
                         for k in ("perplexity", "decode_perplexity"))  # fmt: skip
        lines.append(f"| {r['scheme']} | {ppl} | {r['builtin_weight_bytes'] / 1e6:.1f} | "
                     f"{r['llama2_7b_weight_bytes'] / 1e9:.2f} | {r['random_110m_max_logit_diff']:.3f} / "
                     f"{r['random_110m_decode_max_logit_diff']:.3f} (logits up to {r['random_110m_logit_scale']:.1f}) |")  # fmt: skip
    return "\n".join(lines)


def kernels_table(result: dict) -> str:
    lines = ["| shape | kernel | ms per step (linears only) | weight MB | GB/s of its weights | at most tokens/s "
             "| vs plain PyTorch |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for shape, r in result["shapes"].items():
        for name, k in r["kernels"].items():
            lines.append(f"| {shape} | {name} | {k['step_ms']:.1f} | {k['weight_bytes'] / 1e6:.0f} | "
                         f"{k['weight_gbs']:.1f} | {k['tokens_per_s_bound']:.1f} | {k['speedup_vs_plain']:.2f}x |")  # fmt: skip
    return "\n".join(lines) + f"\n\nmemory bandwidth (copy probe): {result['bandwidth_gbs']:.1f} GB/s, " \
        f"{result['threads']} threads"  # fmt: skip


def load_table(result: dict) -> str:
    lines = ["| shards | dtype | pack | quantize | weights MB | peak RSS MB | peak / weights | load s | again s | read s |",
             "|---" * 10 + "|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['shards']} | {r['dtype']} | {r['pack']} | {r['quantize'] or '-'} | "
                     f"{r['weight_bytes'] / 1e6:.0f} | {r['peak_rss_bytes'] / 1e6:.0f} | "
                     f"{r['peak_rss_bytes'] / r['weight_bytes']:.2f} | {r['load_s']:.2f} | {r['load_again_s']:.2f} | "
                     f"{r['read_s']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def table(data: dict) -> str:
    if "shapes" in data:
        return kernels_table(data) if "kernels" in next(iter(data["shapes"].values())) else speed_table(data)
    return load_table(data) if "shards" in data["rows"][0] else quantize_table(data)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"<!-- {path} -->")
        print(table(json.loads(Path(path).read_text())), end="\n\n")
