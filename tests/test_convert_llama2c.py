"""llama2.c's stories260K.bin: the converted Meta folder computes what run.c computes.

The reference below is run.c's forward pass written over the raw .bin arrays in numpy (one
position at a time, its own RoPE on pairs and its own GQA indexing), independent of llama/.
"""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_shared

from llama.checkpoint import MetaCheckpoint
from llama.convert.llama2c import llama2c_to_meta, read_llama2c
from llama.model import Transformer


def run_c_forward(path, tokens: list[int]) -> np.ndarray:
    raw = Path(path).read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", raw)
    hs, kv_dim, shared, vocab = dim // n_heads, dim // n_heads * n_kv, vocab > 0, abs(vocab)
    data, off = np.frombuffer(raw, np.float32, offset=28), 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        off += n
        return data[off - n : off].reshape(shape)

    emb, rms_att = take(vocab, dim), take(n_layers, dim)
    wq, wk, wv, wo = (
        take(n_layers, dim, dim),
        take(n_layers, kv_dim, dim),
        take(n_layers, kv_dim, dim),
        take(n_layers, dim, dim),
    )
    rms_ffn, w1, w2, w3 = (
        take(n_layers, dim),
        take(n_layers, hidden, dim),
        take(n_layers, dim, hidden),
        take(n_layers, hidden, dim),
    )
    rms_final = take(dim)
    take(seq_len, hs // 2), take(seq_len, hs // 2)
    wcls = emb if shared else take(vocab, dim)

    def rmsnorm(x, w):
        return w * (x / np.sqrt(np.mean(x * x) + 1e-5))

    kc, vc, out = np.zeros((n_layers, len(tokens), kv_dim)), np.zeros((n_layers, len(tokens), kv_dim)), []
    for pos, tok in enumerate(tokens):
        x = emb[tok].astype(np.float64)
        for layer in range(n_layers):
            xb = rmsnorm(x, rms_att[layer])
            q, k, v = wq[layer] @ xb, wk[layer] @ xb, wv[layer] @ xb
            for i in range(0, dim, 2):
                val = pos / 10000.0 ** ((i % hs) / hs)
                c, s = np.cos(val), np.sin(val)
                for vec in (q, k) if i < kv_dim else (q,):
                    vec[i], vec[i + 1] = vec[i] * c - vec[i + 1] * s, vec[i] * s + vec[i + 1] * c
            kc[layer, pos], vc[layer, pos] = k, v
            att_out = np.zeros(dim)
            for h in range(n_heads):
                kvh = h // (n_heads // n_kv)
                keys, values = (
                    kc[layer, : pos + 1, kvh * hs : (kvh + 1) * hs],
                    vc[layer, : pos + 1, kvh * hs : (kvh + 1) * hs],
                )
                scores = keys @ q[h * hs : (h + 1) * hs] / np.sqrt(hs)
                att = np.exp(scores - scores.max())
                att_out[h * hs : (h + 1) * hs] = (att / att.sum()) @ values
            x = x + wo[layer] @ att_out
            xb = rmsnorm(x, rms_ffn[layer])
            h1 = w1[layer] @ xb
            x = x + w2[layer] @ ((h1 / (1 + np.exp(-h1))) * (w3[layer] @ xb))
        out.append(wcls @ rmsnorm(x, rms_final))
    return np.stack(out)


def load(folder) -> Transformer:
    ckpt = MetaCheckpoint(folder)
    model = Transformer(ckpt.args)
    ckpt.load_into(model)
    return model.requires_grad_(False).eval()


def test_stories260k_params_and_logits_equal_run_c(tmp_path):
    path = needs_shared("stories260K.bin")
    folder = llama2c_to_meta(path, tmp_path / "stories")
    params = json.loads((folder / "params.json").read_text())
    assert {k: params[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")} == dict(
        dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512
    )
    model = load(folder)
    assert model.params.ffn_hidden_dim == 172 and model.params.extra == {"max_seq_len": 512}
    assert torch.equal(model.output.weight, model.tok_embeddings.weight)  # the classifier was tied
    tokens = [1, 5, 100, 42, 7, 300, 9, 11, 256, 3]
    ours = model(torch.tensor([tokens]), 0)[0].numpy()
    np.testing.assert_allclose(ours, run_c_forward(path, tokens), atol=1e-4, rtol=0)


def test_stories260k_greedy_ids_match_run_c(tmp_path):
    path = needs_shared("stories260K.bin")
    model = load(llama2c_to_meta(path, tmp_path / "stories"))
    model.setup_cache(1, 64)
    ids, pos = [1], 0
    for _ in range(24):
        logits = model(torch.tensor([ids[pos:]]), pos)
        pos = len(ids)
        ids.append(int(logits[0, -1].argmax()))
    reference = [1]
    for _ in range(24):
        reference.append(int(run_c_forward(path, reference)[-1].argmax()))
    assert ids == reference and len(set(ids)) > 5


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no llama2.c checkpoint"):
        read_llama2c(tmp_path / "missing.bin")
    (tmp_path / "short.bin").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="too short"):
        read_llama2c(tmp_path / "short.bin")
    (tmp_path / "v1.bin").write_bytes(b"ak42" + bytes(60))
    with pytest.raises(ValueError, match="not a llama2.c version 0 model"):
        read_llama2c(tmp_path / "v1.bin")
    path = needs_shared("stories260K.bin")
    (tmp_path / "cut.bin").write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or not llama2.c"):
        read_llama2c(tmp_path / "cut.bin")


def test_a_width_that_is_no_multiple_of_64_converts(tmp_path):
    """stories15M's dim 288 (6 heads of 48): the FFN sizing was once worked out with 32 heads, which 288 refused."""
    from llama.checkpoint import MetaCheckpoint
    from llama.convert.llama2c import HEADER, llama2c_to_meta

    dim, hidden, n_layers, n_heads, vocab, seq_len = 96, 256, 1, 6, 40, 8
    floats = (
        vocab * dim + n_layers * (2 * dim + 4 * dim * dim + 3 * hidden * dim) + dim + 2 * seq_len * dim // n_heads // 2
    )
    path = tmp_path / "s.bin"
    path.write_bytes(HEADER.pack(dim, hidden, n_layers, n_heads, n_heads, vocab, seq_len) + bytes(4 * floats))
    args = MetaCheckpoint(llama2c_to_meta(path, tmp_path / "out")).args
    assert (args.dim, args.n_heads, args.ffn_hidden_dim, args.vocab_size) == (96, 6, 256, 40)
