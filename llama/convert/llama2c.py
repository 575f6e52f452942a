"""llama2.c's legacy .bin (version 0) to a Meta folder.

The file is a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means the classifier is stored, not tied to the embedding), then
float32 arrays in run.c's order, each already [out, in] with Meta's interleaved RoPE rows.

    python -m llama.convert.llama2c stories260K.bin OUT_DIR
"""

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from llama.checkpoint import cast, check_out_dir, save_checkpoint
from llama.convert import run_cli
from llama.convert.hf import ffn_params
from llama.model import ModelArgs

HEADER = struct.Struct("<7i")


def read_llama2c(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelArgs, int]:
    """(float32 Meta state dict, params, seq_len the model was trained with)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no llama2.c checkpoint at {path}")
    raw = path.read_bytes()
    if len(raw) < HEADER.size:
        raise ValueError(f"{path} is too short for llama2.c's header ({len(raw)} bytes)")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = HEADER.unpack_from(raw)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or dim % n_heads or n_heads % n_kv_heads:
        raise ValueError(
            f"{path}: header {dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len} is not a "
            "llama2.c version 0 model (a newer export starts with the magic 'ak42')"
        )
    shared, vocab = vocab > 0, abs(vocab)
    head_dim, kv_dim = dim // n_heads, dim // n_heads * n_kv_heads
    shapes = [  # run.c's order; the rope tables (seq_len x head_dim/2, twice) sit before wcls
        ("tok_embeddings", (vocab, dim)),
        ("attention_norm", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("ffn_norm", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("norm", (dim,)),
        ("rope", (2, seq_len, head_dim // 2)),
        ("output", (vocab, dim)),
    ]
    if shared:
        shapes.pop()
    need = HEADER.size + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if len(raw) != need:
        raise ValueError(f"{path} has {len(raw)} bytes but its header describes {need}: truncated or not llama2.c")
    arrays, offset = {}, HEADER.size
    for name, shape in shapes:
        count = int(np.prod(shape))
        arrays[name] = torch.from_numpy(np.frombuffer(raw, np.float32, count, offset).reshape(shape).copy())
        offset += 4 * count
    sd = {
        "tok_embeddings.weight": arrays["tok_embeddings"],
        "norm.weight": arrays["norm"],
        "output.weight": arrays["tok_embeddings" if shared else "output"].clone(),
    }
    for i in range(n_layers):
        for name, key in (
            ("attention_norm", "attention_norm"),
            ("ffn_norm", "ffn_norm"),
            ("wq", "attention.wq"),
            ("wk", "attention.wk"),
            ("wv", "attention.wv"),
            ("wo", "attention.wo"),
            ("w1", "feed_forward.w1"),
            ("w2", "feed_forward.w2"),
            ("w3", "feed_forward.w3"),
        ):
            sd[f"layers.{i}.{key}.weight"] = arrays[name][i]
    args = ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads if n_kv_heads != n_heads else None,
        vocab_size=vocab,
        norm_eps=1e-5,
        **ffn_params(hidden, dim),
    )
    return sd, args, seq_len


def llama2c_to_meta(path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write the Meta folder (params.json keeps the training length as max_seq_len, unused by the model)."""
    check_out_dir(out_dir)  # before the file is read
    sd, args, seq_len = read_llama2c(path)
    args.extra["max_seq_len"] = seq_len
    return save_checkpoint(cast(sd, dtype), args, out_dir)


def main(path: str, out_dir: str, dtype: str = "float32") -> None:
    out = llama2c_to_meta(path, out_dir, dtype)
    print(f"wrote {out}: {json.dumps(json.loads((out / 'params.json').read_text()))}")


if __name__ == "__main__":
    run_cli(main)
