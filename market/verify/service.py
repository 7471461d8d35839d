"""The two units of work the Celery tasks run: one beat tick, one verification.

Kept free of Celery so tests and the CLI can call them directly, and so each step
owns short transactions: the (slow) re-execution runs outside any transaction,
between loading its input and applying its outcome.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from inference.base import Engine, EngineError
from inference.convert import engine_request
from market.settings import MarketSettings
from market.verify import window
from market.verify.embedding import judge_embedding
from market.verify.engine import VerifierNotConfigured, get_embedder, get_engine, run_sync
from market.verify.reexec import (
    Verdict,
    VerificationUnavailable,
    find_continuation,
    reexecute,
)
from protocol.checks import check_receipt
from protocol.receipt import SignedReceipt, receipt_from_json

log = logging.getLogger("market.verify")



def verifier_id() -> str:
    """Which verifier process judged (or failed to judge) a receipt, kept in its evidence."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class TickResult:
    decided: int = 0
    dispatched: list[str] = field(default_factory=list)
    settled: list[str] = field(default_factory=list)


def tick(sessions: sessionmaker[Session], settings: MarketSettings) -> TickResult:
    """Decide sampling, claim due verifications, close expired windows.

    Returns the receipt ids to enqueue (already moved to ``verifying`` and committed).
    """
    result = TickResult()
    with sessions.begin() as session:
        result.decided = window.decide_sampling(session, settings)
    with sessions.begin() as session:
        result.dispatched = window.claim_for_verification(session, settings)
    with sessions.begin() as session:
        result.settled = window.close_expired_windows(session, settings)
    return result


def _continuation_candidates(inp: window.VerificationInput) -> list[list[int]]:
    """The stored prefix; for receipts stored without one, no prefix or the output of
    the earlier receipted segments (most recent first). Each candidate is checked
    against the request digest the node signed, so a wrong one is never used."""
    if inp.continuation_token_ids:
        return [list(inp.continuation_token_ids)]
    previous = inp.previous_token_ids
    out: list[list[int]] = [[]]
    acc: list[int] = []
    for ids in previous:
        acc = acc + ids
        out.append(list(acc))
    return out[:1] + out[1:][::-1]


def judge_receipt(
    inp: window.VerificationInput,
    settings: MarketSettings,
    engine_for: Callable[[str, MarketSettings], Engine] = get_engine,
) -> tuple[str, dict[str, Any], str]:
    """(outcome, evidence, reason) for one receipt: outcome is honest | fraud | unavailable."""
    signed = receipt_from_json(inp.signed)
    body = signed.body
    failures = check_receipt(
        signed,
        registered_model_sha256=inp.registered_model_sha256 or body.model_sha256,
        relayed_text=inp.output_text,
        model_id=inp.job_model,
        context_length=inp.context_length,
    )
    evidence: dict[str, Any] = {"receipt_hash": signed.receipt_hash}
    if failures:
        evidence["checks"] = [f.as_dict() for f in failures]
        return "fraud", evidence, "cheap checks failed: " + ", ".join(f.code for f in failures)
    if inp.embedding_request is not None:
        return _judge_embedding(inp, signed, settings, evidence)
    if inp.job_request is None:
        evidence["unavailable"] = "the stored request is not a job request"
        return "unavailable", evidence, "verification unavailable: request not replayable"
    prefix = find_continuation(signed, inp.job_request, _continuation_candidates(inp))
    if prefix is None:
        evidence["unavailable"] = "the continuation prefix this segment was given is not stored"
        return "unavailable", evidence, "verification unavailable: unknown continuation prefix"
    request = engine_request(inp.job_request, prefix)
    try:
        engine = engine_for(body.model_id, settings)
        verdict: Verdict = run_sync(
            reexecute(
                engine,
                signed,
                request,
                output_text=inp.output_text,
                finish_reason=inp.finish_reason if inp.is_last_segment else None,  # type: ignore[arg-type]
                context_length=inp.context_length,
                tolerances=settings.verify.tolerances,
                sampler=inp.sampler,
            )
        )
    except EngineError as exc:
        if exc.code != "invalid_token":
            evidence["unavailable"] = str(exc)
            return "unavailable", evidence, f"verification unavailable: {exc}"
        # The node signed token ids the model's vocabulary does not have: no honest
        # engine produces those, so this is proof enough.
        evidence["checks"] = [{"code": "invalid_token", "detail": str(exc)}]
        return "fraud", evidence, f"re-execution: {exc}"
    except (VerifierNotConfigured, VerificationUnavailable) as exc:
        evidence["unavailable"] = str(exc)
        return "unavailable", evidence, f"verification unavailable: {exc}"
    evidence.update(verdict.as_dict())
    if verdict.fraud:
        return "fraud", evidence, "re-execution: " + "; ".join(verdict.reasons)
    return "honest", evidence, "verified honest"


def _judge_embedding(inp: window.VerificationInput, signed: SignedReceipt,
                     settings: MarketSettings, evidence: dict[str, Any]
                     ) -> tuple[str, dict[str, Any], str]:
    assert inp.embedding_request is not None
    try:
        embedder = get_embedder(signed.body.model_id, settings)
    except (VerifierNotConfigured, EngineError, ImportError, OSError) as exc:
        evidence["unavailable"] = str(exc)
        return "unavailable", evidence, f"verification unavailable: {exc}"
    outcome, found, reason = judge_embedding(embedder, signed, inp.embedding_request,
                                             inp.output_text, settings.verify.tolerances)
    return outcome, {**evidence, **found}, reason


def reproduces_fraud(
    sessions: sessionmaker[Session],
    receipt_id: str,
    settings: MarketSettings,
    engine_for: Callable[[str, MarketSettings], Engine] = get_engine,
) -> bool:
    """Whether this process, judging the receipt again on its own engine, also finds it
    fraudulent: what a verifier checks before it signs a slash verdict, so the quorum the
    program asks for is that many judgements rather than one repeated. Changes nothing."""
    with sessions() as session:
        inp = window.load_input(session, receipt_id)
    outcome, _evidence, reason = judge_receipt(inp, settings, engine_for)
    log.info("receipt %s judged again: %s (%s)", receipt_id, outcome, reason)
    return outcome == "fraud"


def verify(
    sessions: sessionmaker[Session],
    receipt_id: str,
    settings: MarketSettings,
    engine_for: Callable[[str, MarketSettings], Engine] = get_engine,
) -> str:
    """Verify one receipt in state ``verifying`` and apply the outcome (idempotent)."""
    with sessions.begin() as session:
        inp = window.load_input(session, receipt_id)
    if inp.state != "verifying":
        return f"skipped ({inp.state})"
    outcome, evidence, reason = judge_receipt(inp, settings, engine_for)
    evidence["outcome"] = outcome
    evidence["verifier"] = verifier_id()
    with sessions.begin() as session:
        if outcome == "fraud":
            done = window.slash(session, receipt_id, settings, reason=reason[:2000],
                                    verification=evidence)
        elif outcome == "honest":
            done = window.settle_verified(session, receipt_id, settings,
                                              verification=evidence)
        else:
            done = window.release_unverifiable(session, receipt_id, settings,
                                                   reason=reason[:2000], verification=evidence)
    if not done:
        return "skipped (moved by another worker)"
    log.info("receipt %s: %s (%s)", receipt_id, outcome, reason)
    return outcome
