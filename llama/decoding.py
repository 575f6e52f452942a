"""Meta's decoding schedule (llama/generation.py's loop) as a Python generator: a right-padded
batch [B, total_len], decoding from the shortest prompt, longer prompts' tokens forced, per-row EOS
after the prompt. When text is wanted (streaming, stop strings) each step yields what every row
newly completed, decoded incrementally; the generator's return value is the whole result.
"""

from collections.abc import Generator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from llama.model import Transformer
from llama.sampling import Sampler
from llama.tokenizer import StreamDecoder, Tokenizer


class StreamEvent(NamedTuple):
    index: int  # the row (prompt) in the batch
    text: str  # newly completed text, "" when only `done` is news
    done: bool  # the row has finished: EOS, max_gen_len, a stop string or max_seq_len


@dataclass
class Decoded:
    tokens: list[list[int]]  # per row: prompt + generated ids, cut at max_gen_len and any stop string
    logprobs: list[list[float]] | None  # logprob i scores token i given the tokens before it
    texts: list[str] | None  # per row, the generated text cut before its stop string (when text was wanted)


class _RowText:
    """One row's text: streamed as completed, held back while it could be the start of a stop."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.decoder, self.stop = StreamDecoder(tokenizer), stop
        self.text, self.sent = "", 0

    def add(self, piece: str) -> tuple[str, bool]:
        """Append decoded text; return (text now safe to show, whether a stop string ended it)."""
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._send(len(self.text)), True
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._send(len(self.text) - hold), False

    def finish(self) -> str:
        self.text += self.decoder.flush()
        return self._send(len(self.text))

    def _send(self, upto: int) -> str:
        out, self.sent = self.text[self.sent : upto], max(self.sent, upto)
        return out


def decode(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt_tokens: list[list[int]],
    max_gen_len: int,
    sampler: Sampler,
    generator: torch.Generator,
    logprobs: bool = False,
    want_text: bool = False,
    stop: list[str] | None = None,
) -> Generator[list[StreamEvent], None, Decoded]:
    """Run Meta's loop; with want_text or stop, yield each step's StreamEvents. Returns Decoded."""
    device = model.tok_embeddings.weight.device  # never packed or quantized
    bsz, stop = len(prompt_tokens), stop or []
    want_text = want_text or bool(stop)
    prompt_lens = torch.tensor([len(t) for t in prompt_tokens], device=device)
    min_prompt_len, max_prompt_len = min(map(len, prompt_tokens)), max(map(len, prompt_tokens))
    total_len = min(model.max_seq_len, max_gen_len + max_prompt_len)
    pad_id, eos_id = tokenizer.pad_id, tokenizer.eos_id

    tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=device)
    for k, t in enumerate(prompt_tokens):
        tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
    token_logprobs = torch.zeros_like(tokens, dtype=torch.float) if logprobs else None
    input_text_mask = tokens != pad_id
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    rows = [_RowText(tokenizer, stop) for _ in range(bsz)] if want_text else []
    ends = [len(t) + max_gen_len for t in prompt_tokens]  # exclusive end of each row's tokens

    if min_prompt_len == total_len and logprobs:
        # Nothing to generate: score the prompts. Logits at i predict token i + 1 (Meta's code
        # compares them with token i, one position off).
        logits = model(tokens, 0)
        token_logprobs[:, 1:] = -F.cross_entropy(
            logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none", ignore_index=pad_id
        )

    prev_pos = 0
    for cur_pos in range(min_prompt_len, total_len):
        if logprobs:
            logits = model(tokens[:, prev_pos:cur_pos], prev_pos)
            last = logits[:, -1]
        else:  # only the last position is sampled from; [B, dim] (a strided [B, 1, dim] view would
            # make matmul materialise the output weight once per row)
            last = model.output(model.hidden(tokens[:, prev_pos:cur_pos], prev_pos)[:, -1]).float()
        token = sampler(last, tokens[:, :cur_pos], generator)
        # Rows still inside their prompt take the prompt's token, not the sample.
        generated = ~input_text_mask[:, cur_pos]
        token = torch.where(generated, token, tokens[:, cur_pos])
        tokens[:, cur_pos] = token
        if logprobs:
            token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                logits.transpose(1, 2), tokens[:, prev_pos + 1 : cur_pos + 1], reduction="none", ignore_index=pad_id
            )
        was_done = done.clone()
        # A row is done at its EOS or its last allowed token; later steps cannot change its output.
        done |= generated & ((token == eos_id) | (cur_pos + 1 >= prompt_lens + max_gen_len))
        prev_pos = cur_pos
        if want_text:
            yield list(_text_events(rows, tokens[:, cur_pos].tolist(), generated.tolist(), was_done.tolist(),
                                    done, eos_id, ends, cur_pos))  # fmt: skip
        if all(done):
            break

    finals = [StreamEvent(b, row.finish(), True) for b, row in enumerate(rows) if not done[b]]
    if finals:
        yield finals
    token_logprobs = token_logprobs.tolist() if logprobs else None
    out_tokens = [toks[:end] for toks, end in zip(tokens.tolist(), ends)]
    out_logprobs = [lp[:end] for lp, end in zip(token_logprobs, ends)] if logprobs else None
    return Decoded(out_tokens, out_logprobs, [row.text for row in rows] if want_text else None)


def _text_events(rows, step_tokens, generated, was_done, done, eos_id, ends, cur_pos):
    """Each generated row's new text at this step; a stop string marks the row done and cuts it."""
    for b, row in enumerate(rows):
        if not generated[b] or was_done[b]:
            continue
        text, stopped = ("", False) if step_tokens[b] == eos_id else row.add(row.decoder.push(step_tokens[b]))
        if stopped:
            done[b] = True
            ends[b] = cur_pos + 1
        if done[b]:
            yield StreamEvent(b, text + ("" if stopped else row.finish()), True)
        elif text:
            yield StreamEvent(b, text, False)
