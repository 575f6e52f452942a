"""Quantization quality and size: perplexity of the built-in model on held-out Shakespeare (the
last 10% of the corpus, which training never saw) in bf16, int8 and int4, scored both in one pass
per window (the kernels prompts use) and one token at a time through the cache (the kernels decode
steps use); the largest logit difference on a random 110M-shape checkpoint, in both passes; the
bytes of the weights, also for a 7B model.
Speed is measured by bench/speed.py (--peers ours,ours-int8,ours-int4,llamacpp,llamacpp-q8_0,...).

    python bench/quantize.py [--text ../shared/data/tinyshakespeare.txt] [--out bench/results/quantize.json]
"""

import argparse
import json
import math
from pathlib import Path

import torch

from llama import LLaMa
from llama.cpu import use_cpu_modules, weight_bytes
from llama.model import ModelArgs, Transformer
from llama.quantize import make_quantized

ROOT = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def perplexity(llm: LLaMa, ids: list[int], window: int) -> float:
    """exp(mean NLL) over consecutive windows, each starting with BOS as the model was trained."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - window, window):
        chunk = torch.tensor([[llm.tokenizer.bos_id] + ids[start : start + window]])
        logits = llm.model(chunk[:, :-1], 0)
        nll += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += window
    return math.exp(nll / count)


@torch.inference_mode()
def decode_perplexity(llm: LLaMa, ids: list[int], window: int) -> float:
    """The same windows as perplexity(), fed one token per step through the KV cache."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - window, window):
        chunk = [llm.tokenizer.bos_id] + ids[start : start + window]
        for pos in range(window):
            logits = llm.model(torch.tensor([[chunk[pos]]]), pos)
            nll -= torch.log_softmax(logits[0, -1], dim=-1)[chunk[pos + 1]].item()
            count += 1
    return math.exp(nll / count)


# (row name, scheme, int4 group size): the build's defaults, and int4 in groups of 32 for comparison
SCHEMES = [("bf16", None, None), ("int8", "int8", None), ("int4", "int4", 64), ("int4, groups of 32", "int4", 32)]


def quantized(model: Transformer, scheme: str | None, group_size: int | None, quantize: bool = True) -> Transformer:
    return make_quantized(model, scheme, group_size or 64, quantize=quantize) if scheme else model


def seven_b_bytes(scheme: str | None, group_size: int | None) -> int:
    """Weight bytes of Llama 2 7B: every linear quantized, the embedding kept in bf16."""
    args = ModelArgs.from_params(json.loads((ROOT / "params" / "llama-2-7b.json").read_text()))
    args.vocab_size = 32000
    with torch.device("meta"):
        model = quantized(Transformer(args).to(torch.bfloat16), scheme, group_size, quantize=False)
    return weight_bytes(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--out", default="bench/results/quantize.json")
    opts = ap.parse_args()
    rows, result = [], {}
    text = Path(opts.text).read_text(encoding="utf-8") if Path(opts.text).is_file() else None
    if text is None:
        print(f"{opts.text} is absent: skipping perplexity (pass --text)")
    for name, scheme, group_size in SCHEMES:
        row = {"scheme": name}
        llm = LLaMa.build(max_seq_len=opts.window + 1, max_batch_size=1, device="cpu", dtype="bfloat16")
        quantized(llm.model, scheme, group_size)  # as quantize= in the build does
        row["builtin_weight_bytes"] = weight_bytes(llm.model)
        if text is not None:
            held_out = text[int(len(text) * 0.9) :]
            ids = llm.tokenizer.encode(held_out, bos=False, eos=False)[: opts.tokens + opts.window]
            row["perplexity"] = perplexity(llm, ids, opts.window)
            row["decode_perplexity"] = decode_perplexity(llm, ids, opts.window)
        row["llama2_7b_weight_bytes"] = seven_b_bytes(scheme, group_size)
        rows.append(row)
    base = rows[0].get("perplexity")
    for row in rows:
        if base:
            row["perplexity_change"] = row["perplexity"] / base - 1
            row["decode_perplexity_change"] = row["decode_perplexity"] / rows[0]["decode_perplexity"] - 1

    # The largest logit difference on a random checkpoint (110M shape), against bf16.
    args = ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32000)
    x = torch.randint(0, 32000, (1, 64), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, scheme, group_size in SCHEMES:
        with torch.device("meta"):
            model = Transformer(args)
        model = model.to(torch.bfloat16).to_empty(device="cpu").requires_grad_(False)
        model.init_weights(torch.Generator().manual_seed(0))
        quantized(model, scheme, group_size)
        use_cpu_modules(model)  # as LLaMa.build runs a model on the CPU
        model.setup_cache(1, 64)
        with torch.inference_mode():  # the whole pass, then the last position again as a decode step
            logits[name] = model(x, 0), model(x[:, -1:], 63)
    for row in rows:
        for i, key in enumerate(("random_110m_max_logit_diff", "random_110m_decode_max_logit_diff")):
            row[key] = (logits[row["scheme"]][i] - logits["bf16"][i]).abs().max().item()
        row["random_110m_logit_scale"] = logits["bf16"][0].abs().max().item()

    print(
        f"{'scheme':<18} {'perplexity':>10} {'change':>8} {'decode ppl':>10} {'change':>8} {'built-in MB':>11} "
        f"{'7B GB':>6} {'max logit diff (110M): pass, step':>34}"
    )
    for r in rows:
        ppl = " ".join(
            f"{r[k]:>10.3f} {r[k + '_change']:>+8.2%}" if k in r else f"{'-':>10} {'-':>8}"
            for k in ("perplexity", "decode_perplexity")
        )
        print(
            f"{r['scheme']:<18} {ppl} {r['builtin_weight_bytes'] / 1e6:>11.1f} "
            f"{r['llama2_7b_weight_bytes'] / 1e9:>6.2f} "
            f"{r['random_110m_max_logit_diff']:>10.4f}, {r['random_110m_decode_max_logit_diff']:.4f} "
            f"of {r['random_110m_logit_scale']:.2f}"
        )
    result = {"rows": rows, "window": opts.window, "tokens": opts.tokens, "torch": torch.__version__}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
