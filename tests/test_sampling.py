"""The sampler on hand-made distributions: Meta's top-p, and the options that are off by default."""

import math

import pytest
import torch

from llama.sampling import Sampler, apply_repetition_penalty, keep_top_k, sample_top_p


def draws(sampler: Sampler, logits: torch.Tensor, n: int = 4000, history=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    history = torch.full((n, 1), -1) if history is None else history.expand(n, -1)
    return sampler(logits.expand(n, -1).clone(), history, g)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # Mass before each token: 0, .5, .8, .95; a token is dropped when that exceeds p.
    kept = set(sample_top_p(probs.expand(2000, -1).clone(), 0.75, torch.Generator().manual_seed(0)).flatten().tolist())
    assert kept == {0, 1}
    kept = set(sample_top_p(probs.expand(2000, -1).clone(), 0.85, torch.Generator().manual_seed(0)).flatten().tolist())
    assert kept == {0, 1, 2}


def test_renormalised_frequencies_match_the_kept_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = sample_top_p(probs.expand(20000, -1).clone(), 0.75, torch.Generator().manual_seed(1)).flatten()
    assert (out == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.015)


def test_temperature_zero_is_argmax_and_defaults_are_meta():
    logits = torch.tensor([[0.1, 2.0, 1.9, -1.0]])
    assert draws(Sampler(temperature=0), logits, n=3).tolist() == [1, 1, 1]
    s = Sampler()
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.6, 0.9, None, 1.0)


def test_top_k_limits_choices_and_keeps_ties():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    assert set(draws(Sampler(temperature=1.0, top_p=1.0, top_k=2), logits).tolist()) == {0, 1}
    assert set(draws(Sampler(temperature=1.0, top_p=1.0), logits).tolist()) == {0, 1, 2, 3}
    tied = keep_top_k(torch.tensor([[3.0, 1.0, 1.0, 0.0]]), 2)
    assert torch.isinf(tied).tolist() == [[False, False, False, True]]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 2.0, -1.0, 0.5]])
    history = torch.tensor([[0, 1, 1, -1]])  # -1 is padding, ignored
    out = apply_repetition_penalty(logits, history, 2.0)
    assert out.tolist() == [[1.0, -2.0, 2.0, -1.0, 0.5]]
    # Greedy would repeat token 0; the penalty hands the choice to token 2.
    assert draws(Sampler(temperature=0, repetition_penalty=1.5), logits, n=1, history=torch.tensor([[0]])).item() == 2


def test_sampling_frequencies_follow_temperature():
    logits = torch.tensor([[math.log(0.75), math.log(0.25)]])
    hot = draws(Sampler(temperature=2.0, top_p=1.0), logits, n=20000)
    # at T=2 the probabilities become sqrt(.75):sqrt(.25) -> 0.634
    assert (hot == 0).float().mean().item() == pytest.approx(math.sqrt(3) / (math.sqrt(3) + 1), abs=0.015)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-1), "temperature=-1"),
        (dict(top_p=0), r"top_p=0 is outside"),
        (dict(top_k=0), "top_k=0"),
        (dict(top_k=2.5), "top_k=2.5"),
        (dict(repetition_penalty=0), "repetition_penalty=0"),
    ],
)
def test_bad_values_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler(**kwargs)
