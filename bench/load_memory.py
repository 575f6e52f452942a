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
from report import load_table  # bench/report.py, beside this script

from llama.checkpoint import save_checkpoint
from llama.model import ModelArgs, Transformer

MEASURE = r"""
import json, sys, time
from pathlib import Path
import torch
from llama import LLaMa
from llama.cpu import weight_bytes

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

folder, dtype, pack, quantize = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:5])
t = time.perf_counter()
for p in sorted(Path(folder).glob("consolidated.*.pth")):
    with open(p, "rb") as f:
        while f.read(1 << 24):
            pass
read_s = time.perf_counter() - t
base = status("VmRSS")
t = time.perf_counter()
llm = LLaMa.build(folder, max_seq_len=8, max_batch_size=1, dtype=dtype, device="cpu", pack=pack,
                   quantize=quantize)
load_s = time.perf_counter() - t
weights = weight_bytes(llm.model)
peak_load = status("VmHWM") - base
llm.model(torch.tensor([[1]]), 0)  # touches every weight: an mmap'd shard is now resident too
peak = status("VmHWM") - base
del llm
t = time.perf_counter()  # again, without the process's one-time setup (imports, torch's first allocations)
LLaMa.build(folder, max_seq_len=8, max_batch_size=1, dtype=dtype, device="cpu", pack=pack, quantize=quantize)
print(json.dumps(dict(read_s=read_s, load_s=load_s, load_again_s=time.perf_counter() - t, weight_bytes=weights,
                      peak_rss_load_bytes=peak_load, peak_rss_bytes=peak)))
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
    args = ModelArgs(
        dim=opts.dim, n_layers=opts.n_layers, n_heads=opts.dim // 64, vocab_size=200
    )  # layers hold the bytes
    model = Transformer(args).to(torch.bfloat16)
    model.init_weights(torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp) / "tokenizer.model")  # found in the checkpoint's parent folder
        # pack=True: oneDNN-packed copies of the linears (llama.cpu); quantize: quantized while loading,
        # its peak set against its own (int8 / int4) weight bytes.
        for n_shards, dtype, pack, quantize in (
            (1, "bfloat16", False, None),
            (2, "bfloat16", False, None),
            (1, "bfloat16", True, None),
            (1, "float32", False, None),
            (1, "bfloat16", False, "int8"),
            (1, "bfloat16", False, "int4"),
        ):
            folder = Path(tmp) / f"mp{n_shards}"
            if not folder.exists():
                save_checkpoint(model.state_dict(), args, folder, n_shards)
            cmd = [sys.executable, "-c", MEASURE, str(folder), dtype, json.dumps(pack), json.dumps(quantize)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(r.stderr)
            row = dict(shards=n_shards, dtype=dtype, pack=pack, quantize=quantize)
            row.update(json.loads(r.stdout.strip().splitlines()[-1]))
            row["file_bytes"] = sum(p.stat().st_size for p in folder.glob("consolidated.*.pth"))
            rows.append(row)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    result = dict(args=args.to_params(), torch=torch.__version__, rows=rows)
    Path(opts.out).write_text(json.dumps(result, indent=2))
    print(load_table(result))


if __name__ == "__main__":
    main()
