"""Speed, side by side on the same weights: this project, Hugging Face transformers and llama.cpp
(llama-cpp-python, GGUF written with the gguf package), plus a memory-bandwidth probe for the
batch-1 ceiling. Random weights in Meta's layout are made here (no downloads). Every peer runs in
its own process, peers interleaved round by round; medians, and ratios taken within a round.

    pip install -e '.[bench]'
    python bench/speed.py                       # 110m and 1.1b shapes, all peers, 3 rounds
    python bench/speed.py --smoke               # a tiny model, one round: checks the harness works
"""

import argparse
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # params.json of each shape; vocab 32000 as in Llama 2
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32),
    "110m": dict(dim=768, n_layers=12, n_heads=12, multiple_of=256),
    "1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, multiple_of=256),  # TinyLlama: FFN 5632
    "7b": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256),  # Llama 2 7B (bench/device_check.py)
    # Llama 3 8B's layers (GQA: 8 KV heads, FFN 14336) with Llama 2's vocabulary (bench/device_check.py --shape 8b)
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3),
}
PEERS = ("ours", "ours-packed", "hf", "llamacpp")
# Quantized variants, for the quantization comparison: this project's int8/int4 and llama.cpp's own.
VARIANTS = ("ours-fp16", "ours-int8", "ours-int4", "llamacpp-q8_0", "llamacpp-q4_0")
WORKLOADS = ("decode_b1", "prefill_512", "decode_b8", "decode_b32")


def make_tokenizer(path: Path) -> None:
    """A 32000-piece SentencePiece model with no EOS, so every run generates all its tokens."""
    import sentencepiece as spm

    lines = [f"line {i} of some text for a tokenizer with words" for i in range(2000)]
    symbols = ["".join(p) for p in itertools.islice(itertools.product("aeiou", repeat=7), 31700)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=32000,
        model_type="bpe",
        user_defined_symbols=symbols,
        eos_id=-1,
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())


def make_models(shape: str, root: Path, peers: list[str], device: str = "cpu") -> dict[str, str]:
    """The same random bf16 weights as a Meta folder, a Hugging Face folder and a GGUF F16 file
    (drawn on device: a GPU draws 7B of them in a moment, a CPU in a minute)."""
    import torch

    from llama.checkpoint import save_checkpoint
    from llama.model import ModelArgs, Transformer
    from llama.tokenizer import Tokenizer

    args = ModelArgs(**SHAPES[shape], vocab_size=32000, norm_eps=1e-5)
    meta = root / shape / "meta"
    make_tokenizer(root / "tokenizer.model") if not (root / "tokenizer.model").exists() else None
    with torch.device("meta"):
        model = Transformer(args).to(torch.bfloat16)
    model = model.to_empty(device=device)
    model.init_weights(torch.Generator(device=device).manual_seed(0))
    sd = model.to("cpu").state_dict()
    save_checkpoint(sd, args, meta)
    (meta / "tokenizer.model").write_bytes((root / "tokenizer.model").read_bytes())
    paths = {p: str(meta) for p in peers if p.startswith("ours")}
    if any(p.startswith("hf") for p in peers):
        from llama.convert.hf import meta_folder_to_hf

        hf = str(meta_folder_to_hf(meta, root / shape / "hf"))
        paths.update({p: hf for p in peers if p.startswith("hf")})
    for peer in (p for p in peers if p.startswith("llamacpp")):
        from llama.convert.gguf import write_gguf

        kind = (peer.split("-")[1] if "-" in peer else "f16").upper()
        paths[peer] = str(
            write_gguf(sd, args, Tokenizer(meta / "tokenizer.model"), root / shape / f"{kind}.gguf", kind)
        )
    return paths


def bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    """Best-of copy bandwidth (read + write bytes per second) of a large tensor."""
    import torch

    a = torch.ones(size_mb << 18, dtype=torch.float32)  # size_mb MB
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="110m,1.1b")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"from {', '.join(PEERS + VARIANTS)}")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--smoke", action="store_true", help="tiny shape, 1 round, 8 new tokens")
    ap.add_argument("--out", default="bench/results/speed.json")
    opts = ap.parse_args()
    if opts.smoke:
        opts.shapes, opts.rounds, opts.new_tokens = "tiny", 1, 8
    shapes, peers, workloads = opts.shapes.split(","), opts.peers.split(","), opts.workloads.split(",")
    available = [p for p in peers if peer_available(p)]
    for p in set(peers) - set(available):
        why = (
            "this CPU's oneDNN has no bf16 kernels"
            if p == "ours-packed"
            else f"{PEER_PACKAGES[p.split('-')[0]]} is not installed (pip install -e '.[bench]')"
        )
        print(f"skipping {p}: {why}")
    bw = bandwidth_gbs(64 if opts.smoke else 1024)
    gemm = gemm_peak_gflops(opts.threads)
    print(f"memory bandwidth (copy): {bw:.1f} GB/s, bf16 GEMM: {gemm:.0f} GFLOP/s, threads: {opts.threads}")

    results = {"bandwidth_gbs": bw, "gemm_bf16_gflops": gemm, "threads": opts.threads, "new_tokens": opts.new_tokens}
    results |= {"shapes": {}, "rooflines": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            paths = make_models(shape, Path(tmp), available)
            runs = {p: [] for p in available}
            for r in range(opts.rounds):
                for peer in available:  # interleaved: each round runs every peer once
                    runs[peer].append(run_peer(peer, paths[peer], workloads, opts))
                    print(
                        f"{shape} round {r + 1} {peer}: "
                        + ", ".join(f"{k} {v:.1f}" for k, v in runs[peer][-1].items() if k in WORKLOADS)
                    )
            results["shapes"][shape] = summarize(runs, workloads, bw)
            results["rooflines"][shape] = {w: roofline(shape, w, opts.new_tokens, bw, gemm) for w in workloads}
    print_table(results, workloads)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {opts.out}")


def gemm_peak_gflops(threads: int) -> float:
    """The best speed of a few large bf16 matrix products (PyTorch's, oneDNN's GEMM on a CPU), GFLOP/s."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in ((512, 2048, 5632), (2048, 2048, 2048), (1024, 4096, 4096)):
        a, b = torch.randn(m, k).bfloat16(), torch.randn(k, n).bfloat16()
        a @ b  # warm-up: oneDNN picks its kernel
        for _ in range(3):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


def roofline(shape: str, workload: str, new_tokens: int, bw_gbs: float, gemm_gflops: float) -> dict:
    """The most tokens/s a workload can reach on this machine with bf16 weights, and what bounds it:
    memory (a decode step reads every weight but the embedding table, and each row's keys and values,
    at the copy speed) or compute (each token's products, linears and attention, at the GEMM peak).
    Context lengths are the workload's averages: half the prompt for a prefill; the 32-token prompt
    and half the new tokens for a decode."""
    from peers import workload as spec

    from llama.model import ModelArgs

    args = ModelArgs(**SHAPES[shape], vocab_size=32000)
    batch, length, prefill = spec(workload)
    read = args.parameter_count() - args.vocab_size * args.dim  # every weight but the embedding table
    # less the norms; a prefill's logits are its last position's alone
    linears = read - args.dim * (2 * args.n_layers + 1) - (args.vocab_size * args.dim if prefill else 0)
    context = length / 2 if prefill else length + new_tokens / 2
    flops = 2 * linears + 4 * args.n_layers * args.dim * context  # linears, then q.k and p.v
    bounds = {"compute": gemm_gflops * 1e9 / flops}
    if not prefill:
        cache = batch * 2 * args.n_layers * 2 * args.kv_heads * args.head_dim * context  # bf16 keys and values
        bounds["memory"] = batch * bw_gbs * 1e9 / (2 * read + cache)
    bound = min(bounds, key=bounds.get)
    return {"tokens_per_s": bounds[bound], "bound": bound, **{f"{k}_tokens_per_s": v for k, v in bounds.items()}}


PEER_PACKAGES = {"ours": "torch", "hf": "transformers", "llamacpp": "llama_cpp"}


def peer_available(peer: str) -> bool:
    import importlib.util

    if peer == "ours-packed":
        from llama.cpu import onednn_bf16

        return onednn_bf16()
    return importlib.util.find_spec(PEER_PACKAGES[peer.split("-")[0]]) is not None


def run_peer(peer: str, path: str, workloads: list[str], opts, device: str = "cpu") -> dict:
    """One fresh process: load, warm up, each workload once; tokens/s, load seconds, peak memory."""
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("peers.py")),
        peer,
        path,
        ",".join(workloads),
        str(opts.new_tokens),
        str(opts.threads),
        device,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=getattr(opts, "peer_timeout", None))
    if r.returncode:
        raise RuntimeError(f"{peer} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarize(runs: dict[str, list[dict]], workloads: list[str], bw: float) -> dict:
    out = {}
    for peer, rows in runs.items():
        out[peer] = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        out[peer]["rounds"] = rows
    for ours in (p for p in runs if p.startswith("ours")):
        for peer in (p for p in runs if not p.startswith("ours")):
            out[ours][f"ratio_vs_{peer}"] = {
                w: statistics.median(a[w] / b[w] for a, b in zip(runs[ours], runs[peer])) for w in workloads
            }
    for peer in runs:
        out[peer]["bandwidth_fraction_b1"] = (
            out[peer]["decode_b1"] * out[peer]["weight_bytes"] / (bw * 1e9) if "decode_b1" in workloads else None
        )
    return out


def print_table(results: dict, workloads: list[str]) -> None:
    cols = workloads + ["load_s", "peak_rss_mb", "bw_frac_b1"]
    print(f"\n{'shape':<6} {'peer':<9} " + " ".join(f"{c:>12}" for c in cols))
    for shape, peers in results["shapes"].items():
        for peer, row in peers.items():
            vals = [row[w] for w in workloads] + [
                row["load_s"],
                row["peak_rss_bytes"] / 1e6,
                row["bandwidth_fraction_b1"] or 0,
            ]
            print(f"{shape:<6} {peer:<9} " + " ".join(f"{v:>12.2f}" for v in vals))
        for ours, row in peers.items():
            for key, ratios in row.items():
                if key.startswith("ratio_vs_"):
                    name = f"{ours}/{key.removeprefix('ratio_vs_')}"
                    print(f"{shape:<6} {name:<9} " + " ".join(f"{ratios[w]:>11.2f}x" for w in workloads))
        limits = results["rooflines"][shape]
        print(f"{shape:<6} {'roofline':<9} " + " ".join(f"{limits[w]['tokens_per_s']:>12.2f}" for w in workloads))
        print(f"{shape:<6} {'bound':<9} " + " ".join(f"{limits[w]['bound']:>12}" for w in workloads))


if __name__ == "__main__":
    main()
