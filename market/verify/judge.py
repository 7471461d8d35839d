"""The verdict from a verifier's scores: pure functions, no engine, no I/O.

* greedy jobs (temperature 0): every claimed token must be the verifier's argmax
  within a logit tolerance: ``claimed_logprob >= best_logprob - greedy_tol``;
* sampled jobs: every claimed token must lie inside the top-p set of the tempered
  distribution (under either convention: temperature before top-p as in
  OpenAI/vLLM/HF, or after it as in llama.cpp), with a mass and a logit tolerance;
  no token may be practically impossible; and the sequence log-likelihood must be
  plausible: a one-sided z-test of the summed surprise against its expectation and
  variance under the verifier's tempered distribution. The test only flags outputs
  that are *less* likely than honest sampling would give, so nodes that truncate the
  distribution further (top-k, min-p) are never penalised;
* truncation: a claimed natural stop where the verifier puts negligible mass on
  end-of-generation;
* the computation fingerprint (``protocol.fingerprint``), at any temperature: the
  node's committed top tokens and log-probabilities must be the verifier's, within
  measured noise.

Tolerances come from measured numeric noise (bench/verify.py) and live in settings
(``MarketSettings.verify.tolerances``).
"""


from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from inference.base import PositionScore
from market.settings import Tolerances
from protocol import fingerprint as fp
from protocol.job import SamplingParams

# "cancelled": the market stopped the node (its buyer left), so the output ends anywhere.
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class TokenEvidence:
    position: int
    claimed_token: int
    expected_token: int | None
    claimed_logprob: float
    expected_logprob: float | None
    reason: str
    detail: dict[str, float] = field(default_factory=dict)


@dataclass
class Verdict:
    """The outcome of one re-execution. ``fraud`` decides slashing."""

    fraud: bool
    reasons: list[str] = field(default_factory=list)
    evidence: list[TokenEvidence] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, max_evidence: int = 32) -> dict[str, Any]:
        return {
            "fraud": self.fraud,
            "reasons": list(self.reasons),
            "evidence": [asdict(e) for e in self.evidence[:max_evidence]],
            "evidence_total": len(self.evidence),
            "stats": dict(self.stats),
        }


def _logsumexp(values: Sequence[float]) -> float:
    if not values:
        return -math.inf
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def _candidates(score: PositionScore) -> dict[int, float]:
    """token id -> T=1 logprob for every token the verifier reported at this position."""
    cands = {int(t): float(lp) for t, lp in score.top}
    cands.setdefault(int(score.token_id), float(score.logprob))
    return cands


@dataclass(frozen=True)
class _Tempered:
    """The verifier's distribution at one position, tempered, from a top-k view.

    The tail beyond top-k is bounded, never guessed in the node's favour's opposite:
    the partition function uses the reported tokens only (a lower bound), so tempered
    probabilities of reported tokens are upper bounds, and the expected surprise
    treats the unreported tail as uniform over the rest of the vocabulary (an upper
    bound of its entropy). Both choices can only make honest output look *more*
    plausible.
    """

    lse: float  # log partition of the reported tokens at temperature T
    full_lse: float  # log partition with the tail estimated as uniform
    entropy: float  # expected surprise (nats), tail included as uniform
    variance: float  # variance of surprise, tail included as uniform
    tail_mass: float  # tempered mass not reported (estimate)


def _tempered(cands: dict[int, float], temperature: float, vocab_size: int) -> _Tempered:
    scaled = [lp / temperature for lp in cands.values()]
    lse = _logsumexp(scaled)
    # T=1 tail mass is exact (logprobs are normalised over the vocabulary).
    reported_mass_t1 = min(1.0, sum(math.exp(lp) for lp in cands.values()))
    tail_t1 = max(0.0, 1.0 - reported_mass_t1)
    n_tail = max(1, vocab_size - len(cands))
    if tail_t1 > 0.0:
        # Tempered weight of the tail if spread uniformly (its maximum for T >= 1, and
        # a fair estimate for T < 1 where the tail matters little anyway).
        per_token_lp = math.log(tail_t1 / n_tail)
        tail_weight_log = math.log(n_tail) + per_token_lp / temperature
        full_lse = _logsumexp([lse, tail_weight_log])
    else:
        tail_weight_log = -math.inf
        full_lse = lse
    probs = [math.exp(s - full_lse) for s in scaled]
    surprises = [full_lse - s for s in scaled]
    tail_mass = 0.0 if tail_weight_log == -math.inf else math.exp(tail_weight_log - full_lse)
    entropy = sum(p * s for p, s in zip(probs, surprises, strict=True))
    second = sum(p * s * s for p, s in zip(probs, surprises, strict=True))
    if tail_mass > 0.0:
        tail_surprise = full_lse - per_token_lp / temperature
        entropy += tail_mass * tail_surprise
        second += tail_mass * tail_surprise * tail_surprise
    variance = max(0.0, second - entropy * entropy)
    return _Tempered(
        lse=lse, full_lse=full_lse, entropy=entropy, variance=variance, tail_mass=tail_mass
    )


def _log_partition_upper(cands: dict[int, float], temperature: float, vocab_size: int) -> float:
    """An upper bound of log sum_v p(v)^(1/T) over the WHOLE vocabulary.

    Reported tokens are exact; every unreported token has p <= the smallest reported
    one and together they hold the (exact) T=1 tail mass. For T >= 1 the tail's
    tempered weight is largest when spread uniformly; for T < 1 when packed into
    tokens as likely as the smallest reported one.
    """
    scaled = [lp / temperature for lp in cands.values()]
    lse = _logsumexp(scaled)
    tail = 1.0 - min(1.0, sum(math.exp(lp) for lp in cands.values()))
    if tail <= 0.0:
        return lse
    n_tail = max(1, vocab_size - len(cands))
    if temperature >= 1.0:
        tail_log = math.log(n_tail) + (math.log(tail) - math.log(n_tail)) / temperature
    else:
        tail_log = math.log(tail) + (1.0 / temperature - 1.0) * min(cands.values())
    return _logsumexp([lse, tail_log])


def _mass_above(
    cands: dict[int, float], claimed_lp: float, temperature: float, tol: float, vocab_size: int
) -> float:
    """A lower bound of the tempered mass of tokens more likely than the claimed one by
    more than ``tol`` nats (so the top-p check errs towards the node)."""
    log_z = _log_partition_upper(cands, temperature, vocab_size)
    return sum(
        math.exp(lp / temperature - log_z) for lp in cands.values() if lp > claimed_lp + tol
    )


# ---- the verdict -------------------------------------------------------------------------


def judge(
    sampling: SamplingParams,
    scores: Sequence[PositionScore],
    claimed_token_ids: Sequence[int],
    *,
    finish_reason: FinishReason | None = None,
    eog_score: PositionScore | None = None,
    eog_token_ids: Sequence[int] = (),
    stop_explained: bool = False,
    context_exhausted: bool = False,
    tolerances: Tolerances | None = None,
    vocab_size: int = 262_144,
    fingerprint: bytes | None = None,
) -> Verdict:
    """Judge a claimed output from the verifier's per-position scores.

    ``scores`` must align with ``claimed_token_ids``. ``eog_score`` is the verifier's
    score of one end-of-generation token appended after the output (needed to judge a
    claimed natural stop); ``eog_token_ids`` are all ids that end generation.
    ``stop_explained``: the decoded text shows a stop string ended the output.
    ``context_exhausted``: prompt + output filled the node's context (an honest
    ``length`` short of ``max_tokens``).
    ``finish_reason`` defaults to what the counts imply. ``fingerprint``: the node's
    signed fingerprint rows (``protocol.fingerprint``), held against the verifier's top
    tokens at every position; None (receipts from before it): not checked.
    """
    tol = tolerances or Tolerances()
    verdict = Verdict(fraud=False)
    n = len(claimed_token_ids)
    if len(scores) != n:
        raise ValueError(f"{len(scores)} scores for {n} claimed tokens")
    if finish_reason is None:
        finish_reason = "length" if n >= sampling.max_tokens else "stop"

    worst_gap = 0.0
    if sampling.greedy:
        for i, (claimed, score) in enumerate(zip(claimed_token_ids, scores, strict=True)):
            if int(score.token_id) != int(claimed):
                raise ValueError(f"score at {i} is for token {score.token_id}, claimed {claimed}")
            best_tok, best_lp = max(_candidates(score).items(), key=lambda kv: kv[1])
            gap = best_lp - score.logprob
            worst_gap = max(worst_gap, gap)
            if gap > tol.greedy_logprob_tol:
                verdict.evidence.append(
                    TokenEvidence(
                        position=i,
                        claimed_token=int(claimed),
                        expected_token=int(best_tok),
                        claimed_logprob=round(score.logprob, 4),
                        expected_logprob=round(best_lp, 4),
                        reason="not_argmax",
                        detail={"gap": round(gap, 4)},
                    )
                )
        if verdict.evidence:
            verdict.fraud = True
            verdict.reasons.append(
                f"greedy: {len(verdict.evidence)} of {n} tokens are not the verifier's argmax "
                f"(tolerance {tol.greedy_logprob_tol} nats)"
            )
        verdict.stats["max_argmax_gap"] = round(worst_gap, 4)
        verdict.stats["mean_logprob"] = (
            round(sum(s.logprob for s in scores) / n, 4) if n else None
        )
    else:
        _judge_sampled(sampling, scores, claimed_token_ids, tol, verdict, vocab_size)
        _judge_sampler(scores, claimed_token_ids, tol, verdict)

    _judge_fingerprint(scores, fingerprint, tol, verdict)
    _judge_stop(sampling, finish_reason, n, eog_score, eog_token_ids, stop_explained,
                context_exhausted, tol, verdict)
    verdict.stats["tokens"] = n
    verdict.stats["finish_reason"] = finish_reason
    return verdict


def _judge_fingerprint(
    scores: Sequence[PositionScore],
    fingerprint: bytes | None,
    tol: Tolerances,
    verdict: Verdict,
) -> None:
    """The node's fingerprint must describe the verifier's distributions: its committed
    tokens found among the verifier's likely ones (``fingerprint_incomplete_tol`` of
    positions may miss one, from near-ties) at log-probabilities whose mean distance
    from the verifier's stays within ``fingerprint_mean_tol`` nats. Catches another
    model, quantisation or prompt even where it picks the same tokens."""
    if fingerprint is None or not scores:
        verdict.stats["fingerprint_checked"] = False
        return
    try:
        cmp = fp.compare(fingerprint, [s.fingerprint_top or s.top for s in scores],
                         margin=tol.fingerprint_margin, window=tol.fingerprint_window)
    except ValueError as exc:  # the cheap checks refuse these; a stored one is still proof
        verdict.fraud = True
        verdict.stats["fingerprint_checked"] = True
        verdict.reasons.append(f"fingerprint: malformed ({exc})")
        return
    verdict.stats.update({
        "fingerprint_checked": True,
        "fingerprint_incomplete": round(cmp.incomplete_fraction, 4),
        "fingerprint_mean_dev": round(cmp.mean_deviation, 4),
        "fingerprint_max_dev": round(cmp.max_deviation, 4),
    })
    if cmp.incomplete_fraction > tol.fingerprint_incomplete_tol:
        verdict.fraud = True
        verdict.reasons.append(
            f"fingerprint: at {cmp.incomplete} of {cmp.positions} positions the node's "
            f"committed tokens are not the verifier's likely tokens at the node's values "
            f"(tolerance {tol.fingerprint_incomplete_tol:.0%})")
    if cmp.mean_deviation > tol.fingerprint_mean_tol:
        verdict.fraud = True
        verdict.reasons.append(
            f"fingerprint: the node's log-probabilities sit {cmp.mean_deviation:.3f} nats "
            f"from the verifier's on average (tolerance {tol.fingerprint_mean_tol})")


def _judge_sampler(
    scores: Sequence[PositionScore],
    claimed_token_ids: Sequence[int],
    tol: Tolerances,
    verdict: Verdict,
) -> None:
    """Every sampled token must be the protocol sampler's choice (``inference.sampler``)
    on the verifier's numbers, within ``sampler_tol`` nats: exact, at any temperature.
    Skipped (and said so in the stats) when the verifier engine cannot compute it."""
    excesses = [s.sampler_excess for s in scores]
    if not scores or any(e is None for e in excesses):
        verdict.stats["sampler_checked"] = False
        return
    verdict.stats["sampler_checked"] = True
    # -inf: nothing to compare at a position; stats stay finite (they are stored as JSON)
    finite = [e for e in excesses if e is not None and math.isfinite(e)]
    worst = max(finite, default=-math.inf)
    verdict.stats["max_sampler_excess"] = round(worst, 4) if finite else None
    failed = 0
    for i, (claimed, score) in enumerate(zip(claimed_token_ids, scores, strict=True)):
        excess = score.sampler_excess
        if excess is None or excess <= tol.sampler_tol:
            continue
        failed += 1
        verdict.evidence.append(
            TokenEvidence(
                position=i,
                claimed_token=int(claimed),
                expected_token=None,
                claimed_logprob=round(score.logprob, 4),
                expected_logprob=None,
                reason="sampler_not_followed",
                detail={"excess": round(excess, 4)},
            )
        )
    if failed:
        verdict.fraud = True
        verdict.reasons.append(
            f"sampled: {failed} of {len(scores)} tokens are not what the protocol sampler "
            f"picks from the verifier's distribution with the job's seed "
            f"(tolerance {tol.sampler_tol} nats, worst {worst:.2f})"
        )


def _judge_sampled(
    sampling: SamplingParams,
    scores: Sequence[PositionScore],
    claimed_token_ids: Sequence[int],
    tol: Tolerances,
    verdict: Verdict,
    vocab_size: int,
) -> None:
    temperature = sampling.temperature
    top_p = sampling.top_p
    surprise_sum = 0.0
    entropy_sum = 0.0
    variance_sum = 0.0
    outside = 0
    impossible = 0
    for i, (claimed, score) in enumerate(zip(claimed_token_ids, scores, strict=True)):
        if int(score.token_id) != int(claimed):
            raise ValueError(f"score at {i} is for token {score.token_id}, claimed {claimed}")
        cands = _candidates(score)
        dist = _tempered(cands, temperature, vocab_size)
        claimed_lp = float(score.logprob)
        # Upper bound of the claimed token's tempered log-probability.
        tempered_lp = claimed_lp / temperature - dist.lse
        best_tok, best_lp = max(cands.items(), key=lambda kv: kv[1])
        surprise_sum += dist.full_lse - claimed_lp / temperature
        entropy_sum += dist.entropy
        variance_sum += dist.variance
        def evidence(reason: str, detail: dict[str, float]) -> TokenEvidence:
            return TokenEvidence(position=i, claimed_token=int(claimed),
                                 expected_token=int(best_tok),
                                 claimed_logprob=round(claimed_lp, 4),
                                 expected_logprob=round(best_lp, 4), reason=reason,
                                 detail=detail)

        if tempered_lp < tol.min_token_logprob:
            impossible += 1
            verdict.evidence.append(
                evidence("impossible_token", {"tempered_logprob": round(tempered_lp, 4)}))
            continue
        if top_p < 1.0:
            # Inside the nucleus under either convention, with slack.
            above_tempered = _mass_above(cands, claimed_lp, temperature, tol.logprob_tol,
                                         vocab_size)
            above_raw = _mass_above(cands, claimed_lp, 1.0, tol.logprob_tol, vocab_size)
            if min(above_tempered, above_raw) >= top_p + tol.top_p_tol:
                outside += 1
                verdict.evidence.append(evidence("outside_top_p", {
                    "mass_above": round(min(above_tempered, above_raw), 4), "top_p": top_p}))
    n = len(claimed_token_ids)
    if impossible:
        verdict.fraud = True
        verdict.reasons.append(
            f"sampled: {impossible} tokens have negligible probability under the verifier "
            f"(tempered logprob < {tol.min_token_logprob})"
        )
    if outside:
        verdict.fraud = True
        verdict.reasons.append(
            f"sampled: {outside} tokens lie outside the verifier's top-p={top_p} set "
            f"(slack {tol.top_p_tol})"
        )
    z = None
    excess = None
    if n:
        excess = (surprise_sum - entropy_sum) / n
        z = (surprise_sum - entropy_sum) / math.sqrt(max(variance_sum, 1e-9) + n * 0.01)
        if (
            n >= tol.min_tokens_for_ll
            and z > tol.z_threshold
            and excess > tol.min_excess_nats
        ):
            verdict.fraud = True
            verdict.reasons.append(
                f"sampled: sequence log-likelihood implausible (z={z:.2f} > {tol.z_threshold}, "
                f"excess {excess:.2f} nats/token > {tol.min_excess_nats})"
            )
    verdict.stats.update(
        {
            "mean_logprob": round(sum(s.logprob for s in scores) / n, 4) if n else None,
            "surprise_nats": round(surprise_sum, 4),
            "expected_surprise_nats": round(entropy_sum, 4),
            "z": round(z, 4) if z is not None else None,
            "excess_nats_per_token": round(excess, 4) if excess is not None else None,
            "outside_top_p": outside,
            "impossible_tokens": impossible,
        }
    )


def _judge_stop(
    sampling: SamplingParams,
    finish_reason: FinishReason,
    n: int,
    eog_score: PositionScore | None,
    eog_token_ids: Sequence[int],
    stop_explained: bool,
    context_exhausted: bool,
    tol: Tolerances,
    verdict: Verdict,
) -> None:
    if context_exhausted:
        return  # the context was full: generation had to end there
    if finish_reason == "cancelled":
        verdict.stats["stop_checked"] = False
        return  # the market ended it; the tokens themselves are still judged
    if finish_reason == "length":
        if n < sampling.max_tokens:
            verdict.fraud = True
            verdict.reasons.append(
                f"truncated: finish_reason 'length' after {n} of {sampling.max_tokens} tokens"
            )
        return
    if n >= sampling.max_tokens:
        return  # a stop on the very last allowed token is indistinguishable from length
    if stop_explained or eog_score is None or not eog_token_ids:
        # A stop string ended it, or no end-of-generation score: nothing to judge.
        verdict.stats["stop_checked"] = False
        return
    cands = _candidates(eog_score)
    eog_lps = [cands[t] for t in eog_token_ids if t in cands]
    eog_lp = _logsumexp(eog_lps)  # T=1 log-mass of end-of-generation
    best_lp = max(cands.values())
    verdict.stats["stop_checked"] = True
    verdict.stats["eog_logprob"] = round(eog_lp, 4) if eog_lp != -math.inf else None
    if sampling.greedy:
        best_eog = max(eog_lps) if eog_lps else -math.inf
        if best_eog < best_lp - tol.greedy_logprob_tol:
            verdict.fraud = True
            verdict.reasons.append(
                "truncated: greedy output stopped where end-of-generation is not the verifier's "
                f"argmax (eog logprob {best_eog:.3f}, best {best_lp:.3f})"
            )
        return
    if eog_score.sampler_excess is not None:
        # exact: with the job's seed, the protocol sampler must have picked a stop here
        excess = eog_score.sampler_excess
        verdict.stats["eog_sampler_excess"] = round(excess, 4) if math.isfinite(excess) else None
        if eog_score.sampler_excess > tol.sampler_tol:
            verdict.fraud = True
            verdict.reasons.append(
                "truncated: output claims a natural stop where the protocol sampler, with "
                f"the job's seed, does not stop (excess {eog_score.sampler_excess:.2f} nats "
                f"> {tol.sampler_tol})"
            )
            return
    tempered = eog_lp / sampling.temperature - _logsumexp(
        [lp / sampling.temperature for lp in cands.values()]
    )
    verdict.stats["eog_tempered_logprob"] = round(tempered, 4) if tempered != -math.inf else None
    if tempered < tol.eos_min_logprob:
        verdict.fraud = True
        verdict.reasons.append(
            "truncated: output claims a natural stop where the verifier gives end-of-generation "
            f"negligible mass (tempered logprob {tempered:.2f} < {tol.eos_min_logprob})"
        )
