"""Verification under everything that changes the logits before sampling: an output
constraint (``response_format``), presence/frequency penalties and ``logit_bias``.

The verifier re-applies the node's shaping at every position (``inference.shaping``):
real llama.cpp generations of constrained and penalised jobs pass at every
temperature, with the fingerprint still checked against the model's own logits, and a
node that declares the shaping but serves the job without it is judged fraud."""

from __future__ import annotations

import json
from typing import Any

import pytest

from market.settings import MarketSettings
from tests.verification.cheaters import ShapingIgnoringEngine
from tests.verification.workload import Generated, generate, verify

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "city": {"type": "string", "maxLength": 20}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person named Ada who lives in Paris."}]
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}


def _constrained(temperature: float, response_format: dict[str, Any], seed: int) -> dict[str, Any]:
    return {"messages": ASK, "temperature": temperature, "seed": seed, "max_tokens": 48,
            "response_format": response_format}


def _claimed_as(cheat: Generated, body: dict[str, Any]) -> Generated:
    """What a cheater's receipt says: the job it was sent, the output it produced."""
    cheat.body = body
    return cheat


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("response_format", [SCHEMA_FORMAT, {"type": "json_object"}],
                         ids=["json_schema", "json_object"])
def test_a_constrained_job_is_valid_json_and_its_node_is_not_slashed(
        honest_engine, temperature: float, response_format: dict[str, Any]) -> None:
    tol = MarketSettings().verify.tolerances
    for seed in (1, 2):
        body = _constrained(temperature, response_format, seed)
        gen = generate(honest_engine, "chat", body)
        if gen.finish_reason == "stop":  # a whole document: it parses and fits the schema
            value = json.loads(gen.text)
            assert isinstance(value, dict)
            if response_format is SCHEMA_FORMAT:
                assert set(value) == {"name", "age", "city"}
                assert isinstance(value["age"], int) and 0 <= value["age"] <= 120
        else:  # cut at max_tokens: still a prefix of one, in compact JSON
            assert gen.text.startswith("{") and "\n" not in gen.text
        verdict, _ = verify(honest_engine, honest_engine, gen, tol)
        assert not verdict.fraud, (gen.text, verdict.reasons)
        assert verdict.stats["fingerprint_checked"] is True
        # the fingerprint is held against the model's own logits, not the masked ones
        assert verdict.stats["fingerprint_incomplete"] <= tol.fingerprint_incomplete_tol


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_node_that_ignores_the_constraint_is_caught(honest_engine, temperature: float) -> None:
    body = _constrained(temperature, SCHEMA_FORMAT, seed=3)
    cheat = generate(ShapingIgnoringEngine(honest_engine), "chat", body)
    honest = generate(honest_engine, "chat", body)
    assert cheat.token_ids != honest.token_ids  # the mask changed the output
    verdict, _ = verify(honest_engine, honest_engine, _claimed_as(cheat, body))
    assert verdict.fraud, verdict.stats
    reasons = {e.reason for e in verdict.evidence}
    assert reasons & {"not_argmax", "impossible_token", "sampler_not_followed"}, reasons


# An ignored shaping is caught where it moves a token by more than the verifier's
# numeric tolerance (1.5 nats, greedy and sampled alike): a presence penalty of 1.8
# alone moved none by more than 1.27 at T=0 here, and one of −1 stays under it at any
# temperature (measured; the README's threat model says so).
PENALISED = [
    pytest.param(0.0, {"frequency_penalty": 1.5, "presence_penalty": 0.5}, id="frequency-T0"),
    pytest.param(1.0, {"frequency_penalty": 1.5, "presence_penalty": 0.5}, id="frequency-T1"),
    pytest.param(1.0, {"presence_penalty": 1.8}, id="presence-T1"),
    pytest.param(1.0, {"presence_penalty": -2.0}, id="negative-presence-T1"),
    pytest.param(0.0, {"logit_bias": {"28": -100, "30": 4.0, "253": 2.5}}, id="bias-T0"),
    pytest.param(1.0, {"logit_bias": {"28": -100, "30": 4.0, "253": 2.5}}, id="bias-T1"),
]


@pytest.mark.parametrize("temperature,shaping", PENALISED)
def test_penalties_and_bias_honest_pass_ignored_caught(
        honest_engine, temperature: float, shaping: dict[str, Any]) -> None:
    body = {"prompt": "List of fruits: apple, banana, apple, banana,", "temperature": temperature,
            "seed": 11, "max_tokens": 32, **shaping}
    honest = generate(honest_engine, "completion", body)
    plain = generate(honest_engine, "completion",
                     {k: v for k, v in body.items() if k not in shaping})
    assert honest.token_ids != plain.token_ids  # the shaping mattered here
    verdict, _ = verify(honest_engine, honest_engine, honest)
    assert not verdict.fraud, verdict.reasons
    cheat = generate(ShapingIgnoringEngine(honest_engine), "completion", body)
    assert cheat.token_ids == plain.token_ids
    verdict, _ = verify(honest_engine, honest_engine, _claimed_as(cheat, body))
    assert verdict.fraud, verdict.stats


def test_a_bias_of_100_forces_its_token_and_minus_100_bans_it(honest_engine) -> None:
    body = {"prompt": "The cat sat on the", "temperature": 1.0, "seed": 5, "max_tokens": 12}
    forced = generate(honest_engine, "completion", {**body, "logit_bias": {"28": 100}})
    assert forced.token_ids == [28] * 12
    plain = generate(honest_engine, "completion", body)
    banned_token = plain.token_ids[0]
    banned = generate(honest_engine, "completion",
                      {**body, "logit_bias": {str(banned_token): -100}})
    assert banned_token not in banned.token_ids
