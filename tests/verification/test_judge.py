"""The verdict from scores, on hand-made distributions (pure, fast)."""

from __future__ import annotations

import math

from inference.base import PositionScore
from market.settings import MarketSettings, nested
from market.verify.reexec import Tolerances, judge
from market.verify.sampling import (
    draw,
    reputation_after_fraud,
    reputation_after_honest,
    sample_rate,
)
from protocol import fingerprint
from protocol.receipt import SamplingParams

LOGP = {1: math.log(0.6), 2: math.log(0.3), 3: math.log(0.09), 4: math.log(0.01)}


def _scores(tokens):
    top = sorted(LOGP.items(), key=lambda kv: -kv[1])
    return [PositionScore(token_id=t, logprob=LOGP[t], top=top) for t in tokens]


def test_greedy_requires_argmax_within_tolerance() -> None:
    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=3)
    tight = Tolerances(greedy_logprob_tol=0.5)
    assert not judge(greedy, _scores([1, 1, 1]), [1, 1, 1], tolerances=tight).fraud
    verdict = judge(greedy, _scores([1, 2, 1]), [1, 2, 1], tolerances=tight)
    assert verdict.fraud
    ev = verdict.evidence[0]
    assert (ev.position, ev.claimed_token, ev.expected_token, ev.reason) == (1, 2, 1, "not_argmax")
    # 0.6 vs 0.3 is a 0.69-nat gap: inside a 0.8 tolerance.
    assert not judge(greedy, _scores([1, 2, 1]), [1, 2, 1],
                     tolerances=Tolerances(greedy_logprob_tol=0.8)).fraud


def test_top_p_membership() -> None:
    nucleus = SamplingParams(temperature=1.0, top_p=0.5, max_tokens=4)
    # Only token 1 (0.6) is inside top_p=0.5; token 3 has 0.9 of mass above it.
    tol = Tolerances(logprob_tol=0.1, top_p_tol=0.05)
    assert not judge(nucleus, _scores([1, 1, 1, 1]), [1, 1, 1, 1], tolerances=tol).fraud
    verdict = judge(nucleus, _scores([1, 3, 1, 1]), [1, 3, 1, 1], tolerances=tol)
    assert verdict.fraud and verdict.evidence[0].reason == "outside_top_p"


def test_truncation() -> None:
    params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=10)
    verdict = judge(params, _scores([1, 1]), [1, 1], finish_reason="length")
    assert verdict.fraud and "truncated" in verdict.reasons[0]
    # ... unless the node's context was full.
    assert not judge(params, _scores([1, 1]), [1, 1], finish_reason="length",
                     context_exhausted=True).fraud
    # A natural stop where end-of-generation (token 4) is far from the argmax.
    eog = _scores([4])[0]
    verdict = judge(params, _scores([1, 1]), [1, 1], eog_score=eog, eog_token_ids=[4])
    assert verdict.fraud  # log(0.6 / 0.01) = 4.1 nats from the argmax
    eog_ok = PositionScore(token_id=4, logprob=math.log(0.7),
                           top=[(4, math.log(0.7)), (1, math.log(0.3))])
    assert not judge(params, _scores([1, 1]), [1, 1], eog_score=eog_ok, eog_token_ids=[4]).fraud


def test_sampling_policy_and_reputation() -> None:
    s = MarketSettings(**nested(dict(verify__first_jobs=3, verify__sample_rate=0.05, verify__low_reputation=0.5)))
    assert sample_rate(s, prior_jobs=0, reputation=0.9) == 1.0
    assert sample_rate(s, prior_jobs=3, reputation=0.9) == 0.05
    assert sample_rate(s, prior_jobs=3, reputation=0.25) > 0.5
    assert sample_rate(s, prior_jobs=3, reputation=0.0) == 1.0
    draws = [draw(b"k", f"{i:064x}") for i in range(2000)]
    assert 0.03 < sum(d < 0.05 for d in draws) / len(draws) < 0.07
    assert draw(b"k", "aa") == draw(b"k", "aa") != draw(b"other", "aa")
    assert reputation_after_honest(0.5, s) > 0.5
    assert reputation_after_fraud(0.8, s) == 0.4


def _with_excess(tokens, excess):
    top = sorted(LOGP.items(), key=lambda kv: -kv[1])
    return [PositionScore(token_id=t, logprob=LOGP[t], top=top, sampler_excess=e)
            for t, e in zip(tokens, excess, strict=True)]


def test_sampled_tokens_must_be_the_samplers_choice() -> None:
    import json

    sampled = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=3)
    tol = Tolerances()
    honest = judge(sampled, _with_excess([1, 2, 1], [0.0, 0.3, -1.0]), [1, 2, 1], tolerances=tol)
    assert not honest.fraud and honest.stats["max_sampler_excess"] == 0.3
    cheat = judge(sampled, _with_excess([1, 2, 1], [0.0, tol.sampler_tol + 0.1, 0.0]),
                  [1, 2, 1], tolerances=tol)
    assert cheat.fraud
    assert [e.position for e in cheat.evidence if e.reason == "sampler_not_followed"] == [1]
    # positions with nothing to compare (-inf) leave the stats finite: they are stored as JSON
    empty = judge(sampled, _with_excess([1, 2, 1], [-math.inf] * 3), [1, 2, 1], tolerances=tol)
    assert not empty.fraud and empty.stats["max_sampler_excess"] is None
    json.dumps(empty.as_dict(), allow_nan=False)
    # an engine that cannot compute it: the check is skipped, and the stats say so
    unknown = judge(sampled, _scores([1, 2, 1]), [1, 2, 1], tolerances=tol)
    assert unknown.stats["sampler_checked"] is False


def _rows(top_of, tokens, shift: float = 0.0) -> bytes:
    return b"".join(fingerprint.encode_row([(t, lp + shift) for t, lp in top_of(t)])
                    for t in tokens)


def test_the_fingerprint_must_describe_the_verifiers_distribution() -> None:
    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=4)
    top = sorted(LOGP.items(), key=lambda kv: -kv[1])
    claimed = [1, 1, 1, 1]
    honest = _rows(lambda _: top, claimed)
    verdict = judge(greedy, _scores(claimed), claimed, fingerprint=honest)
    assert not verdict.fraud
    assert verdict.stats["fingerprint_checked"] and verdict.stats["fingerprint_mean_dev"] < 0.01

    # the same tokens chosen, from other numbers (another model or quantisation)
    other = [(1, math.log(0.8)), (2, math.log(0.1)), (3, math.log(0.05)), (4, math.log(0.05))]
    verdict = judge(greedy, _scores(claimed), claimed, fingerprint=_rows(lambda _: other, claimed))
    assert verdict.fraud and any("fingerprint" in r for r in verdict.reasons)
    assert verdict.stats["fingerprint_mean_dev"] > 0.15

    # other tokens ranked first: not found among the verifier's
    elsewhere = [(7, -0.1), (8, -2.5), (9, -3.0), (10, -4.0)]
    verdict = judge(greedy, _scores(claimed), claimed,
                    fingerprint=_rows(lambda _: elsewhere, claimed))
    assert verdict.fraud and verdict.stats["fingerprint_incomplete"] == 1.0

    # a receipt from before fingerprints: not checked, and said so
    assert judge(greedy, _scores(claimed), claimed).stats["fingerprint_checked"] is False
    # rows that do not match the output: proof of a bad receipt
    verdict = judge(greedy, _scores(claimed), claimed, fingerprint=honest[:-8])
    assert verdict.fraud and "malformed" in verdict.reasons[0]
