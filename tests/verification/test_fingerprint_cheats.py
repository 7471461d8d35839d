"""The computation fingerprint catches work that yields plausible tokens from the wrong
computation: a requantised or perturbed copy of the model, a shortened or altered
prompt — greedy, where the token checks alone allow any near-tie, and sampled."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from inference.base import Engine
from market.verify.engine import run_sync
from tests.verification.cheaters import (
    DifferentModelEngine,
    PromptAlteringEngine,
    _Wrapper,
    perturbed_gguf,
    requantised_gguf,
)
from tests.verification.workload import generate, verify

pytestmark = pytest.mark.slow

SYSTEM = "You are a concise assistant. Answer in plain words, avoid lists, keep to the point."
CHAT = {"messages": [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": "Explain how a bicycle works."}]}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cheap-models")
    return {
        "q2_k": requantised_gguf("Q2_K", d / "q2_k.gguf"),
        "q3_k_m": requantised_gguf("Q3_K_M", d / "q3_k_m.gguf"),
        "norms_perturbed": perturbed_gguf(0.05, d / "perturbed.gguf"),
    }


@pytest.fixture(scope="module", params=["q2_k", "q3_k_m", "norms_perturbed"])
def other_model(request: pytest.FixtureRequest, models: dict[str, Path],
                honest_engine: Engine) -> Iterator[Engine]:
    engine = DifferentModelEngine(models[request.param], honest_engine)  # type: ignore[arg-type]
    run_sync(engine.start())
    yield engine
    run_sync(engine.inner.close())


def _assert_fingerprint_caught(verdict) -> None:
    assert verdict.fraud, verdict.stats
    assert verdict.stats["fingerprint_checked"] is True
    assert any(r.startswith("fingerprint") for r in verdict.reasons), verdict.reasons


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0)])
def test_a_cheaper_copy_of_the_model_is_caught_by_its_fingerprint(
        other_model, honest_engine, temperature, top_p) -> None:
    body = {**CHAT, "max_tokens": 32, "temperature": temperature, "top_p": top_p, "seed": 3}
    gen = generate(other_model, "chat", body)
    verdict, _ = verify(honest_engine, other_model, gen)
    _assert_fingerprint_caught(verdict)


@pytest.mark.parametrize("mode", ["shorten", "alter"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_a_shortened_or_altered_prompt_is_caught(honest_engine, mode, temperature) -> None:
    cheat = PromptAlteringEngine(honest_engine, mode)  # type: ignore[arg-type]
    cheat.model = honest_engine.model
    body = {**CHAT, "max_tokens": 32, "temperature": temperature, "top_p": 0.9, "seed": 3}
    gen = generate(cheat, "chat", body)
    verdict, _ = verify(honest_engine, cheat, gen)
    _assert_fingerprint_caught(verdict)


def test_an_honest_node_with_another_kv_cache_passes_the_fingerprint(honest_engine) -> None:
    from inference.llamacpp import LlamaCppEngine

    node = LlamaCppEngine(n_threads=2, kv_f32=False)
    run_sync(node.start())
    try:
        for temperature in (0.0, 1.0):
            body = {**CHAT, "max_tokens": 32, "temperature": temperature, "seed": 3}
            gen = generate(node, "chat", body)
            verdict, _ = verify(honest_engine, node, gen)
            assert not verdict.fraud, verdict.reasons
            assert verdict.stats["fingerprint_checked"] is True
            assert verdict.stats["fingerprint_mean_dev"] <= 0.2
    finally:
        run_sync(node.close())


class _OtherEngineName(_Wrapper):
    """The honest model, served by the honest engine, under another engine's name (what a
    transformers or vLLM node's receipt says)."""

    def __init__(self, honest: Engine) -> None:
        super().__init__(honest)  # type: ignore[arg-type]
        self.name = "transformers"


def test_a_node_on_another_engine_is_held_to_the_cross_engine_tolerance(honest_engine) -> None:
    """Two implementations of one model differ by more than one does (bench/honest.py),
    so the verifier applies ``fingerprint_mean_tol_cross_engine`` when the receipt names
    another engine than its own, and the same-engine limit otherwise."""
    from market.settings import MarketSettings

    node = _OtherEngineName(honest_engine)
    node.model = honest_engine.model
    gen = generate(node, "chat", {**CHAT, "max_tokens": 24, "temperature": 0.0})
    strict = MarketSettings().verify.tolerances.model_copy(update={
        "fingerprint_mean_tol": -1.0, "fingerprint_mean_tol_cross_engine": 10.0})
    verdict, _ = verify(honest_engine, node, gen, strict)
    assert verdict.stats["cross_engine"] is True
    assert not verdict.fraud, verdict.reasons  # judged by the cross-engine limit (10)
    verdict, _ = verify(honest_engine, honest_engine, gen, strict)
    assert verdict.stats["cross_engine"] is False
    assert verdict.fraud and any(r.startswith("fingerprint") for r in verdict.reasons)
