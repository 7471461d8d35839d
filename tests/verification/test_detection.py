"""Cheats caught by re-execution with the real llama.cpp verifier, greedy and sampled.

Each cheat runs the real engine and signs a valid receipt naming the honest model:
only re-execution can tell. Seeds are fixed, so each case is deterministic."""

from __future__ import annotations

import pytest

from tests.verification.cheaters import output_cheat
from tests.verification.workload import generate, verify

pytestmark = pytest.mark.slow

CHAT = {"messages": [{"role": "user", "content": "Tell me a short story about a dragon."}]}


def _cheat(honest_engine, label, different_model_engine):
    if label == "other_model":
        return different_model_engine
    return output_cheat(label, honest_engine)


CASES = [
    (label, temperature, top_p)
    for temperature, top_p in [(0.0, 1.0), (0.7, 0.9), (1.0, 1.0), (1.0, 0.9), (0.7, 1.0)]
    for label in ["edit_text", "edit_tokens", "truncate_stop", "truncate_length", "other_model"]
    # Every sampled token, and a claimed stop, is checked against the protocol sampler
    # (inference.sampler): a cheaper model, edited ids or a cut are caught at any
    # temperature, exactly, not by the luck of a statistic.
] + [
    # the right model and distribution with the node's own randomness: statistically
    # honest, so only the protocol sampler can tell (greedy jobs have no randomness)
    ("sampler_not_followed", temperature, top_p)
    for temperature, top_p in [(1.0, 1.0), (1.0, 0.9), (0.7, 1.0)]
] + [
    pytest.param("sampler_not_followed", 0.7, 0.9, marks=pytest.mark.xfail(
        strict=True, reason="known limit: with 0.5 nats of assumed nucleus noise the "
        "tokens surely inside a top_p=0.9 nucleus at T=0.7 are often the top token alone, "
        "so a node that takes it where the protocol drew another is not provably wrong "
        "(README, bench/verify.py)")),
]


@pytest.mark.parametrize("label,temperature,top_p", CASES)
def test_cheat_detected(label, temperature, top_p, honest_engine, different_model_engine) -> None:
    body = {**CHAT, "max_tokens": 40, "temperature": temperature, "top_p": top_p, "seed": 7}
    cheat = _cheat(honest_engine, label, different_model_engine)
    gen = generate(cheat, "chat", body)
    verdict, _ = verify(honest_engine, cheat, gen)
    assert verdict.fraud, (label, gen.text, verdict.stats)
    assert verdict.reasons
    if label == "edit_text":
        assert verdict.stats["text_mismatch"] is True
    if label.startswith("truncate"):
        assert any("truncated" in r for r in verdict.reasons), verdict.reasons
    if label == "truncate_stop" and temperature > 0:
        assert "eog_sampler_excess" in verdict.stats, verdict.stats
    if label == "sampler_not_followed":
        honest = generate(honest_engine, "chat", body)
        assert honest.token_ids != gen.token_ids  # the cheat changed the draw
        assert verdict.stats["fingerprint_checked"] is True
        # the model is the right one: only the sampler check fires
        assert not any(r.startswith("fingerprint") for r in verdict.reasons), verdict.reasons
    if label in ("other_model", "edit_tokens", "sampler_not_followed") and temperature > 0:
        # caught exactly, by the sampler check, not by luck of the statistics
        assert verdict.stats["sampler_checked"] is True
        assert any(e.reason == "sampler_not_followed" for e in verdict.evidence), verdict.reasons


def test_honest_same_jobs_pass(honest_engine) -> None:
    for temperature, top_p in [(0.0, 1.0), (0.7, 0.9), (1.0, 1.0), (1.0, 0.9), (0.7, 1.0)]:
        body = {**CHAT, "max_tokens": 40, "temperature": temperature, "top_p": top_p, "seed": 7}
        gen = generate(honest_engine, "chat", body)
        verdict, _ = verify(honest_engine, honest_engine, gen)
        assert not verdict.fraud, (temperature, verdict.reasons)
        if temperature > 0:
            assert verdict.stats["sampler_checked"] is True
            worst = verdict.stats["max_sampler_excess"]  # None: nothing compared anywhere
            if top_p == 1.0:  # the whole vocabulary is compared: never None
                assert worst is not None
            assert worst is None or worst <= 1e-6  # same engine: exact
