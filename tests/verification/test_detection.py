"""Cheats caught by re-execution with the real llama.cpp verifier, greedy and sampled.

Each cheat runs the real engine and signs a valid receipt naming the honest model:
only re-execution can tell. Seeds are fixed, so each case is deterministic."""

from __future__ import annotations

import pytest

from tests.verification.cheaters import EditingEngine, TruncatingEngine
from tests.verification.workload import generate, verify

pytestmark = pytest.mark.slow

CHAT = {"messages": [{"role": "user", "content": "Tell me a short story about a dragon."}]}


def _cheat(honest_engine, label, different_model_engine):
    if label == "other_model":
        return different_model_engine
    engine = {
        "edit_text": lambda: EditingEngine(honest_engine, mode="text"),
        "edit_tokens": lambda: EditingEngine(honest_engine, mode="tokens"),
        "truncate_stop": lambda: TruncatingEngine(honest_engine, 0.4, "stop"),
        "truncate_length": lambda: TruncatingEngine(honest_engine, 0.4, "length"),
    }[label]()
    engine.model = honest_engine.model
    return engine


CASES = [
    (label, temperature, top_p)
    for temperature, top_p in [(0.0, 1.0), (0.7, 0.9), (1.0, 1.0)]
    for label in ["edit_text", "edit_tokens", "truncate_stop", "truncate_length", "other_model"]
    # At temperature 1 with top_p 1 every token is allowed: a short injected phrase, a
    # degenerate cheaper model or a stop cut where the model gives end-of-generation
    # some mass (above verify_eos_min_logprob) is only caught statistically (rates in
    # bench/verify.py); which seed is caught depends on the llama.cpp build.
    if not (temperature == 1.0 and label in ("edit_tokens", "other_model", "truncate_stop"))
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


def test_honest_same_jobs_pass(honest_engine) -> None:
    for temperature, top_p in [(0.0, 1.0), (0.7, 0.9), (1.0, 1.0)]:
        body = {**CHAT, "max_tokens": 40, "temperature": temperature, "top_p": top_p, "seed": 7}
        gen = generate(honest_engine, "chat", body)
        verdict, _ = verify(honest_engine, honest_engine, gen)
        assert not verdict.fraud, (temperature, verdict.reasons)
