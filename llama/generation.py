"""The facade: `LLaMa.build` composes loading (llama.loading), the CPU kernels and the KV cache;
`generate`, `text_completion`, `chat_completion` and `stream` are Meta's llama/generation.py API
over llama.decoding's loop (right-padded batch, decoding from the shortest prompt, forced prompt
tokens, each row ending at a stop id of its tokenizer).
"""

import logging
import os
import threading
from collections.abc import Iterator, Sequence

import torch

from llama.batching import Completion, Scheduler
from llama.chat import UNSAFE_ERROR, Dialog, check_dialog, encode_dialog, has_special_tags
from llama.compiled import StaticDecode
from llama.cpu import onednn_bf16, use_cpu_modules
from llama.decoding import Completions, Outputs, Step, StreamEvent, decode_steps
from llama.infilling import check_infilling, infilling_prompt
from llama.loading import BUILTIN_MODEL, load, run_dtype
from llama.model import Transformer, is_int
from llama.parallel import load_parallel, local_bytes, local_device, world
from llama.quantize import check_scheme
from llama.runtime import resolve_device
from llama.sampling import Sampler
from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class LLaMa:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, seed: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.tok_embeddings.weight.device
        # Meta seeds the global RNG once in build; an owned generator draws the same sequence.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # One generation at a time: they all write the one KV cache.
        self._generating = threading.Lock()
        self._warned_cut = False
        self.step: StaticDecode | None = None  # build(compile=True): the decode steps as one CUDA graph

    def __getstate__(self) -> dict:
        """copy.deepcopy and pickle: everything but the lock, which the copy gets anew."""
        return {k: v for k, v in self.__dict__.items() if k != "_generating"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _generating=threading.Lock())

    @property
    def _tokenizer(self) -> Tokenizer:
        """The tokenizer, which every generation needs (its stop and pad ids, its text)."""
        if self.tokenizer is None:
            raise ValueError(
                "this LLaMa has no tokenizer (built with load_model=False from a params.json alone): generating "
                "needs its stop ids and its text. Pass LLaMa.build(..., tokenizer_path=) a tokenizer.model"
            )
        return self.tokenizer

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
        compile: bool = False,
    ) -> "LLaMa":
        """Load a Meta checkpoint folder (any number of shards; the built-in Shakespeare model when
        omitted) onto one device, with its tokenizer. load_model=False builds the architecture with
        random weights, from a folder's params.json or a preset name in params/ ("llama-2-7b"),
        with the tokenizer found there or given (generating needs one).
        quantize="int8" | "int4" quantizes the linear layers after loading (see llama.quantize);
        a folder written by llama.quantize.save_quantized loads already quantized; a GGUF file's
        path loads too, dequantized into dtype. dtype=None is bf16 on the CPU and Meta's code's choice
        on a GPU: fp16, or bf16 for Llama 3 (llama.loading.run_dtype). On the CPU in bf16, decode
        steps run in kernels compiled here once per machine where the CPU has AVX-512 BF16 (see
        llama.cpu); pack=True keeps the weights in oneDNN's layout instead, faster for batches and
        prompts, slower at batch 1. Inside a torch.distributed process group of several processes (torchrun), each
        process builds its part of the model, split over them all (see llama.parallel).
        compile=True (CUDA, one process) runs each decode step as one captured CUDA graph (see
        llama.compiled): the first steps at each batch size compile it (complete_many's at
        max_batch_size), which takes a while.
        """
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r}: use a whole number, at least 1")
        if not is_int(seed):
            raise ValueError(f"seed={seed!r}: use a whole number")
        check_scheme(quantize)
        _, n = world()
        device = resolve_device(device if device is not None or n == 1 else local_device())
        source = BUILTIN_MODEL if checkpoints_dir is None else checkpoints_dir
        dtype = run_dtype(source, tokenizer_path, dtype, device)
        if pack and quantize is not None:
            raise ValueError(f"pack=True reorders bf16 weights that quantize={quantize!r} replaces: choose one")
        if pack and not (device.type == "cpu" and dtype == torch.bfloat16 and onednn_bf16() and n == 1):
            raise ValueError(
                f"pack=True needs bfloat16 on a CPU with oneDNN bf16 kernels in one process, not {dtype} on "
                f"{device} in {n} process{'es' if n > 1 else ''}"
            )
        if compile and not (device.type == "cuda" and n == 1):
            raise ValueError(f"compile=True captures CUDA graphs: it needs a CUDA device in one process, not {device}")
        run = dict(device=device, dtype=dtype, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        if n > 1:
            if not load_model or quantize is not None:
                raise ValueError(
                    f"{n} processes split a Meta folder's weights as they load them: random weights "
                    "(load_model=False) and quantize= run in one process"
                )
            model, tokenizer = load_parallel(source, tokenizer_path, **run)
        else:
            model, tokenizer = load(source, tokenizer_path, load_model=load_model, quantize=quantize, seed=seed, **run)
        if device.type == "cpu" and n == 1:  # pack=True anywhere but bf16 on the CPU was refused above
            use_cpu_modules(model, pack)
        model.requires_grad_(False).eval()
        model.setup_cache(max_batch_size, max_seq_len)
        logger.info("built %s on %s in %s: %.1f MB of weights", source, device, dtype, local_bytes(model) / 1e6)
        llm = LLaMa(model, tokenizer, seed)
        llm.step = StaticDecode(model) if compile else None
        return llm

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
        """Meta's generate: complete each prompt with at most max_gen_len ids, cut at the first stop id.

        Logprob i scores token i given the tokens before it (0.0 for a row's first token).
        top_k, repetition_penalty and stop strings are off by default, leaving Meta's draws.
        """
        max_gen_len = self._check_prompts(prompt_tokens, max_gen_len)
        sampler = Sampler(temperature, top_p, top_k, repetition_penalty)
        done = self._complete(prompt_tokens, max_gen_len, sampler, logprobs, echo, stop)
        return done.tokens, done.logprobs

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
        max_gen_len = self._check_prompts(prompt_tokens, max_gen_len)
        sampler = Sampler(temperature, top_p, top_k, repetition_penalty)
        return self._complete(prompt_tokens, max_gen_len, sampler, logprobs, echo, stop)

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
        """Meta's chat_completion, in the chat format of the model's tokenizer (Llama 2's [INST] or
        Llama 3's headers; see llama.chat): [{"generation": {"role": "assistant", "content": ...,
        "stop_reason": ...}}, ...], with "tokens" (each token's text, decode([id]), as Meta's code gives
        them) and "logprobs" when logprobs. stop_reason is
        end_of_turn, end_of_message (Llama 3's <|eom_id|>), out_of_tokens or stop_string. A Llama 2
        dialog containing the format's tags gets Meta's error reply (stop_reason None), ungenerated."""
        dialogs = list(dialogs)  # any iterable, read once
        if not dialogs:
            raise ValueError("no dialogs: pass at least one")
        for i, dialog in enumerate(dialogs):
            check_dialog(dialog, i, self._tokenizer)
        safe = [i for i, dialog in enumerate(dialogs) if not has_special_tags(dialog, self._tokenizer)]
        replies = [(UNSAFE_ERROR, None, [], [])] * len(dialogs)
        if safe:
            prompt_tokens = [encode_dialog(self._tokenizer, dialogs[i]) for i in safe]
            max_gen_len = self._check_prompts(prompt_tokens, max_gen_len, names=[f"dialog {i}" for i in safe])
            sampler = Sampler(temperature, top_p, top_k, repetition_penalty)
            done = self._complete(prompt_tokens, max_gen_len, sampler, logprobs, False, stop)
            for j, i in enumerate(safe):
                replies[i] = (done.texts[j], done.stop_reasons[j], done.tokens[j], done.logprobs[j] if logprobs else [])
        out = []
        for text, reason, tokens, probs in replies:
            item = {"generation": {"role": "assistant", "content": text, "stop_reason": reason}}
            texts = [self._tokenizer.decode([t]) for t in tokens]
            out.append(item | ({"tokens": texts, "logprobs": probs} if logprobs else {}))
        return out

    def text_infilling(
        self,
        prefixes: list[str],
        suffixes: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        suffix_first: bool = False,
        *,
        top_k: int | None = None,
        repetition_penalty: float = 1.0,
    ) -> list[dict]:
        """Meta's text_infilling for Code Llama 7B/13B: the code between each prefix and suffix,
        [{"generation": middle, "full_text": prefix + middle + suffix}, ...] (with "tokens", each
        token's piece as Meta's code gives them, and "logprobs" when logprobs). Each row ends at
        ▁<EOT>, Code Llama's end of a middle."""
        tokenizer = check_infilling(self._tokenizer)
        if isinstance(prefixes, str) or isinstance(suffixes, str) or len(prefixes) != len(suffixes):
            raise ValueError("prefixes and suffixes are lists of strings of the same length: one pair per gap")
        prompt_tokens = [infilling_prompt(tokenizer, p, s, suffix_first) for p, s in zip(prefixes, suffixes)]
        max_gen_len = self._check_prompts(prompt_tokens, max_gen_len)
        sampler = Sampler(temperature, top_p, top_k, repetition_penalty)
        stop_ids = (tokenizer.eot_id,)  # Meta's: only <EOT> ends a middle
        outputs = self._outputs(prompt_tokens, None, want_text=False, stop_ids=stop_ids)
        self._consume(outputs, self._steps(prompt_tokens, max_gen_len, sampler, logprobs, stop_ids))
        done = outputs.completions(echo=False, logprobs=logprobs)
        out = []
        for i, (prefix, suffix) in enumerate(zip(prefixes, suffixes)):
            middle = tokenizer.decode_infilling(done.tokens[i])
            item = {"generation": middle, "full_text": prefix + middle + suffix}
            pieces = [tokenizer.sp_model.id_to_piece(t) for t in done.tokens[i]]
            out.append(item | ({"tokens": pieces, "logprobs": done.logprobs[i]} if logprobs else {}))
        return out

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
        prompt_tokens = self._prompt_ids(prompts)
        max_gen_len = self._check_prompts(prompt_tokens, max_gen_len)  # all checked now, not at the first step
        sampler = Sampler(temperature, top_p, top_k, repetition_penalty)
        outputs = self._outputs(prompt_tokens, stop, want_text=True)
        self._claim()  # from now until the stream is exhausted or closed
        return _Stream(outputs.events(self._steps(prompt_tokens, max_gen_len, sampler)), self._generating.release)

    def complete_many(
        self,
        prompts: Sequence[str] | Sequence[list[int]],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | Sequence[int] | None = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: int | None = None,
        repetition_penalty: float = 1.0,
        stop: list[str] | None = None,
    ) -> Iterator[Completion]:
        """Complete any number of prompts (strings, or token id lists), max_batch_size at a time by
        continuous batching (see llama.batching): a prompt takes the cache slot of a row as soon as
        that row ends. Yields Completion(tokens, text, logprobs, stop_reason) per prompt, in prompt
        order, each as text_completion's row for it would be. max_gen_len may be one per prompt.
        Greedy ids equal the prompt's run alone; sampled rows draw in another order than Meta's
        schedule (text_completion's), so their tokens differ from it. Every prompt is checked
        before the first step."""
        prompt_tokens = self._prompt_ids(prompts)
        if isinstance(max_gen_len, (list, tuple)):
            if len(max_gen_len) != len(prompt_tokens):
                raise ValueError(
                    f"max_gen_len holds {len(max_gen_len)} values for {len(prompt_tokens)} prompts: give one per "
                    "prompt, or one int for all"
                )
            self._check_prompts(prompt_tokens, None, one_batch=False)
            budgets = []
            for i, (t, n) in enumerate(zip(prompt_tokens, max_gen_len)):
                try:
                    budgets.append(self._check_prompts([t], n, one_batch=False))
                except ValueError as e:
                    raise ValueError(f"prompt {i}'s {e}") from None
        else:
            budgets = [self._check_prompts(prompt_tokens, max_gen_len, one_batch=False)] * len(prompt_tokens)
        sampler = Sampler(temperature, top_p, top_k, repetition_penalty)
        self._outputs(prompt_tokens[:1], stop, want_text=False)  # stop checked now, not at the first row
        scheduler = Scheduler(self, sampler, logprobs, echo, stop)
        work = ((i, t, n) for i, (t, n) in enumerate(zip(prompt_tokens, budgets)))
        self._claim()
        return _Stream(_in_order(scheduler.run(work)), self._generating.release)

    def _complete(self, prompt_tokens, max_gen_len, sampler, logprobs, echo, stop) -> Completions:
        """Run (checked prompts) to the end; cut each row as Meta does (prompt unless echo, first stop id)."""
        outputs = self._outputs(prompt_tokens, stop, want_text=False)
        self._consume(outputs, self._steps(prompt_tokens, max_gen_len, sampler, logprobs))
        return outputs.completions(echo, logprobs)

    def _claim(self) -> None:
        if not self._generating.acquire(blocking=False):
            raise RuntimeError(
                "this LLaMa is already generating (a stream not yet exhausted or closed, or a call in another "
                "thread): its KV cache holds one generation at a time. Finish or close() the stream first, or "
                "build another LLaMa"
            )

    def _consume(self, outputs: Outputs, steps: Iterator[Step]) -> None:
        self._claim()
        try:
            outputs.consume(steps)
        finally:
            self._generating.release()

    def _steps(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        sampler: Sampler,
        logprobs: bool = False,
        stop_ids: Sequence[int] | None = None,
    ) -> Iterator[Step]:
        """Meta's loop over these (checked) prompts, to the tokenizer's stop ids unless others are given."""
        stop_ids = self._tokenizer.stop_ids if stop_ids is None else stop_ids
        pad_id = self._tokenizer.pad_id
        return decode_steps(
            self.model, prompt_tokens, max_gen_len, sampler, self.generator, pad_id, stop_ids, logprobs, self.step
        )

    def _outputs(
        self,
        prompt_tokens: list[list[int]],
        stop: list[str] | None,
        want_text: bool,
        stop_ids: Sequence[int] | None = None,
    ) -> Outputs:
        iterable = stop is not None and not isinstance(stop, str) and hasattr(stop, "__iter__")
        stop = list(stop) if iterable else stop  # an iterator is read once
        if stop is not None and (not iterable or not all(isinstance(s, str) and s for s in stop)):
            raise ValueError(f"stop={stop!r}: pass a list of non-empty strings")
        stop_ids = self._tokenizer.stop_ids if stop_ids is None else stop_ids
        return Outputs(self._tokenizer, prompt_tokens, stop_ids, list(stop or []), want_text)

    def _check_prompts(
        self, prompt_tokens: list[list[int]], max_gen_len: int | None, one_batch: bool = True, names=None
    ) -> int:
        """Refuse, before any step, a batch that is not lists of the model's ids, does not fit the
        cache (one_batch: nor its max_batch_size) or asks for nothing; returns max_gen_len (None: up
        to max_seq_len - 1, Meta's default). names: what the errors call each prompt ("prompt i")."""
        if not isinstance(prompt_tokens, list) or (prompt_tokens and all(is_int(t) for t in prompt_tokens)):
            what = "one flat list of ids" if isinstance(prompt_tokens, list) else f"a {type(prompt_tokens).__name__}"
            raise ValueError(f"prompt_tokens is {what}: pass a list of id lists, one per prompt ([ids] for one)")
        if not prompt_tokens:
            raise ValueError("no prompts: pass at least one")
        if one_batch and len(prompt_tokens) > self.model.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts but max_batch_size={self.model.max_batch_size}: pass fewer prompts "
                "at a time or build with a larger max_batch_size"
            )
        vocab = self.model.vocab_size
        for i, t in enumerate(prompt_tokens):
            name = names[i] if names else f"prompt {i}"
            if not isinstance(t, list) or not all(is_int(x) for x in t):
                raise ValueError(
                    f"{name} is {type(t).__name__} {str(t)[:60]}: pass a list of ints (.tolist() a tensor)"
                )
            if len(t) == 0:
                raise ValueError(f"{name} has no tokens")
            if not all(0 <= x < vocab for x in t):
                bad = next(x for x in t if not 0 <= x < vocab)
                raise ValueError(f"{name} holds id {bad}, outside the model's vocabulary 0..{vocab - 1}")
            if len(t) > self.model.max_seq_len:
                raise ValueError(
                    f"{name} has {len(t)} tokens, {len(t) - self.model.max_seq_len} more than "
                    f"max_seq_len={self.model.max_seq_len}: shorten it or build with a larger max_seq_len"
                )
        if max_gen_len is None:
            return self.model.max_seq_len - 1
        if not is_int(max_gen_len) or max_gen_len < 1:
            raise ValueError(f"max_gen_len={max_gen_len!r}: ask for a whole number of new tokens, at least 1")
        longest = max(map(len, prompt_tokens))
        if longest + max_gen_len > self.model.max_seq_len and not self._warned_cut:
            self._warned_cut = True
            logger.warning(
                "a %d-token prompt leaves room for %d of max_gen_len=%d new tokens in max_seq_len=%d: answers are "
                "cut there, as in Meta's code (build with max_seq_len=%d for all of them; said once)",
                longest,
                self.model.max_seq_len - longest,
                max_gen_len,
                self.model.max_seq_len,
                longest + max_gen_len,
            )
        return max_gen_len

    def _prompt_ids(self, prompts: Sequence[str] | Sequence[list[int]]) -> list[list[int]]:
        """Prompts given as strings or as id lists (any iterable of them, read once) as id lists."""
        prompts = prompts if isinstance(prompts, str) else list(prompts)
        if any(isinstance(p, list) for p in prompts):  # id lists (_check_prompts refuses the others among them)
            return prompts
        return self._encode_prompts(prompts)

    def _encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        if isinstance(prompts, str):
            raise TypeError("prompts is a list of strings: wrap a single prompt as [prompt]")
        prompts = list(prompts)
        for i, x in enumerate(prompts):
            if not isinstance(x, str):
                raise ValueError(
                    f"prompt {i} is a {type(x).__name__} {str(x)[:60]}: pass strings, or lists of token ids "
                    "(.tolist() a tensor)"
                )
        return [self._tokenizer.encode(x, bos=True, eos=False) for x in prompts]


def _in_order(done: Iterator[tuple[int, Completion]]) -> Iterator[Completion]:
    """The completions of prompts 0, 1, 2, ... from (index, completion) pairs in any order."""
    held, upto = {}, 0
    for index, completion in done:
        held[index] = completion
        while upto in held:
            yield held.pop(upto)
            upto += 1


class _Stream:
    """LLaMa.stream's iterator of StreamEvents (complete_many's, of Completions): it holds the LLaMa
    (its KV cache) from the call until it is exhausted, raises, or is closed (or dropped)."""

    def __init__(self, events: Iterator[StreamEvent], release):
        self._events, self._release = events, release

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> StreamEvent | Completion:
        if self._release is None:
            raise StopIteration
        try:
            return next(self._events)
        except BaseException:  # the end, an error or Ctrl-C: the stream is over
            self.close()
            raise

    def close(self) -> None:
        if self._release is not None:
            self._events.close()
            self._release()
            self._release = None

    def __del__(self) -> None:
        self.close()
