"""Train the built-in model: a BPE tokenizer and a small LLaMA (GQA, Meta's FFN rounding) on
tinyshakespeare, written as a Meta folder: params.json, two bf16 shards, tokenizer.model and a
checklist.chk covering all of them. Seeded: the same flags give the same folder.

    python scripts/train_shakespeare.py                      # 10-12 minutes on 2 CPU cores
    python scripts/train_shakespeare.py --steps 50 --out_dir /tmp/shakespeare
"""

import logging
import time
from pathlib import Path

import fire
import torch

from llama.checkpoint import save_checkpoint, write_checklist
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer
from llama.training import TrainConfig, train, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
DEFAULT_OUT = REPO / "llama" / "models" / "shakespeare"


def encode_exactly(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """The ids of `text` (newlines and runs of spaces included), checked to decode back to it."""
    ids = tokenizer.encode(text, bos=False, eos=False)
    if tokenizer.decode(ids) != text:
        raise RuntimeError("the tokenizer does not round-trip the corpus: check train_tokenizer's options")
    return torch.tensor(ids, dtype=torch.long)


def main(
    data: str = str(DEFAULT_DATA),
    out_dir: str = str(DEFAULT_OUT),
    vocab_size: int = 2048,
    dim: int = 320,
    n_layers: int = 6,
    n_heads: int = 10,
    n_kv_heads: int = 2,
    multiple_of: int = 64,  # int(2 * 4 * 320 / 3) = 853 rounds up to 896
    steps: int = 500,
    batch_size: int = 16,
    seq_len: int = 256,
    lr: float = 1e-3,
    eval_every: int = 100,
    bf16: bool = True,
    seed: int = 0,
) -> None:
    """Train on the first 90% of `data`, validate on the rest, write the folder to `out_dir`."""
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"no corpus at {path}: pass --data the path of tinyshakespeare.txt")
    text = path.read_text(encoding="utf-8")
    split = int(0.9 * len(text))
    tokenizer_proto = train_tokenizer(text[:split], vocab_size)
    tokenizer = Tokenizer("tokenizer.model", contents=tokenizer_proto)
    train_ids, val_ids = encode_exactly(tokenizer, text[:split]), encode_exactly(tokenizer, text[split:])
    print(f"{len(text):,} characters: {len(train_ids):,} train and {len(val_ids):,} validation tokens")

    args = ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=tokenizer.n_words,
        multiple_of=multiple_of,
    )
    model = Transformer(args)
    model.init_weights(torch.Generator().manual_seed(seed))
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, FFN hidden size {args.ffn_hidden_dim}")
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        min_lr=lr / 10,
        warmup=min(100, steps // 10),
        eval_every=eval_every,
        bos_id=tokenizer.bos_id,
        bf16=bf16,
        seed=seed,
    )
    start = time.perf_counter()
    history = train(model, train_ids, val_ids, config)
    final = history[-1]
    print(
        f"trained {steps} steps in {time.perf_counter() - start:.0f}s: "
        f"train loss {final['train_loss']:.4f}, validation loss {final['val_loss']:.4f}"
    )

    state_dict = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    out = save_checkpoint(state_dict, args, out_dir, n_shards=2, overwrite=True)  # retrains the built-in folder
    (out / "tokenizer.model").write_bytes(tokenizer_proto)
    names = write_checklist(out)
    print(f"wrote {out}: {', '.join(names)}, checklist.chk")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the training loop logs its evaluations
    fire.Fire(main)
