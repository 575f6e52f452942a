"""Choosing the next token: Meta's temperature + top-p, plus top-k and a repetition penalty that
are off by default (so, unused, the draws are exactly Meta's). Logits are [B, vocab] float32 for
the last position of each row; history is [B, S] ids so far (pad ids < 0 are ignored).
"""

import math
from dataclasses import dataclass

import torch


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Meta's nucleus sampling: keep the smallest set of top tokens whose mass reaches p.

    The sort, cumsum, mask, renormalise and one multinomial over the whole batch are Meta's
    exact sequence, so the same seed draws the same tokens.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: every token already in the row is made less likely (positive logits are
    divided by the penalty, negative ones multiplied), however often it occurred."""
    counts = torch.zeros_like(logits, dtype=torch.int32)
    counts.scatter_add_(1, history.clamp(min=0), (history >= 0).int())
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalized, logits)


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the k largest logits of each row to -inf (ties with the k-th are kept)."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class Sampler:
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not (_is_number(self.temperature) and 0 <= self.temperature < math.inf):
            raise ValueError(f"temperature={self.temperature!r}: use 0 for greedy decoding or a positive number")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(
                f"top_p={self.top_p!r} is outside (0, 1]: 1 disables nucleus sampling, Meta's default is 0.9"
            )
        if self.top_k is not None and not (
            isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 1
        ):
            raise ValueError(f"top_k={self.top_k!r}: use a positive int, or None to keep every token")
        if not (_is_number(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf):
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r}: use 1.0 for none, or e.g. 1.1-1.3")

    def __call__(self, logits: torch.Tensor, history: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """[B] next ids: greedy at temperature 0, else softmax(logits / temperature) and top-p."""
        if self.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, history, self.repetition_penalty)
        if self.top_k is not None:
            logits = keep_top_k(logits, self.top_k)
        if self.temperature > 0:
            probs = torch.softmax(logits / self.temperature, dim=-1)
            return sample_top_p(probs, self.top_p, generator).reshape(-1)
        return torch.argmax(logits, dim=-1).reshape(-1)
