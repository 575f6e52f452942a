"""The facade: `LLaMa.build` composes checkpoint, tokenizer, model and KV cache; `generate` is
Meta's llama/generation.py schedule (right-padded batch, decoding from the shortest prompt,
forced prompt tokens, per-row EOS). Token tensors are [B, total_len]; pad is the tokenizer's.
"""

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from llama.checkpoint import MetaCheckpoint, read_params
from llama.model import ModelArgs, Transformer
from llama.runtime import check_fits, resolve_device, resolve_dtype
from llama.sampling import check_sampling, next_token
from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).resolve().parent.parent / "params"
BUILTIN_MODEL = Path(__file__).resolve().parent / "models" / "shakespeare"


class Completions(tuple):
    """`tokens, texts = llm.text_completion(...)`; `.logprobs` holds the per-token logprobs."""

    def __new__(cls, tokens: list[list[int]], texts: list[str], logprobs: list[list[float]] | None = None):
        self = super().__new__(cls, (tokens, texts))
        self.logprobs = logprobs
        return self

    tokens = property(lambda self: self[0])
    texts = property(lambda self: self[1])


def find_tokenizer(ckpt_dir: Path) -> Path | None:
    """Meta's downloads put tokenizer.model in the model folder or in its parent."""
    for candidate in (ckpt_dir / "tokenizer.model", ckpt_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def preset_args(name: str) -> ModelArgs:
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
        raise FileNotFoundError(f"{name!r} is neither a checkpoint folder nor a preset; presets: {', '.join(known)}")
    return ModelArgs.from_params(json.loads(path.read_text()))


class LLaMa:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, seed: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.output.weight.device
        # Meta seeds the global RNG once in build; an owned generator draws the same sequence.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    @staticmethod
    def build(
        checkpoints_dir: str | os.PathLike | None = None,
        tokenizer_path: str | os.PathLike | None = None,
        load_model: bool = True,
        max_seq_len: int = 2048,
        max_batch_size: int = 4,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 1,
    ) -> "LLaMa":
        """Load a Meta checkpoint folder (any number of shards; the built-in Shakespeare model when
        omitted) onto one device, with its tokenizer. load_model=False builds the architecture with
        random weights, from a folder's params.json or a preset name in params/ ("llama-2-7b").
        """
        if max_seq_len < 1 or max_batch_size < 1:
            raise ValueError(f"max_seq_len={max_seq_len} and max_batch_size={max_batch_size} must be at least 1")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        checkpoints_dir = BUILTIN_MODEL if checkpoints_dir is None else checkpoints_dir
        path = Path(checkpoints_dir)
        checkpoint = None
        if load_model:
            checkpoint = MetaCheckpoint(path)
            args = checkpoint.args
        else:
            args = read_params(path) if path.is_dir() else preset_args(str(checkpoints_dir))

        tokenizer = None
        if tokenizer_path is None and path.is_dir():
            tokenizer_path = find_tokenizer(path)
            if tokenizer_path is None and load_model:
                raise FileNotFoundError(
                    f"no tokenizer.model in {path} or {path.parent}: pass tokenizer_path= the tokenizer.model file"
                )
        if tokenizer_path is not None:
            tokenizer = Tokenizer(tokenizer_path)
            if args.vocab_size == -1:
                args.vocab_size = tokenizer.n_words
            elif args.vocab_size != tokenizer.n_words:
                raise ValueError(
                    f"params.json says vocab_size={args.vocab_size} but {tokenizer_path} has {tokenizer.n_words} "
                    "words: pass the tokenizer.model that belongs to this model"
                )
        elif args.vocab_size == -1:
            raise ValueError(f"{checkpoints_dir} has vocab_size -1, which is taken from the tokenizer: pass tokenizer_path=")
        if checkpoint is not None and checkpoint.vocab_size != args.vocab_size:
            raise ValueError(
                f"the embedding in {path} has {checkpoint.vocab_size} rows but the tokenizer {tokenizer_path} has "
                f"{args.vocab_size} words: pass the tokenizer.model that belongs to this model"
            )

        with torch.device("meta"):
            model = Transformer(args)
        weight_bytes = sum(p.numel() for p in model.parameters()) * dtype.itemsize
        cache_bytes = 2 * args.n_layers * max_batch_size * max_seq_len * args.kv_heads * args.head_dim * dtype.itemsize
        check_fits(weight_bytes, cache_bytes, device, f"max_batch_size={max_batch_size} x max_seq_len={max_seq_len}")

        model = model.to(dtype=dtype).to_empty(device=device)
        if checkpoint is not None:
            checkpoint.load_into(model)
        else:
            model.init_weights(torch.Generator(device=device).manual_seed(seed))
        model.requires_grad_(False).eval()
        model.setup_cache(max_batch_size, max_seq_len)
        logger.info("built %s on %s in %s: %d params", checkpoints_dir, device, dtype, weight_bytes // dtype.itemsize)
        return LLaMa(model, tokenizer, seed)

    def _check_prompts(self, prompt_tokens: list[list[int]]) -> None:
        if not prompt_tokens:
            raise ValueError("no prompts: pass at least one")
        if len(prompt_tokens) > self.model.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts but max_batch_size={self.model.max_batch_size}: pass fewer prompts "
                "at a time or build with a larger max_batch_size"
            )
        for i, t in enumerate(prompt_tokens):
            if len(t) == 0:
                raise ValueError(f"prompt {i} has no tokens")
            if len(t) > self.model.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(t)} tokens, {len(t) - self.model.max_seq_len} more than "
                    f"max_seq_len={self.model.max_seq_len}: shorten it or build with a larger max_seq_len"
                )

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Complete each prompt with at most max_gen_len tokens, stopping a row at its first EOS.

        Logprob i scores token i given the tokens before it (0.0 for a row's first token).
        """
        self._check_prompts(prompt_tokens)
        check_sampling(temperature, top_p)
        if max_gen_len < 1:
            raise ValueError(f"max_gen_len={max_gen_len}: ask for at least 1 new token")
        bsz = len(prompt_tokens)
        min_prompt_len = min(len(t) for t in prompt_tokens)
        max_prompt_len = max(len(t) for t in prompt_tokens)
        total_len = min(self.model.max_seq_len, max_gen_len + max_prompt_len)
        pad_id, eos_id = self.tokenizer.pad_id, self.tokenizer.eos_id

        tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=self.device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=self.device)
        token_logprobs = torch.zeros_like(tokens, dtype=torch.float) if logprobs else None
        prev_pos = 0
        eos_reached = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        input_text_mask = tokens != pad_id
        if min_prompt_len == total_len:
            # Nothing to generate: score the prompts. Logits at i predict token i + 1 (Meta's
            # code compares them with token i, one position off).
            logits = self.model(tokens, prev_pos)
            if logprobs:
                token_logprobs[:, 1:] = -F.cross_entropy(
                    logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none", ignore_index=pad_id
                )

        for cur_pos in range(min_prompt_len, total_len):
            logits = self.model(tokens[:, prev_pos:cur_pos], prev_pos)
            token = next_token(logits[:, -1], temperature, top_p, self.generator)
            # Rows still inside their prompt take the prompt's token, not the sample.
            token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], token)
            tokens[:, cur_pos] = token
            if logprobs:
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), tokens[:, prev_pos + 1 : cur_pos + 1], reduction="none", ignore_index=pad_id
                )
            eos_reached |= (~input_text_mask[:, cur_pos]) & (token == eos_id)
            prev_pos = cur_pos
            if all(eos_reached):
                break

        token_logprobs = token_logprobs.tolist() if logprobs else None
        out_tokens, out_logprobs = [], []
        for i, toks in enumerate(tokens.tolist()):
            start = 0 if echo else len(prompt_tokens[i])
            end = len(prompt_tokens[i]) + max_gen_len
            toks = toks[start:end]
            probs = token_logprobs[i][start:end] if logprobs else None
            if eos_id in toks:
                toks = toks[: toks.index(eos_id)]
                probs = probs[: len(toks)] if logprobs else None
            out_tokens.append(toks)
            out_logprobs.append(probs)
        return out_tokens, (out_logprobs if logprobs else None)

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Completions:
        """Complete each prompt (BOS + text); returns (generated ids, texts), plus .logprobs."""
        if isinstance(prompts, str):
            raise TypeError("prompts is a list of strings: wrap a single prompt as [prompt]")
        if max_gen_len is None:
            max_gen_len = self.model.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        tokens, probs = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        return Completions(tokens, [self.tokenizer.decode(t) for t in tokens], probs)
