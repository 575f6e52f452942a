"""Fixtures: tiny Meta checkpoint folders with real shards, and a SentencePiece model trained here.

The shard splitting below is written independently of llama/checkpoint.py, from Meta's layout
(fairscale column-parallel rows, row-parallel columns, replicated norms), so loading is tested
against a second reading of that layout rather than against itself.
"""

import base64
import io
import json
import random
import re
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

WORDS = (
    "the king and queen of a far land spoke to their people about bread wine gold "
    "silver rivers mountains hope fear night day love war peace a an of to in on at"
).split()


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n_lines)]


def train_sentencepiece(path: Path, lines: list[str], vocab_size: int, **options) -> Path:
    """A BPE model trained in-process, by default with Meta's special ids (unk 0, bos 1, eos 2)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        minloglevel=2,
        num_threads=1,
        **options,
    )
    path.write_bytes(buf.getvalue())
    return path


def train_tiktoken(path: Path, lines: list[str], merges: int = 48) -> Path:
    """A byte-level BPE in Llama 3's file format (base64 token, space, rank per line): the 256 bytes,
    then the most frequent adjacent pairs of the corpus' words (with their leading space) merged."""
    from collections import Counter
    from itertools import pairwise

    words = Counter(w.encode() for line in lines for w in re.findall(r" ?\S+|\s+", line))
    ranks = {bytes([b]): b for b in range(256)}
    split = {w: [w[i : i + 1] for i in range(len(w))] for w in words}
    for _ in range(merges):
        pairs = Counter()
        for w, parts in split.items():
            for pair in pairwise(parts):
                pairs[pair] += words[w]
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for parts in split.values():
            i = 0
            while i < len(parts) - 1:
                if (parts[i], parts[i + 1]) == (a, b):
                    parts[i : i + 2] = [a + b]
                i += 1
    path.write_text("".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in ranks.items()))
    return path


@pytest.fixture(scope="session")
def tiktoken_path(tmp_path_factory) -> Path:
    """A Llama 3 style tokenizer.model: 256 bytes + 48 merges, then Meta's 256 special tokens (560 ids)."""
    return train_tiktoken(tmp_path_factory.mktemp("tiktoken") / "tokenizer.model", corpus())


@pytest.fixture(scope="session")
def codellama_tokenizer_path(tmp_path_factory) -> Path:
    """A SentencePiece model laid out as Code Llama 7B/13B's: 32016 pieces, the infilling pieces
    ▁<PRE> ▁<SUF> ▁<MID> ▁<EOT> at 32007-32010 (Meta's ids), "☺" a piece of its own (Meta's
    encode_infilling leans on it), and unused pieces as filler."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = train_sentencepiece(
        tmp_path_factory.mktemp("codellama") / "tokenizer.model", corpus(), 96, user_defined_symbols=["☺"]
    )
    proto = pb.ModelProto.FromString(path.read_bytes())
    kind = pb.ModelProto.SentencePiece
    for piece, n in (("▁<PRE>", 32007), ("▁<SUF>", 32008), ("▁<MID>", 32009), ("▁<EOT>", 32010), (None, 32016)):
        while len(proto.pieces) < n:
            proto.pieces.add(piece=f"<unused{len(proto.pieces)}>", score=0.0, type=kind.UNUSED)
        if piece:
            proto.pieces.add(piece=piece, score=0.0, type=kind.CONTROL)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> Path:
    """A 96-piece BPE model with Meta's special ids (unk 0, bos 1, eos 2, no pad)."""
    return train_sentencepiece(tmp_path_factory.mktemp("tok") / "tokenizer.model", corpus(), 96)


def random_state_dict(params: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 weights under Meta's key names; norms are random too so a mixed-up norm shows."""
    g = torch.Generator().manual_seed(seed)
    dim, n_heads = params["dim"], params["n_heads"]
    kv_heads, head_dim = params.get("n_kv_heads") or n_heads, dim // n_heads
    hidden = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    hidden = params["multiple_of"] * -(-hidden // params["multiple_of"])
    vocab = params["vocab_size"]

    def w(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale or shape[-1] ** -0.5)

    sd = {"tok_embeddings.weight": w(vocab, dim, scale=1.0)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = w(n_heads * head_dim, dim)
        sd[p + "attention.wk.weight"] = w(kv_heads * head_dim, dim)
        sd[p + "attention.wv.weight"] = w(kv_heads * head_dim, dim)
        sd[p + "attention.wo.weight"] = w(dim, n_heads * head_dim)
        sd[p + "feed_forward.w1.weight"] = w(hidden, dim)
        sd[p + "feed_forward.w2.weight"] = w(dim, hidden)
        sd[p + "feed_forward.w3.weight"] = w(hidden, dim)
        sd[p + "attention_norm.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        sd[p + "ffn_norm.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
    sd["norm.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
    sd["output.weight"] = w(vocab, dim)
    return sd


def meta_split(sd: dict[str, torch.Tensor], n: int, vocab_parallel_embedding: bool = False) -> list[dict]:
    """Split like fairscale model parallelism: what Meta's consolidated.NN.pth files hold."""
    rows = ("wq", "wk", "wv", "w1", "w3", "output")
    shards = [{} for _ in range(n)]
    for key, t in sd.items():
        name = key.split(".")[-2]
        if t.dim() == 1:
            pieces = [t] * n
        elif key == "tok_embeddings.weight":
            pieces = t.chunk(n, 0 if vocab_parallel_embedding else 1)
        else:
            pieces = t.chunk(n, 0 if name in rows else 1)
        for shard, piece in zip(shards, pieces):
            shard[key] = piece.clone()
    return shards


def write_checkpoint(
    folder: Path,
    params: dict,
    n_shards: int = 1,
    seed: int = 0,
    rope_freqs: bool = False,
    vocab_parallel_embedding: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Write params.json and n_shards consolidated.NN.pth into folder; return the full weights."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = random_state_dict(params, seed)
    (folder / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(meta_split(sd, n_shards, vocab_parallel_embedding)):
        shard = {k: v.to(dtype) for k, v in shard.items()}
        if rope_freqs:
            shard["rope.freqs"] = torch.randn(params["dim"] // params["n_heads"] // 2)
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    return sd


# Small architectures covering the layout's features.
MHA = dict(dim=64, n_layers=2, n_heads=4, vocab_size=96, multiple_of=32, norm_eps=1e-5)
GQA = dict(MHA, n_kv_heads=2, ffn_dim_multiplier=1.3, multiple_of=48)
THETA = dict(GQA, rope_theta=1e6)
# Llama 3's features at a tiny size: GQA, rope_theta 500000, scaled RoPE, the tiktoken_path vocabulary.
LLAMA3 = dict(GQA, vocab_size=560, rope_theta=500000.0, use_scaled_rope=True)


@pytest.fixture
def make_ckpt(tmp_path, sp_model_path):
    """make_ckpt(params, n_shards=1, tokenizer=None, **kw) -> (folder, full float32 state dict), with the
    SentencePiece model (or the tokenizer.model given) beside it."""

    def make(params: dict = MHA, n_shards: int = 1, name: str = "model", tokenizer: Path | None = None, **kw):
        folder = tmp_path / name
        sd = write_checkpoint(folder, params, n_shards, **kw)
        (folder / "tokenizer.model").write_bytes((tokenizer or sp_model_path).read_bytes())
        return folder, sd

    return make


@pytest.fixture
def llm(make_ckpt):
    """A float32 LLaMa on a 2-shard GQA checkpoint: 4 rows of 48 positions, seed 7."""
    from llama import LLaMa

    folder, _ = make_ckpt(GQA, 2)
    return LLaMa.build(folder, max_seq_len=48, max_batch_size=4, dtype="float32", device="cpu", seed=7)


@pytest.fixture
def llm3(make_ckpt, tiktoken_path):
    """A float32 Llama 3 shaped LLaMa (tiktoken vocabulary, embedding split on the vocabulary)."""
    from llama import LLaMa

    folder, _ = make_ckpt(LLAMA3, 2, tokenizer=tiktoken_path, vocab_parallel_embedding=True)
    return LLaMa.build(folder, max_seq_len=48, max_batch_size=4, dtype="float32", device="cpu", seed=7)


def scripted(llm, rows: list[list[int]]) -> None:
    """Make greedy decoding emit the given ids for each row, step by step (a hand-made model): each
    forward's last-position logits favour row[step]; rows must start generating at the same step."""
    step = [0]

    def hook(module, args, logits):
        logits = torch.full_like(logits, -1e4)  # [B, vocab], or [B, T, vocab] when logprobs are wanted
        last = logits if logits.dim() == 2 else logits[:, -1]
        for b, row in enumerate(rows):
            last[b, row[min(step[0], len(row) - 1)]] = 0
        step[0] += 1
        return logits

    llm.model.output.register_forward_hook(hook)


def tokens(vocab_size: int, b: int, t: int, seed: int = 1) -> torch.Tensor:
    """Seeded random ids [b, t]."""
    return torch.randint(0, vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def needs_shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared/data only exists beside the project's own checkout)")
    return path
