"""Training a small LLaMA from outside the model: next-token cross-entropy on random windows of a
1-D token tensor, AdamW with warmup and cosine decay, and the SentencePiece tokenizer to go with it.
Batches are [B, T]. Meta released no training code; this follows nanoGPT's loop. Everything
random draws from an owned torch.Generator, so a seed fixes the run.
"""

import io
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import sentencepiece as spm
import torch
import torch.nn.functional as F

from llama.model import Transformer, is_int

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything about a run that is not the architecture (that is ModelArgs, i.e. params.json)."""

    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-4  # where the cosine ends
    warmup: int = 100
    weight_decay: float = 0.1  # matrices only; norms are not decayed
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    bos_id: int | None = None  # start every window with it, as text_completion starts every prompt
    bf16: bool = False  # autocast matmuls to bfloat16; the weights and AdamW stay float32
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r}: use a whole number, at least 1")


def train_tokenizer(text: str, vocab_size: int) -> bytes:
    """A BPE tokenizer.model (its bytes) with Meta's ids (unk 0, bos 1, eos 2, no pad) whose decode(encode(s))
    is s for any s: identity normalization, spaces and newlines kept, unseen bytes as byte pieces."""
    buf = io.BytesIO()
    lines = text.splitlines(keepends=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            # SentencePiece leaves out, silently, lines longer than its default of 4192 bytes
            max_sentence_length=max([4192, *(len(line.encode()) for line in lines)]),
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            # No leading "▁" on the first word: "ROMEO:" is then the same pieces as a line of the text.
            add_dummy_prefix=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. fewer pieces than the text's characters and the 256 bytes need
        raise ValueError(f"SentencePiece cannot train vocab_size={vocab_size} on this text: {e}") from None
    return buf.getvalue()


def get_batch(
    tokens: torch.Tensor, config: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets [B, T] from random windows of `tokens` (BOS-first if bos_id)."""
    n_text = config.seq_len - (config.bos_id is not None)
    if len(tokens) < n_text + 1:
        raise ValueError(f"{len(tokens)} tokens are too few for seq_len={config.seq_len}: lower seq_len")
    starts = torch.randint(len(tokens) - n_text, (config.batch_size,), generator=generator).tolist()
    windows = torch.stack([tokens[s : s + n_text + 1] for s in starts])  # [B, n_text + 1]
    if config.bos_id is not None:
        windows = torch.cat([torch.full((config.batch_size, 1), config.bos_id, dtype=windows.dtype), windows], 1)
    return windows[:, :-1], windows[:, 1:]


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to lr over `warmup` steps, then a cosine down to min_lr at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - 1 - config.warmup)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def loss_on(model: Transformer, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        logits = model(x)  # float32 [B, T, vocab] either way
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model: Transformer, tokens: torch.Tensor, config: TrainConfig) -> float:
    """Mean loss over eval_batches windows; the same windows every time, so evaluations compare."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    was_training = model.training
    model.eval()
    batches = [get_batch(tokens, config, generator) for _ in range(config.eval_batches)]
    losses = [loss_on(model, x, y, config.bf16).item() for x, y in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def train(model: Transformer, train_tokens: torch.Tensor, val_tokens: torch.Tensor, config: TrainConfig) -> list[dict]:
    """Train `model` (float32 weights, no KV cache) in place on the CPU; returns the evaluations at step 0,
    every eval_every steps and at the end: [{"step", "lr", "train_loss", "val_loss", "seconds"}]."""
    if model.freqs_cis is not None:
        raise ValueError(
            "the model has a KV cache (LLaMa.build's, for generating, with frozen weights): train one without, "
            "from llama.loading.load_meta_folder or Transformer(args)"
        )
    if model.params.vocab_size <= int(max(train_tokens.max(), val_tokens.max())):
        raise ValueError(f"token ids reach past vocab_size={model.params.vocab_size}: size the model by the tokenizer")
    generator = torch.Generator().manual_seed(config.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))
    history: list[dict] = []
    start = time.perf_counter()

    def record(step: int) -> None:
        train_loss, val_loss = evaluate(model, train_tokens, config), evaluate(model, val_tokens, config)
        lr, seconds = lr_at(min(step, config.steps - 1), config), time.perf_counter() - start
        history.append(dict(step=step, lr=lr, train_loss=train_loss, val_loss=val_loss, seconds=seconds))
        logger.info("step %d: train loss %.4f, val loss %.4f, lr %.2e, %.0fs", step, train_loss, val_loss, lr, seconds)

    model.train()
    for step in range(config.steps):
        if step % config.eval_every == 0:
            record(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss = loss_on(model, *get_batch(train_tokens, config, generator), config.bf16)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
    record(config.steps)
    model.eval()
    return history
