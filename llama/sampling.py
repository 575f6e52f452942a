"""Choosing the next token from logits: Meta's temperature + top-p, drawn from an owned generator.

Logits are [B, vocab] float32 for the last position of each row; the result is [B] token ids.
"""

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


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy at temperature 0, else softmax(logits / temperature) then top-p, as Meta does."""
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return sample_top_p(probs, top_p, generator).reshape(-1)
    return torch.argmax(logits, dim=-1).reshape(-1)


def check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature}: use 0 for greedy decoding or a positive value")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is outside (0, 1]: 1 disables nucleus sampling, Meta's default is 0.9")
