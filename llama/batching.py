"""Continuous batching: many prompts through the max_batch_size rows of the KV cache, a waiting
prompt taking a row's slot as soon as that row ends (its prompt prefilled into the slot between two
decode steps of the others), where Meta's schedule steps a batch until its slowest row ends. Rows
then sit at different positions, so a decode step takes one position per row: its rotation, where
its keys and values are written, and how much of its own cache row it attends to.

Each row's arithmetic is its own: greedy ids are a prompt's ids run alone. Sampled rows draw from
the one generator in another order than Meta's schedule (with one slot, in the same order as
prompts run one by one).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from llama.decoding import Outputs, Step, non_finite, sample_finite
from llama.model import Transformer
from llama.runtime import to_device
from llama.sampling import Sampler


class Completion(NamedTuple):
    """One prompt's result from LLaMa.complete_many: text_completion's row, on its own."""

    tokens: list[int]
    text: str
    logprobs: list[float] | None
    stop_reason: str


def decode_rows(model: Transformer, tokens: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
    """Float32 logits [B, vocab] for tokens [B, 1], row b's token at position pos[b] < span: its
    keys and values are written there in cache row b, and it attends to that row's positions
    0..pos[b] (the rest of the first span positions are masked)."""
    bsz = tokens.shape[0]
    rows = torch.arange(bsz, device=tokens.device)
    freqs_cis = model.freqs_cis[pos]  # [B, D/2]: each row's own rotation
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        a = layer.attention
        xq, xk, xv = a.project(layer.attention_norm(h))
        # the rows as the positions of one sequence [1, B, H, D]: each rotated by its own position
        xq, xk = (t.transpose(0, 1) for t in a.rotate(xq.transpose(0, 1), xk.transpose(0, 1), freqs_cis))
        a.cache_k[rows, :, pos] = xk[:, 0]
        a.cache_v[rows, :, pos] = xv[:, 0]
        out = a.attend_rows(xq.transpose(1, 2), a.cache_k[:bsz, :, :span], a.cache_v[:bsz, :, :span], pos + 1)
        h = h + a.wo(out.transpose(1, 2).reshape(bsz, 1, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h)[:, -1]).float()


@contextmanager
def one_slot(model: Transformer, slot: int):
    """The model's cache seen as row `slot` alone (views: what a forward writes lands in that row)."""
    attentions = [layer.attention for layer in model.layers]
    whole = [(a.cache_k, a.cache_v) for a in attentions]
    for a, (k, v) in zip(attentions, whole):
        a.cache_k, a.cache_v = k[slot : slot + 1], v[slot : slot + 1]
    try:
        yield
    finally:
        for a, (k, v) in zip(attentions, whole):
            a.cache_k, a.cache_v = k, v


@dataclass
class _Row:
    index: int  # the prompt's
    outputs: Outputs
    length: int  # ids in the row; the last one is the next step's input, at position length - 1
    limit: int  # the length at which the row ends: its prompt + max_gen_len, or max_seq_len

    def result(self, echo: bool, logprobs: bool) -> tuple[int, Completion]:
        done = self.outputs.completions(echo, logprobs)
        lp = done.logprobs[0] if logprobs else None
        return self.index, Completion(done.tokens[0], done.texts[0], lp, done.stop_reasons[0])


class Scheduler:
    """The slots of one LLaMa's cache and the rows in them (row b in slot b): fills free slots
    from the waiting prompts, steps the rows, moves the last row into a slot left empty."""

    def __init__(self, llm, sampler: Sampler, logprobs: bool, echo: bool, stop: list[str] | None):
        self.llm, self.model = llm, llm.model
        self.sampler, self.logprobs, self.echo, self.stop = sampler, logprobs, echo, stop
        self.slots, self.max_seq_len = self.model.max_batch_size, self.model.max_seq_len
        device = self.model.tok_embeddings.weight.device  # never packed or quantized
        self.history = torch.full((self.slots, self.max_seq_len), -1, dtype=torch.long, device=device)  # -1: none
        self.stop_ids = set(llm.tokenizer.stop_ids)
        self.rows: list[_Row | None] = []

    def run(self, prompts: Iterator[tuple[int, list[int], int]]) -> Iterator[tuple[int, Completion]]:
        """(prompt index, its completion) as each row ends, until every prompt (index, ids,
        max_gen_len) is done."""
        waiting = True
        while True:
            free = [b for b, row in enumerate(self.rows) if row is None] + list(range(len(self.rows), self.slots))
            for slot in free:
                while waiting:  # a prompt that ends at once leaves the slot free for the next
                    item = next(prompts, None)
                    if item is None:
                        waiting = False
                    elif (done := self._admit(slot, *item)) is None:
                        break
                    else:
                        yield done
            self._compact()
            if not self.rows:
                return
            yield from self._step()

    def _admit(self, slot: int, index: int, prompt: list[int], max_gen_len: int) -> tuple[int, Completion] | None:
        """Prefill the prompt into the slot and sample its first id; its result if it already ended."""
        size = len(prompt)
        outputs = self.llm._outputs([prompt], self.stop, want_text=False)
        row = _Row(index, outputs, size, min(size + max_gen_len, self.max_seq_len))
        self.history[slot].fill_(-1)
        self.history[slot, :size] = to_device(torch.tensor(prompt), self.history.device)
        ids = self.history[slot : slot + 1, :size]
        with one_slot(self.model, slot):
            if self.logprobs:  # Meta's loop scores the prompt's ids too
                logits = self.model(ids, 0)
                last = logits[:, -1]
                scores = (-F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"))[0]
            else:
                last = self.model.output(self.model.hidden(ids, 0)[:, -1]).float()
        if size == row.limit:  # the prompt fills the cache: nothing to generate
            if self.logprobs:
                _drain(row.outputs.add(Step(size - 1, [prompt[-1]], [False], [False], [scores.tolist()])))
            _drain(row.outputs.cut())
            return row.result(self.echo, self.logprobs)
        self.rows[slot : slot + 1] = [row]  # (slot == len(self.rows) when the slot was never used)
        ((token, lp),) = self._sample(last, slot, [row], to_device(torch.tensor([size]), self.history.device))
        if self._advance(row, token, None if lp is None else scores.tolist() + [lp]):
            self.rows[slot] = None
            return row.result(self.echo, self.logprobs)
        return None

    def _step(self) -> Iterator[tuple[int, Completion]]:
        """One decode step of every row; the rows that end leave their slots."""
        rows = self.rows
        lengths = to_device(torch.tensor([row.length for row in rows]), self.history.device)
        last = self.history[: len(rows)].gather(1, (lengths - 1)[:, None])
        if self.llm.step is not None:  # build(compile=True): one captured step for every number of rows
            logits = self.llm.step.rows(last, lengths - 1)
        else:
            logits = decode_rows(self.model, last, lengths - 1, max(row.length for row in rows))
        for b, (token, lp) in enumerate(self._sample(logits, 0, rows, lengths)):
            if self._advance(rows[b], token, None if lp is None else [lp]):
                yield rows[b].result(self.echo, self.logprobs)
                rows[b] = None

    def _sample(
        self, logits: torch.Tensor, first: int, rows: list[_Row], lengths: torch.Tensor
    ) -> list[tuple[int, float | None]]:
        """The next id of the rows in slots first.. (logits [B, vocab]), written into their history at
        their lengths, with its logprob when wanted; refused for non-finite logits (as decode_steps does)."""
        history = self.history[first : first + len(rows)]
        token, finite = sample_finite(
            self.sampler, logits, history[:, : max(row.length for row in rows)], self.llm.generator
        )
        history.scatter_(1, lengths[:, None], token[:, None])
        host = [token.double(), finite.double()]
        if self.logprobs:
            host.append(torch.log_softmax(logits, dim=-1).gather(1, token[:, None])[:, 0].double())
        values = torch.stack(host).tolist()  # one copy to the host per step
        if not all(values[1]):
            raise non_finite(f"prompt(s) {[rows[b].index for b, ok in enumerate(values[1]) if not ok]}")
        lps = values[2] if self.logprobs else [None] * len(rows)
        return [(int(t), lp) for t, lp in zip(values[0], lps)]

    def _advance(self, row: _Row, token: int, logprobs: list[float] | None) -> bool:
        """The row's new id into its outputs; whether the row has ended (a stop id or string, its limit)."""
        row.length += 1
        ends = token in self.stop_ids or row.length >= row.limit
        _drain(row.outputs.add(Step(row.length - 1, [token], [True], [ends], None if logprobs is None else [logprobs])))
        return row.outputs.stop_reasons[0] is not None

    def _compact(self) -> None:
        """Move the last rows into the empty slots before them, so that rows 0..n-1 are the ones
        stepped (a row's cache and history are copied up to its length)."""
        while self.rows and self.rows[-1] is None:
            self.rows.pop()
        dst = 0
        while dst < len(self.rows):
            if self.rows[dst] is not None:
                dst += 1
                continue
            src, row = len(self.rows) - 1, self.rows[-1]
            for layer in self.model.layers:
                a = layer.attention
                a.cache_k[dst, :, : row.length] = a.cache_k[src, :, : row.length]
                a.cache_v[dst, :, : row.length] = a.cache_v[src, :, : row.length]
            self.history[dst] = self.history[src]
            self.rows[dst] = self.rows.pop()
            while self.rows and self.rows[-1] is None:
                self.rows.pop()


def _drain(events: Iterator) -> None:
    for _ in events:
        pass
