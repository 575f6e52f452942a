"""The facade: `LLaMa.build` composes checkpoint, tokenizer, model and KV cache; `generate` is
Meta's llama/generation.py schedule (right-padded batch, decoding from the shortest prompt,
forced prompt tokens, per-row EOS). Token tensors are [B, total_len]; pad is the tokenizer's.
"""

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from llama import cpu
from llama.chat import UNSAFE_ERROR, Dialog, check_dialog, encode_dialog, has_special_tags
from llama.checkpoint import MetaCheckpoint, find_tokenizer, read_params
from llama.decoding import Decoded, StreamEvent, decode
from llama.model import ModelArgs, Transformer
from llama.quantize import SCHEMES, load_quantized, make_quantized, read_scheme
from llama.runtime import check_fits, resolve_device, resolve_dtype
from llama.sampling import Sampler
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


def preset_args(name: str) -> ModelArgs:
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
        raise FileNotFoundError(f"{name!r} is neither a checkpoint folder nor a preset; presets: {', '.join(known)}")
    return ModelArgs.from_params(json.loads(path.read_text()))


def _open_weights(path: Path, load_model: bool, dtype: torch.dtype, quantize: str | None):
    """(params, (kind, source), tokenizer bytes or None), kind being "meta" (a MetaCheckpoint),
    "quantized" (a save_quantized folder's scheme), "gguf" (the file's state dict) or "random"."""
    if not load_model:
        return (read_params(path) if path.is_dir() else preset_args(str(path))), ("random", None), None
    if path.suffix == ".gguf" and path.is_file():
        from llama.convert.gguf import read_gguf

        state_dict, args, proto = read_gguf(path, dtype)
        return args, ("gguf", state_dict), proto
    scheme = read_scheme(path) if path.is_dir() else None
    if scheme is not None:
        if quantize is not None:
            raise ValueError(f"{path} is already quantized ({scheme['scheme']}): leave out quantize=")
        return read_params(path), ("quantized", scheme), None
    checkpoint = MetaCheckpoint(path)
    return checkpoint.args, ("meta", checkpoint), None


def _load_tokenizer(path: Path, tokenizer_path, proto: bytes | None, args: ModelArgs, required: bool) -> Tokenizer | None:
    """The tokenizer (given, in a GGUF file, or beside the folder), with vocab_size -1 resolved from it."""
    if tokenizer_path is None and proto is None and path.is_dir():
        tokenizer_path = find_tokenizer(path)
        if tokenizer_path is None and required:
            raise FileNotFoundError(
                f"no tokenizer.model in {path} or {path.parent}: pass tokenizer_path= the tokenizer.model file"
            )
    if tokenizer_path is None and proto is None:
        if args.vocab_size == -1:
            raise ValueError(f"{path} has vocab_size -1, which is taken from the tokenizer: pass tokenizer_path=")
        return None
    tokenizer = Tokenizer(tokenizer_path or path, model_proto=None if tokenizer_path else proto)
    if args.vocab_size == -1:
        args.vocab_size = tokenizer.n_words
    elif args.vocab_size != tokenizer.n_words:
        raise ValueError(
            f"params.json says vocab_size={args.vocab_size} but {tokenizer_path or path} has {tokenizer.n_words} "
            "words: pass the tokenizer.model that belongs to this model"
        )
    return tokenizer


class LLaMa:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, seed: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.tok_embeddings.weight.device
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
        quantize: str | None = None,
        pack: bool = False,
    ) -> "LLaMa":
        """Load a Meta checkpoint folder (any number of shards; the built-in Shakespeare model when
        omitted) onto one device, with its tokenizer. load_model=False builds the architecture with
        random weights, from a folder's params.json or a preset name in params/ ("llama-2-7b").
        quantize="int8" | "int4" quantizes the linear layers after loading (see llama.quantize);
        a folder written by llama.quantize.save_quantized loads already quantized. On the CPU in
        bf16, decode steps run in kernels compiled here once per machine where the CPU has AVX-512
        BF16 (see llama.cpu); pack=True keeps the weights in oneDNN's layout instead, faster for
        batches of 8 or more and prompts, slower at batch 1.
        """
        if max_seq_len < 1 or max_batch_size < 1:
            raise ValueError(f"max_seq_len={max_seq_len} and max_batch_size={max_batch_size} must be at least 1")
        if quantize is not None and quantize not in SCHEMES:
            raise ValueError(f"quantize={quantize!r}: use one of {', '.join(SCHEMES)}, or None")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if pack and not (device.type == "cpu" and dtype == torch.bfloat16 and cpu.onednn_bf16()):
            raise ValueError(f"pack=True needs bfloat16 on a CPU with oneDNN bf16 kernels, not {dtype} on {device}")
        path = Path(BUILTIN_MODEL if checkpoints_dir is None else checkpoints_dir)
        args, (kind, source), proto = _open_weights(path, load_model, dtype, quantize)
        tokenizer = _load_tokenizer(path, tokenizer_path, proto, args, required=load_model)
        if kind == "meta" and source.vocab_size != args.vocab_size:
            raise ValueError(
                f"the embedding in {path} has {source.vocab_size} rows but the tokenizer {tokenizer.path} has "
                f"{args.vocab_size} "
                "words: pass the tokenizer.model that belongs to this model"
            )

        with torch.device("meta"):
            model = Transformer(args)
            if kind == "quantized":
                make_quantized(model.to(dtype), source["scheme"], source["group_size"] or 32, quantize=False)
            # Quantizing a mapped shard keeps one float matrix resident at a time; otherwise the
            # float model is whole in memory first.
            final = model
            if quantize is not None and kind == "meta" and source.maps_in_place(dtype, device):
                final = make_quantized(Transformer(args).to(dtype), quantize, quantize=False)
        # what the weights will hold (parameters and buffers: quantized layers' state_dict() converts)
        weight_bytes = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.itemsize)
                           for t in (*final.parameters(), *final.buffers()))  # fmt: skip
        cache_bytes = 2 * args.n_layers * max_batch_size * max_seq_len * args.kv_heads * args.head_dim * dtype.itemsize
        check_fits(weight_bytes, cache_bytes, device, f"max_batch_size={max_batch_size} x max_seq_len={max_seq_len}")

        model = model.to(dtype=dtype).to_empty(device=device)
        if kind == "meta":
            source.load_into(model)
        elif kind == "quantized":
            load_quantized(model, path, source)
        elif kind == "gguf":  # the file's weights, already in dtype
            model.load_state_dict(source, strict=True)
        else:
            model.init_weights(torch.Generator(device=device).manual_seed(seed))
        if quantize is not None:
            make_quantized(model, quantize)
        if device.type == "cpu" and dtype == torch.bfloat16:  # pack=True anywhere else was refused above
            cpu.use_kernels(model, pack)
        model.requires_grad_(False).eval()
        model.setup_cache(max_batch_size, max_seq_len)
        logger.info("built %s on %s in %s: %.1f MB of weights", path, device, dtype, weight_bytes / 1e6)
        return LLaMa(model, tokenizer, seed)

    def _check_prompts(self, prompt_tokens: list[list[int]], max_gen_len: int) -> None:
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
        if max_gen_len < 1:
            raise ValueError(f"max_gen_len={max_gen_len}: ask for at least 1 new token")

    def _decode(self, prompt_tokens, max_gen_len, sampling: dict, logprobs=False, want_text=False, stop=None):
        """Validate everything up front, then return the decoding generator (see decoding.decode)."""
        self._check_prompts(prompt_tokens, max_gen_len)
        sampler = Sampler(**sampling)
        if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop)):
            raise ValueError(f"stop={stop!r}: pass a list of non-empty strings")
        return decode(self.model, self.tokenizer, prompt_tokens, max_gen_len, sampler, self.generator,
                      logprobs, want_text, list(stop or []))  # fmt: skip

    @torch.inference_mode()
    def _complete(self, prompt_tokens, max_gen_len, sampling, logprobs, echo, stop) -> Completions:
        """Run to the end; cut each row as Meta does (prompt unless echo, first EOS)."""
        steps = self._decode(prompt_tokens, max_gen_len, sampling, logprobs, stop=stop)
        while True:
            try:
                next(steps)
            except StopIteration as finished:
                result: Decoded = finished.value
                break
        eos_id = self.tokenizer.eos_id
        out_tokens, out_logprobs, texts = [], [], []
        for i, toks in enumerate(result.tokens):
            start = 0 if echo else len(prompt_tokens[i])
            toks, probs = toks[start:], result.logprobs[i][start:] if logprobs else None
            if eos_id in toks:
                toks = toks[: toks.index(eos_id)]
                probs = probs[: len(toks)] if logprobs else None
            out_tokens.append(toks)
            out_logprobs.append(probs)
            if result.texts is None:
                texts.append(self.tokenizer.decode(toks))
            elif echo:
                texts.append(self.tokenizer.decode(prompt_tokens[i]) + result.texts[i])
            else:
                texts.append(result.texts[i])
        return Completions(out_tokens, texts, out_logprobs if logprobs else None)

    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: int | None = None,
        repetition_penalty: float = 1.0,
        stop: list[str] | None = None,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Meta's generate: complete each prompt with at most max_gen_len ids, cut at the first EOS.

        Logprob i scores token i given the tokens before it (0.0 for a row's first token).
        top_k, repetition_penalty and stop strings are off by default, leaving Meta's draws.
        """
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)
        done = self._complete(prompt_tokens, max_gen_len, sampling, logprobs, echo, stop)
        return done.tokens, done.logprobs

    def _encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        if isinstance(prompts, str):
            raise TypeError("prompts is a list of strings: wrap a single prompt as [prompt]")
        return [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: int | None = None,
        repetition_penalty: float = 1.0,
        stop: list[str] | None = None,
    ) -> Completions:
        """Complete each prompt (BOS + text); returns (generated ids, texts), plus .logprobs.

        max_gen_len=None allows up to max_seq_len - 1 new tokens, as in Meta's code.
        """
        prompt_tokens = self._encode_prompts(prompts)
        max_gen_len = self.model.max_seq_len - 1 if max_gen_len is None else max_gen_len
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)
        return self._complete(prompt_tokens, max_gen_len, sampling, logprobs, echo, stop)

    def stream(
        self,
        prompts: list[str] | list[list[int]],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        *,
        top_k: int | None = None,
        repetition_penalty: float = 1.0,
        stop: list[str] | None = None,
    ) -> Iterator[StreamEvent]:
        """Yield StreamEvent(index, text, done) as each row's text is completed; the texts of a
        row concatenate to text_completion's text for it. Prompts are strings or token id lists."""
        is_ids = bool(prompts) and not isinstance(prompts, str) and all(isinstance(p, list) for p in prompts)
        prompt_tokens = prompts if is_ids else self._encode_prompts(prompts)
        max_gen_len = self.model.max_seq_len - 1 if max_gen_len is None else max_gen_len
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)
        steps = self._decode(prompt_tokens, max_gen_len, sampling, want_text=True, stop=stop)

        def events() -> Iterator[StreamEvent]:
            with torch.inference_mode():
                for step in steps:
                    yield from step

        return events()

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        *,
        top_k: int | None = None,
        repetition_penalty: float = 1.0,
        stop: list[str] | None = None,
    ) -> list[dict]:
        """Meta's chat_completion for Llama 2 chat models: [{"generation": {"role": "assistant",
        "content": ...}}, ...] (with "tokens" and "logprobs" when logprobs). A dialog containing
        the format's special tags gets Meta's error reply without being generated."""
        if not dialogs:
            raise ValueError("no dialogs: pass at least one")
        for i, dialog in enumerate(dialogs):
            check_dialog(dialog, i)
        safe = [i for i, dialog in enumerate(dialogs) if not has_special_tags(dialog)]
        max_gen_len = self.model.max_seq_len - 1 if max_gen_len is None else max_gen_len
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)
        replies = [(UNSAFE_ERROR, [], [])] * len(dialogs)
        if safe:
            prompt_tokens = [encode_dialog(self.tokenizer, dialogs[i]) for i in safe]
            done = self._complete(prompt_tokens, max_gen_len, sampling, logprobs, False, stop)
            for j, i in enumerate(safe):
                replies[i] = (done.texts[j], done.tokens[j], done.logprobs[j] if logprobs else [])
        out = []
        for text, tokens, probs in replies:
            item = {"generation": {"role": "assistant", "content": text}}
            out.append(item | ({"tokens": tokens, "logprobs": probs} if logprobs else {}))
        return out
