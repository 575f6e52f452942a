"""The batch completion script's workload, end to end: many prompts of mixed lengths, each with its
own number of new tokens (greedy, random weights in Meta's layout, no end-of-text stop), through

  ours             LLaMa.complete_many: continuous batching, max_batch_size rows
  ours-meta        Meta's schedule: batches of max_batch_size prompts in file order, each batch
                   stepped until its longest answer is done (inference.py --meta_schedule)
  hf               transformers' generate on left-padded batches in file order (max_new_tokens: the
                   batch's largest)
  llamacpp         llama.cpp's batched API (llama-cpp-python, F16 GGUF): a batch of sequences in file
                   order, each prefilled, then one llama_decode per step for the sequences not done

Tokens/s counts the new tokens asked for (a padded batch's extra ones are waste), over the wall time
of the whole workload after loading. Each peer runs in its own process. Ours is also checked
against each prompt run alone (greedy ids) on the first --check prompts.

    python bench/throughput.py                  # 110m, 256 prompts, 8-512 prompt and 16-256 new tokens
    python bench/throughput.py --smoke          # a tiny model and a dozen prompts: checks the harness
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from speed import PEER_PACKAGES, make_models, peer_available  # bench/speed.py, beside this script

PEERS = ("ours", "ours-meta", "hf", "llamacpp")


def workload(n: int, prompt_range: tuple[int, int], new_range: tuple[int, int], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_range[0], prompt_range[1] + 1, size=n)
    prompts = [[1, *rng.integers(3, 32000, size=int(k) - 1).tolist()] for k in lengths]  # BOS first
    return {"prompts": prompts, "new": rng.integers(new_range[0], new_range[1] + 1, size=n).tolist()}


def batches(work: dict, size: int):
    for i in range(0, len(work["prompts"]), size):
        yield work["prompts"][i : i + size], work["new"][i : i + size]


def run_ours(path: str, work: dict, slots: int, max_len: int, meta: bool, check: int) -> tuple[list, dict]:
    from llama import LLaMa

    llm = LLaMa.build(path, max_seq_len=max_len, max_batch_size=slots, dtype="bfloat16", device="cpu")
    t = time.perf_counter()
    if meta:
        out = []
        for prompts, new in batches(work, slots):
            tokens, _ = llm.generate(prompts, max(new), temperature=0)
            out += [row[:n] for row, n in zip(tokens, new)]
    else:
        out = [c.tokens for c in llm.complete_many(work["prompts"], temperature=0, max_gen_len=work["new"])]
    seconds = time.perf_counter() - t
    extra = {}
    if check:  # each of the first prompts alone, through Meta's schedule at batch 1
        alone = [llm.generate([p], n, temperature=0)[0][0] for p, n in zip(work["prompts"][:check], work["new"])]
        extra["equal_alone"] = sum(a == b for a, b in zip(alone, out))
        extra["checked_alone"] = len(alone)
    return out, {"seconds": seconds, **extra}


def run_hf(path: str, work: dict, slots: int, threads: int) -> tuple[list, dict]:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    t, out = time.perf_counter(), []
    for prompts, new in batches(work, slots):
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding, as generate wants
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            full = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max(new),
                min_new_tokens=max(new),
                pad_token_id=0,
            )
        out += [row[width : width + n].tolist() for row, n in zip(full, new)]
    return out, {"seconds": time.perf_counter() - t}


def run_llamacpp(path: str, work: dict, slots: int, max_len: int, threads: int) -> tuple[list, dict]:
    from peers import LlamaCpp  # bench/peers.py: the model, a context of `slots` sequences, decode and argmax

    cpp = LlamaCpp(path, threads, slots, max_len, "cpu")
    lib, t, out = cpp.lib, time.perf_counter(), []
    for prompts, new in batches(work, slots):
        lib.llama_memory_clear(lib.llama_get_memory(cpp.ctx), True)
        rows = []
        for seq, prompt in enumerate(prompts):  # each prompt in one pass (prompts fit n_batch)
            cpp._decode([(tok, pos, seq, pos == len(prompt) - 1) for pos, tok in enumerate(prompt)])
            rows.append([cpp._argmax(len(prompt) - 1)])
        while live := [s for s, row in enumerate(rows) if len(row) < new[s]]:
            cpp._decode([(rows[s][-1], len(prompts[s]) + len(rows[s]) - 1, s, True) for s in live])
            for i, s in enumerate(live):
                rows[s].append(cpp._argmax(i))
        out += rows
    return out, {"seconds": time.perf_counter() - t}


def child(opts) -> None:
    """One peer in this process: its outputs and seconds as one JSON line."""
    work = json.loads(Path(opts.work).read_text())
    max_len = max(len(p) + n for p, n in zip(work["prompts"], work["new"]))
    peer = opts.child
    if peer.startswith("ours"):
        out, stats = run_ours(opts.path, work, opts.slots, max_len, peer == "ours-meta", opts.check * (peer == "ours"))
    elif peer == "hf":
        out, stats = run_hf(opts.path, work, opts.slots, opts.threads)
    else:
        out, stats = run_llamacpp(opts.path, work, opts.slots, max_len, opts.threads)
    print(json.dumps({"tokens": out, **stats}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="110m")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--prompt_tokens", default="8,512", help="the range of prompt lengths")
    ap.add_argument("--new_tokens", default="16,256", help="the range of each prompt's new tokens")
    ap.add_argument("--slots", type=int, default=32, help="rows at a time (max_batch_size, the batches' size)")
    ap.add_argument("--check", type=int, default=16, help="prompts of ours also run alone, to compare ids")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--smoke", action="store_true", help="tiny shape, 12 prompts of 4-24 tokens, 2-12 new")
    ap.add_argument("--out", default="bench/results/throughput.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        return child(opts)
    if opts.smoke:
        opts.shape, opts.prompts, opts.prompt_tokens, opts.new_tokens, opts.slots, opts.check = (
            "tiny",
            12,
            "4,24",
            "2,12",
            4,
            4,
        )
    peers = [p for p in opts.peers.split(",") if peer_available(p)]
    for p in set(opts.peers.split(",")) - set(peers):
        print(f"skipping {p}: {PEER_PACKAGES[p.split('-')[0]]} is not installed (pip install -e '.[bench]')")
    ranges = [tuple(map(int, r.split(","))) for r in (opts.prompt_tokens, opts.new_tokens)]
    work = workload(opts.prompts, *ranges)
    asked = sum(work["new"])
    result = {
        "shape": opts.shape,
        "threads": opts.threads,
        "slots": opts.slots,
        "prompts": opts.prompts,
        "prompt_tokens": sum(map(len, work["prompts"])),
        "new_tokens": asked,
        "ranges": {"prompt": ranges[0], "new": ranges[1]},
        "peers": {},
    }
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_models(opts.shape, Path(tmp), [p for p in peers if p != "ours-meta"] + ["ours"])
        paths["ours-meta"] = paths["ours"]
        (Path(tmp) / "work.json").write_text(json.dumps(work))
        for peer in peers:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                peer,
                "--path",
                paths[peer],
                "--work",
                str(Path(tmp) / "work.json"),
            ]
            cmd += ["--slots", str(opts.slots), "--threads", str(opts.threads), "--check", str(opts.check)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"{peer} failed:\n{r.stderr[-4000:]}")
            row = json.loads(r.stdout.strip().splitlines()[-1])
            outputs[peer] = row.pop("tokens")
            made = sum(map(len, outputs[peer]))
            row |= {"new_tokens_made": made, "tokens_per_s": made / row["seconds"]}
            row["prompt_tokens_per_s"] = result["prompt_tokens"] / row["seconds"]
            result["peers"][peer] = row
            print(f"{peer}: {row['tokens_per_s']:.1f} new tokens/s ({made} of {asked} in {row['seconds']:.1f} s)")
    if "ours" in outputs:  # greedy ids per prompt, against ours
        for peer, out in outputs.items():
            result["peers"][peer]["same_ids_as_ours"] = sum(a == b for a, b in zip(out, outputs["ours"]))
        others = [result["peers"][p]["tokens_per_s"] for p in ("hf", "llamacpp") if p in result["peers"]]
        if others:
            result["ours_vs_faster_peer"] = result["peers"]["ours"]["tokens_per_s"] / max(others)
    print_table(result)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {opts.out}")


def print_table(result: dict) -> None:
    print(
        f"\n{result['shape']}: {result['prompts']} prompts ({result['prompt_tokens']} prompt tokens, "
        f"{result['new_tokens']} new), {result['slots']} rows at a time, {result['threads']} threads"
    )
    print(f"{'peer':<12}{'new tok/s':>12}{'seconds':>10}{'same ids':>10}")
    for peer, row in result["peers"].items():
        same = f"{row.get('same_ids_as_ours', '-')}/{result['prompts']}"
        print(f"{peer:<12}{row['tokens_per_s']:>12.1f}{row['seconds']:>10.1f}{same:>10}")


if __name__ == "__main__":
    main()
