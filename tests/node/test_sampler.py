"""The protocol sampler (inference.sampler): statistically what the buyer asked for, and
a function of (distribution, seed, position) that a verifier can recompute."""

from __future__ import annotations

import numpy as np
import pytest

from inference.sampler import (
    gumbel_noise,
    nucleus,
    sample,
    sampler_excess,
    sampler_key,
    sure_nucleus,
    tempered_logprobs,
)

# chi-square critical values at p = 0.001 by degrees of freedom
CHI2_CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}

LOGITS = np.array([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0], dtype=np.float32)


def _frequencies(temperature: float, top_p: float, draws: int) -> np.ndarray:
    key = sampler_key(2024)
    counts = np.zeros(len(LOGITS))
    for position in range(draws):
        counts[sample(LOGITS, temperature, top_p, key, position)] += 1
    return counts


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8), (1.6, 0.95)])
def test_token_frequencies_follow_the_tempered_truncated_distribution(temperature, top_p):
    draws = 6000
    counts = _frequencies(temperature, top_p, draws)
    tempered = tempered_logprobs(LOGITS, temperature)
    keep = nucleus(tempered, top_p)
    expected = np.zeros(len(LOGITS))
    expected[keep] = np.exp(tempered[keep]) / np.exp(tempered[keep]).sum()
    assert counts[np.setdiff1d(np.arange(len(LOGITS)), keep)].sum() == 0  # never outside
    want = expected[keep] * draws
    statistic = float(((counts[keep] - want) ** 2 / want).sum())
    assert statistic < CHI2_CRITICAL[len(keep) - 1], (counts, want)


def test_the_same_seed_reproduces_and_another_seed_differs() -> None:
    def run(seed: int) -> list[int]:
        key = sampler_key(seed)
        return [sample(LOGITS, 1.0, 1.0, key, p) for p in range(200)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(-5) == run(2**64 - 5)  # OpenAI's seed is any integer: 64-bit two's complement


def test_positions_draw_independent_noise() -> None:
    """Counter streams of neighbouring positions never overlap (no shifted copies)."""
    key = sampler_key(1)
    a, b = gumbel_noise(key, 10, 4096), gumbel_noise(key, 11, 4096)
    assert not np.intersect1d(a, b).size
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.05
    assert np.array_equal(a, gumbel_noise(key, 10, 4096))
    # a standard Gumbel: mean is Euler's constant
    assert abs(gumbel_noise(key, 3, 200_000).mean() - 0.5772) < 0.01


def test_greedy_at_temperature_zero() -> None:
    key = sampler_key(3)
    assert {sample(LOGITS, 0.0, 1.0, key, p) for p in range(50)} == {0}


def test_excess_is_zero_for_the_sampled_token_and_positive_for_others() -> None:
    key = sampler_key(99)
    lp = tempered_logprobs(LOGITS, 1.0)
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)]:
        for position in range(30):
            token = sample(LOGITS, temperature, top_p, key, position)
            assert sampler_excess(lp, token, temperature, top_p, key, position) <= 1e-9
            others = [t for t in nucleus(tempered_logprobs(LOGITS, max(temperature, 1e-6)),
                                          top_p) if t != token]
            if others:
                worst = max(sampler_excess(lp, t, temperature, top_p, key, position)
                            for t in others)
                assert worst > 0


def test_a_small_logit_perturbation_moves_the_excess_only_a_little() -> None:
    """What the verifier's tolerance rests on: honest numeric noise of ε nats moves the
    excess by at most 2ε."""
    rng = np.random.default_rng(5)
    key = sampler_key(11)
    for position in range(200):
        logits = rng.normal(size=64) * 3
        token = sample(logits, 1.0, 1.0, key, position)
        noisy = logits + rng.uniform(-0.1, 0.1, size=64)
        assert sampler_excess(tempered_logprobs(noisy, 1.0), token, 1.0, 1.0, key,
                              position) <= 0.2 + 1e-9


def test_the_sure_nucleus_is_inside_every_nearby_distributions_nucleus() -> None:
    """The verifier compares only tokens an honest node (whose numbers differ by the
    noise allowed) had in its nucleus too: a wrongly included token would make an honest
    node look like it skipped a better one."""
    rng = np.random.default_rng(8)
    for _ in range(300):
        logits = rng.normal(size=40) * rng.uniform(0.5, 4)
        temperature, top_p = rng.choice([0.3, 0.7, 1.0, 1.4]), rng.choice([0.3, 0.5, 0.9])
        noise = 0.5
        sure = set(sure_nucleus(tempered_logprobs(logits, temperature), top_p, temperature,
                                noise).tolist())
        for _ in range(5):
            node = logits + rng.uniform(-noise, noise, size=40)
            assert sure <= set(nucleus(tempered_logprobs(node, temperature), top_p).tolist())
    # and it is not empty, nor the whole vocabulary at top_p < 1 for a peaked distribution
    peaked = np.array([5.0, 4.0, 1.0, 0.0, -1.0])
    assert len(sure_nucleus(tempered_logprobs(peaked, 1.0), 0.9, 1.0, 0.1)) in (1, 2)


def test_the_partial_sort_gives_the_full_sorts_nucleus_on_a_real_sized_vocabulary() -> None:
    rng = np.random.default_rng(21)
    for _ in range(40):
        logits = rng.normal(size=49_152) * rng.uniform(0.5, 6)
        logits[rng.integers(0, 49_152, size=50)] = logits.max()  # ties at the top
        temperature, top_p = rng.choice([0.5, 1.0, 1.5]), rng.choice([0.5, 0.9, 0.99])
        tempered = tempered_logprobs(logits, temperature)
        order = np.argsort(-tempered, kind="stable")
        cutoff = int(np.searchsorted(np.cumsum(np.exp(tempered[order])), top_p)) + 1
        assert nucleus(tempered, top_p).tolist() == order[:cutoff].tolist()
        full = order, tempered[order]
        w = 2.0 * 0.5 / temperature
        reach = np.maximum(np.searchsorted(-full[1], -(full[1] - 2 * w), side="left"),
                           np.arange(1, len(order) + 1))
        above = np.cumsum(np.exp(full[1]))[reach - 1] - np.exp(full[1])
        expected = order[: int(np.count_nonzero(np.exp(w) * above < top_p))]
        assert sure_nucleus(tempered, top_p, temperature, 0.5).tolist() == expected.tolist()
