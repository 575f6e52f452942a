"""Peak resident memory and time of LLaMa.build on a checkpoint of a few hundred MB, against the
size of the weights and the time to read the shard files. Each case runs in a fresh process;
the peak is taken after one forward pass, which pages in weights that loading mapped lazily.

    python bench/load_memory.py [--dim 1024 --n_layers 16] [--out bench/results/load_memory.json]
"""

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch

from llama.checkpoint import save_checkpoint
from llama.model import ModelArgs, Transformer

MEASURE = r"""
import json, sys, time
from pathlib import Path
import torch
from llama import LLaMa
from llama.packed import weight_bytes

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

folder, dtype, pack = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
t = time.perf_counter()
for p in sorted(Path(folder).glob("consolidated.*.pth")):
    with open(p, "rb") as f:
        while f.read(1 << 24):
            pass
read_s = time.perf_counter() - t
base = status("VmRSS")
t = time.perf_counter()
llm = LLaMa.build(folder, max_seq_len=8, max_batch_size=1, dtype=dtype, device="cpu", pack=pack)
load_s = time.perf_counter() - t
weights = weight_bytes(llm.model)
peak_load = status("VmHWM") - base
llm.model(torch.tensor([[1]]), 0)  # touches every weight: an mmap'd shard is now resident too
print(json.dumps(dict(read_s=read_s, load_s=load_s, weight_bytes=weights, peak_rss_load_bytes=peak_load,
                      peak_rss_bytes=status("VmHWM") - base)))
"""


def write_tokenizer(path: Path) -> None:
    buf = io.BytesIO()
    text = [f"line {i} of some text for a tokenizer" for i in range(2000)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=200, minloglevel=2)
    path.write_bytes(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--n_layers", type=int, default=16)
    ap.add_argument("--out", default="bench/results/load_memory.json")
    opts = ap.parse_args()
    args = ModelArgs(dim=opts.dim, n_layers=opts.n_layers, n_heads=opts.dim // 64, vocab_size=200)  # layers hold the bytes
    model = Transformer(args).to(torch.bfloat16)
    model.init_weights(torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp) / "tokenizer.model")  # found in the checkpoint's parent folder
        # pack: None is build's default (oneDNN-packed bf16 linears on the CPU), False keeps nn.Linear
        for n_shards, dtype, pack in ((1, "bfloat16", None), (2, "bfloat16", None), (1, "bfloat16", False),
                                      (1, "float32", None)):  # fmt: skip
            folder = Path(tmp) / f"mp{n_shards}"
            if not folder.exists():
                save_checkpoint(model.state_dict(), args, folder, n_shards)
            r = subprocess.run([sys.executable, "-c", MEASURE, str(folder), dtype, json.dumps(pack)], capture_output=True, text=True)
            if r.returncode:
                sys.exit(r.stderr)
            row = dict(shards=n_shards, dtype=dtype, pack=pack, **json.loads(r.stdout.strip().splitlines()[-1]))
            row["file_bytes"] = sum(p.stat().st_size for p in folder.glob("consolidated.*.pth"))
            rows.append(row)
    print(f"{'shards':>6} {'dtype':>9} {'pack':>5} {'weights MB':>10} {'peak RSS MB':>11} {'peak/weights':>12} {'load s':>7} {'read s':>7}")
    for r in rows:
        print(f"{r['shards']:>6} {r['dtype']:>9} {str(r['pack']):>5} {r['weight_bytes'] / 1e6:>10.0f} {r['peak_rss_bytes'] / 1e6:>11.0f} "
              f"{r['peak_rss_bytes'] / r['weight_bytes']:>12.2f} {r['load_s']:>7.2f} {r['read_s']:>7.2f}")  # fmt: skip
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(dict(args=args.to_params(), torch=torch.__version__, rows=rows), indent=2))


if __name__ == "__main__":
    main()
