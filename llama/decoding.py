"""Meta's decoding loop (llama/generation.py's `generate`) as a generator of steps, and what is
layered on it: each row's ids, logprobs and text as they complete (streaming, stop strings), and
Meta's final cut (the prompt unless echo, the first stop id). The loop's batch is [B, total_len],
right-padded, decoded from the shortest prompt, longer prompts' tokens forced, each row done at a
stop id (Llama 2's EOS; Llama 3's end of text, message or turn) or its max_gen_len-th token.
"""

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from llama.model import Transformer
from llama.runtime import to_device
from llama.sampling import Sampler
from llama.tokenizer import StreamDecoder, Tokenizer


class Step(NamedTuple):
    """One position of Meta's loop, for every row of the batch."""

    pos: int  # the position just filled
    tokens: list[int]  # the token at pos in each row: sampled, or the prompt's own
    new: list[bool]  # the token is new output: sampled after the row's prompt, before the row ended
    ends: list[bool]  # the row ends with this new token: a stop id, or its max_gen_len-th
    logprobs: list[list[float]] | None  # per row, those of the tokens after the last step's pos, up to pos


class StreamEvent(NamedTuple):
    index: int  # the row (prompt) in the batch
    text: str  # newly completed text, "" when only `done` is news
    done: bool  # the row has finished: a stop id, max_gen_len, a stop string or max_seq_len
    stop_reason: str | None = None  # once done: see STOP_REASONS


# Why a row ended, in Meta's words (llama_models' StopReason), plus this project's stop strings.
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens", "stop_string")


class Completions(tuple):
    """`tokens, texts = llm.text_completion(...)`; `.logprobs` holds the per-token logprobs and
    `.stop_reasons` why each row ended (STOP_REASONS)."""

    def __new__(
        cls,
        tokens: list[list[int]],
        texts: list[str],
        logprobs: list[list[float]] | None = None,
        stop_reasons: list[str] | None = None,
    ):
        self = super().__new__(cls, (tokens, texts))
        self.logprobs, self.stop_reasons = logprobs, stop_reasons
        return self

    tokens = property(lambda self: self[0])
    texts = property(lambda self: self[1])


@torch.inference_mode()  # on a generator: switched on inside each step only, not in the caller between steps
def decode_steps(
    model: Transformer,
    prompt_tokens: list[list[int]],
    max_gen_len: int,
    sampler: Sampler,
    generator: torch.Generator,
    pad_id: int,
    stop_ids: Sequence[int],
    logprobs: bool = False,
    step: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> Iterator[Step]:
    """Meta's loop, one Step per position, until every row is done or max_seq_len is reached.
    step(tokens [B, 1], start_pos) -> last logits, if given, computes the one-token steps
    without logprobs (llama.compiled's StaticDecode)."""
    device = model.tok_embeddings.weight.device  # never packed or quantized
    bsz = len(prompt_tokens)
    prompt_lens = to_device(torch.tensor([len(t) for t in prompt_tokens]), device)
    min_prompt_len, max_prompt_len = min(map(len, prompt_tokens)), max(map(len, prompt_tokens))
    total_len = min(model.max_seq_len, max_gen_len + max_prompt_len)

    tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long)
    for k, t in enumerate(prompt_tokens):
        tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long)
    tokens = to_device(tokens, device)  # one copy to the device, not one per prompt
    # From the lengths: Meta's code compares tokens with the pad id, and Llama 3's pad is a real
    # token, which a prompt may hold.
    input_text_mask = torch.arange(total_len, device=device) < prompt_lens[:, None]
    stop = to_device(torch.tensor(stop_ids, dtype=torch.long), device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)

    if min_prompt_len == total_len:
        if logprobs:
            # Nothing to generate: score the prompts. Logits at i predict token i + 1 (Meta's code
            # compares them with token i, one position off).
            scores = -F.cross_entropy(model(tokens, 0)[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
            yield Step(total_len - 1, tokens[:, -1].tolist(), [False] * bsz, [False] * bsz, scores.tolist())
        return

    prev_pos = 0
    for cur_pos in range(min_prompt_len, total_len):
        if logprobs:
            logits = model(tokens[:, prev_pos:cur_pos], prev_pos)
            last = logits[:, -1]
        elif step is not None and cur_pos - prev_pos == 1:
            last = step(tokens[:, prev_pos:cur_pos], prev_pos)
        else:  # only the last position is sampled from; [B, dim] (a strided [B, 1, dim] view would
            # make matmul materialise the output weight once per row)
            last = model.output(model.hidden(tokens[:, prev_pos:cur_pos], prev_pos)[:, -1]).float()
        # Rows with non-finite logits are refused once this step's values reach the host below.
        token, finite = sample_finite(sampler, last, tokens[:, :cur_pos], generator)
        # Rows still inside their prompt take the prompt's token, not the sample.
        generated = ~input_text_mask[:, cur_pos]
        token = torch.where(generated, token, tokens[:, cur_pos])
        tokens[:, cur_pos] = token
        scores = None
        if logprobs:
            target = tokens[:, prev_pos + 1 : cur_pos + 1]
            scores = -F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # never a pad: no ignore_index
        new = generated & ~done
        # A row is done at a stop id or its last allowed token; later steps cannot change its output.
        ends = new & (torch.isin(token, stop) | (cur_pos + 1 >= prompt_lens + max_gen_len))
        done |= ends
        # one copy to the host per step (two with logprobs)
        host = torch.stack([token, new.long(), ends.long(), done.long(), (finite | ~new).long()])
        row_tokens, row_new, row_ends, row_done, row_finite = host.tolist()
        if not all(row_finite):
            bad = [b for b, ok in enumerate(row_finite) if not ok]
            raise non_finite(f"row(s) {bad} at position {cur_pos}")
        row_scores = None if scores is None else scores.tolist()
        yield Step(cur_pos, row_tokens, list(map(bool, row_new)), list(map(bool, row_ends)), row_scores)
        prev_pos = cur_pos
        if all(row_done):
            break


def sample_finite(
    sampler: Sampler, logits: torch.Tensor, history: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """sampler's [B] next ids, and [B] whether each row's logits are all finite: the caller refuses
    the others (non_finite) once the step's values reach the host. A NaN or an infinity makes a row's
    sum non-finite, and summed in float64 finite logits cannot overflow: one pass, where isfinite().all()
    took 6x as long at 8 rows. Sampling fails inside torch on such rows, so it draws from zeros there;
    greedy's argmax does not, and takes the logits as they are."""
    finite = torch.isfinite(logits.sum(dim=-1, dtype=torch.float64))
    if sampler.temperature > 0:
        logits = torch.where(finite[:, None], logits, 0.0)
    return sampler(logits, history, generator), finite


def non_finite(where: str) -> RuntimeError:
    """The error for NaN or infinite logits: no token drawn from them means anything."""
    return RuntimeError(
        f"the model's logits are NaN or infinite for {where}: usually a damaged checkpoint, or float16 "
        "overflowing (build with dtype='bfloat16' or 'float32')"
    )


class _RowText:
    """One row's text: streamed as completed, held back while it could be the start of a stop.
    After a stop string, `kept` is how many of the row's ids lie wholly before it."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.decoder, self.stop = StreamDecoder(tokenizer), stop
        self.text, self.sent = "", 0
        self.whole: list[int] = [0]  # text lengths after each id that ended on a whole character
        self.kept: int | None = None

    def push(self, token: int) -> tuple[str, bool]:
        """Decode one more id; return (text now safe to show, whether a stop string ended it)."""
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += self.decoder.push(token)
        self.whole.append(len(self.text) if self.decoder.read == len(self.decoder.ids) else -1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.kept = max(n for n, end in enumerate(self.whole) if 0 <= end <= len(self.text))
            return self._send(len(self.text)), True
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._send(len(self.text) - hold), False

    def finish(self) -> str:
        self.text += self.decoder.flush()
        return self._send(len(self.text))

    def _send(self, upto: int) -> str:
        out, self.sent = self.text[self.sent : upto], max(self.sent, upto)
        return out


class Outputs:
    """Each row's output as the steps arrive: its ids (prompt first) and logprobs up to where it
    ended, why it ended and, when text is wanted (streaming, stop strings), its text, decoded as it
    completes. stop_ids are the loop's (the tokenizer's, or Code Llama's <EOT> when infilling)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_tokens: list[list[int]],
        stop_ids: Sequence[int],
        stop: list[str],
        want_text: bool,
    ):
        self.tokenizer, self.prompt_tokens, self.stop_ids = tokenizer, prompt_tokens, set(stop_ids)
        self.tokens = [list(t) for t in prompt_tokens]
        self.logprobs = [[0.0] for _ in prompt_tokens]  # logprob i scores token i given the ones before it
        self.stop_reasons: list[str | None] = [None] * len(prompt_tokens)  # None: not ended yet
        self.row_texts = [_RowText(tokenizer, stop) for _ in prompt_tokens] if want_text or stop else None

    def events(self, steps: Iterator[Step]) -> Iterator[StreamEvent]:
        """Take steps until every row has ended, yielding each row's new text (with text wanted)."""
        for step in steps:
            yield from self.add(step)
            if None not in self.stop_reasons:
                break
        yield from self.cut()

    def consume(self, steps: Iterator[Step]) -> None:
        for _ in self.events(steps):
            pass

    def cut(self) -> Iterator[StreamEvent]:
        """End the rows still going: the cache (max_seq_len) is full."""
        for b, reason in enumerate(self.stop_reasons):
            if reason is None:
                self.stop_reasons[b] = "out_of_tokens"
                if self.row_texts is not None:
                    yield StreamEvent(b, self.row_texts[b].finish(), True, "out_of_tokens")

    def add(self, step: Step) -> Iterator[StreamEvent]:
        """One step's tokens (and logprobs) for the rows not ended yet."""
        for b, token in enumerate(step.tokens):
            if self.stop_reasons[b] is not None:
                continue
            if step.logprobs is not None:
                self.logprobs[b] += step.logprobs[b]
            if not step.new[b]:
                continue
            self.tokens[b].append(token)
            if step.ends[b]:
                self.stop_reasons[b] = self._reason(token)
            if self.row_texts is None:
                continue
            row = self.row_texts[b]
            text, stopped = ("", False) if token in self.stop_ids else row.push(token)
            if stopped:  # the ids of the stop string (and of a token it begins inside) go too
                self.stop_reasons[b] = "stop_string"
                end = len(self.prompt_tokens[b]) + row.kept
                self.tokens[b], self.logprobs[b] = self.tokens[b][:end], self.logprobs[b][:end]
            if self.stop_reasons[b] is not None:
                yield StreamEvent(b, text + ("" if stopped else row.finish()), True, self.stop_reasons[b])
            elif text:
                yield StreamEvent(b, text, False)

    def _reason(self, token: int) -> str:
        """Why a row that ended with this token ended."""
        if token not in self.stop_ids:
            return "out_of_tokens"  # its max_gen_len-th token
        return "end_of_message" if token == getattr(self.tokenizer, "eom_id", None) else "end_of_turn"

    def completions(self, echo: bool, logprobs: bool) -> Completions:
        """Meta's cut of each row: the generated ids (after the prompt's with echo), up to the first
        stop id among them (Meta's code also cuts at one inside an echoed prompt)."""
        out_tokens, out_logprobs, texts = [], [], []
        for b, prompt in enumerate(self.prompt_tokens):
            generated = self.tokens[b][len(prompt) :]
            end = len(prompt) + next((i for i, t in enumerate(generated) if t in self.stop_ids), len(generated))
            start = 0 if echo else len(prompt)
            out_tokens.append(self.tokens[b][start:end])
            out_logprobs.append(self.logprobs[b][start:end])
            if self.row_texts is None:
                texts.append(self.tokenizer.decode(out_tokens[-1]))
            else:  # decoded as it came, cut before any stop string
                texts.append((self.tokenizer.decode(prompt) if echo else "") + self.row_texts[b].text)
        reasons = [r or "out_of_tokens" for r in self.stop_reasons]
        return Completions(out_tokens, texts, out_logprobs if logprobs else None, reasons)
