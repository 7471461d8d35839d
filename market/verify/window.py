"""Challenge-window state machine: sampling, dispatch, settlement and slashing.

Receipt states: ``pending`` → ``verifying`` → ``settled`` | ``slashed``, and
``pending`` → ``settled`` when the window closes and the receipt was not sampled.

Verification fails closed: a receipt that was sampled or challenged is paid only on an
honest verdict. When a verifier cannot judge it (no engine for the model, a timeout, a
crash), it goes back to ``pending`` to be tried again, on whichever verifier takes it,
after a growing backoff; after ``verify_max_attempts`` it is ``escalated``: unpaid,
its node's reputation unchanged, until an operator re-queues it (``requeue``).

Every transition is one
``UPDATE receipts … WHERE id = :id AND state = :expected`` whose row count is
checked, plus a ``receipt_events`` row, in the caller's transaction — so two workers
racing on one receipt cannot both act, and a replayed task is a no-op.

Functions take a sync ``Session`` and never commit (the Celery tasks own the
transactions). Money moves through ``market.money.billing`` and the journal (idempotent keys);
the chain layer sends payouts and slashes from there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session

from market.models import Job, LedgerEntry, Node, NodeModel, Receipt, ReceiptEvent, utcnow
from market.money import billing
from market.settings import MarketSettings
from market.verify import sampling
from market.verify.models import VerificationTask
from protocol.embedding import EmbeddingRequest
from protocol.job import JobRequest

log = logging.getLogger("market.verify")


# ---- the slash record ----------------------------------------------------------------------


def _record_slash(session: Session, receipt: Receipt, node: Node, amount: int) -> None:
    """Journal a slash once per receipt (``slash:<receipt>``); the chain layer sends it
    from the stake account (``market.onchain.settle``) and ``stake.unsettled_slashes``
    counts it until then."""
    key = f"slash:{receipt.id}"
    if session.execute(select(LedgerEntry.id).where(LedgerEntry.idempotency_key == key)).first():
        return
    session.add(LedgerEntry(
        kind="slash", idempotency_key=key, amount=amount, node_id=node.id,
        job_id=receipt.job_id, receipt_id=receipt.id,
        memo=f"slashed {amount} of stake for fraud on receipt {receipt.receipt_hash}",
    ))


# ---- transitions ------------------------------------------------------------------------------


def transition(
    session: Session,
    receipt_id: str,
    from_state: str,
    to_state: str,
    reason: str,
    *,
    now: datetime | None = None,
    **values: Any,
) -> bool:
    """Atomically move one receipt ``from_state`` → ``to_state``; False if it was not
    in ``from_state`` (someone else moved it). Records a ``receipt_events`` row."""
    now = now or utcnow()
    result = session.execute(
        update(Receipt)
        .where(Receipt.id == receipt_id, Receipt.state == from_state)
        .values(state=to_state, state_changed_at=now, state_reason=reason, **values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    session.add(
        ReceiptEvent(receipt_id=receipt_id, from_state=from_state, to_state=to_state, at=now,
                     reason=reason)
    )
    return True


def _receipt(session: Session, receipt_id: str) -> Receipt:
    receipt = session.get(Receipt, receipt_id, populate_existing=True)
    if receipt is None:
        raise LookupError(receipt_id)
    return receipt


# ---- sampling ---------------------------------------------------------------------------------


def decide_sampling(
    session: Session, settings: MarketSettings, *, now: datetime | None = None
) -> int:
    """Give every pending receipt without a decision one (verify or not). Returns count."""
    now = now or utcnow()
    rows = session.execute(
        select(Receipt.id, Receipt.node_id, Receipt.receipt_hash, Receipt.created_at,
               Receipt.challenged, Node.reputation)
        .join(Node, Node.id == Receipt.node_id)
        .where(
            Receipt.state == "pending",
            ~exists().where(VerificationTask.receipt_id == Receipt.id),
        )
        .order_by(Receipt.created_at, Receipt.id)
        .limit(settings.verify.batch)
    ).all()
    key = sampling.sampling_key(session, settings) if rows else b""
    for rid, node_id, rhash, created_at, challenged, reputation in rows:
        prior = session.execute(
            select(func.count(Receipt.id)).where(
                Receipt.node_id == node_id,
                or_(
                    Receipt.created_at < created_at,
                    and_(Receipt.created_at == created_at, Receipt.id < rid),
                ),
            )
        ).scalar_one()
        rate = sampling.sample_rate(settings, prior_jobs=prior, reputation=reputation)
        chosen = sampling.draw(key, rhash) < rate
        if challenged:
            reason = "challenge"
        elif prior < settings.verify.first_jobs:
            reason = "first_jobs"
        else:
            reason = "sampled" if chosen else "skipped"
        session.add(
            VerificationTask(
                receipt_id=rid,
                verify=bool(chosen or challenged),
                sample_rate=rate,
                reason=reason,
                attempts=0,
                created_at=now,
            )
        )
    session.flush()
    return len(rows)


def request_challenge(session: Session, receipt: Receipt, *, now: datetime | None = None) -> bool:
    """Mark a pending receipt challenged by its buyer; it is verified on the next tick.
    False when it is not pending, already challenged, or its window has closed."""
    now = now or utcnow()
    result = session.execute(
        update(Receipt)
        .where(Receipt.id == receipt.id, Receipt.state == "pending",
               Receipt.challenged.is_(False), Receipt.window_closes_at > now)
        .values(challenged=True)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    task = session.get(VerificationTask, receipt.id)
    if task is None:
        session.add(VerificationTask(receipt_id=receipt.id, verify=True, sample_rate=1.0,
                                     reason="challenge", attempts=0, created_at=now))
    else:
        task.verify = True
        task.reason = "challenge"
        if task.outcome == "unavailable":
            task.outcome = None
            task.attempts = 0
    session.add(ReceiptEvent(receipt_id=receipt.id, from_state="pending", to_state="pending",
                             at=now, reason="challenged by buyer"))
    return True


# ---- dispatch -----------------------------------------------------------------------------------


def claim_for_verification(
    session: Session, settings: MarketSettings, *, now: datetime | None = None
) -> list[str]:
    """Move receipts due for re-execution pending → verifying; returns their ids (enqueue
    them after commit). Also re-claims receipts stuck in ``verifying`` (a worker died)."""
    now = now or utcnow()
    due = session.execute(
        select(Receipt.id, VerificationTask.reason, VerificationTask.sample_rate)
        .join(VerificationTask, VerificationTask.receipt_id == Receipt.id)
        .where(
            Receipt.state == "pending",
            VerificationTask.verify.is_(True),
            VerificationTask.outcome.is_(None),
            VerificationTask.attempts < settings.verify.max_attempts,
            or_(VerificationTask.not_before.is_(None), VerificationTask.not_before <= now),
        )
        .order_by(Receipt.created_at)
        .limit(settings.verify.batch)
    ).all()
    claimed: list[str] = []
    for rid, reason, rate in due:
        why = {
            "challenge": "challenged by buyer",
            "first_jobs": "verifying: one of the node's first jobs",
        }.get(reason, f"verifying: sampled at rate {rate:.3f}")
        if transition(session, rid, "pending", "verifying", why, now=now):
            session.execute(
                update(VerificationTask)
                .where(VerificationTask.receipt_id == rid)
                .values(attempts=VerificationTask.attempts + 1, dispatched_at=now)
            )
            claimed.append(rid)
    stale_before = now - timedelta(seconds=settings.verify.timeout_s)
    stuck = session.execute(
        select(Receipt.id, VerificationTask.attempts)
        .join(VerificationTask, VerificationTask.receipt_id == Receipt.id)
        .where(Receipt.state == "verifying", Receipt.state_changed_at < stale_before)
        .limit(settings.verify.batch)
    ).all()
    for rid, attempts in stuck:
        if attempts >= settings.verify.max_attempts:
            # No verifier finished it: never paid unverified, escalated to the operator.
            if transition(session, rid, "verifying", "escalated",
                          f"no verifier finished it in {attempts} attempts", now=now):
                _finish_task(session, rid, "unavailable", now)
        elif transition(session, rid, "verifying", "verifying",
                        "verification re-dispatched (timed out)", now=now):
            session.execute(
                update(VerificationTask)
                .where(VerificationTask.receipt_id == rid)
                .values(attempts=VerificationTask.attempts + 1, dispatched_at=now)
            )
            claimed.append(rid)
    return claimed


# ---- settlement ----------------------------------------------------------------------------------


def settle(
    session: Session,
    receipt_id: str,
    *,
    from_state: str,
    reason: str,
    verification: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> bool:
    """``from_state`` → settled: the node is credited ``node_earning`` (its price; the
    on-chain payout batches it later)."""
    values: dict[str, Any] = {}
    if verification is not None:
        values["verification"] = verification
    if not transition(session, receipt_id, from_state, "settled", reason, now=now, **values):
        return False
    receipt = _receipt(session, receipt_id)
    billing.settle_receipt_earnings(session, receipt)
    return True


def close_expired_windows(
    session: Session, settings: MarketSettings, *, now: datetime | None = None
) -> list[str]:
    """Settle pending receipts whose window closed and that await no verification."""
    now = now or utcnow()
    # a sampled or challenged receipt is settled by its honest verdict only, never here
    awaiting = exists().where(
        VerificationTask.receipt_id == Receipt.id,
        VerificationTask.verify.is_(True),
    )
    decided = exists().where(VerificationTask.receipt_id == Receipt.id)
    ids = session.execute(
        select(Receipt.id)
        .where(Receipt.state == "pending", Receipt.window_closes_at <= now, decided, ~awaiting)
        .order_by(Receipt.window_closes_at)
        .limit(settings.verify.batch)
    ).scalars().all()
    settled = []
    for rid in ids:
        if settle(session, rid, from_state="pending", reason="challenge window closed", now=now):
            settled.append(rid)
    return settled


@dataclass
class SlashResult:
    amount: int
    suspended: bool
    reputation: float


def slash(
    session: Session,
    receipt_id: str,
    settings: MarketSettings,
    *,
    reason: str,
    verification: dict[str, Any],
    now: datetime | None = None,
) -> SlashResult | None:
    """verifying → slashed: refund the buyer, slash stake, cut reputation, maybe suspend."""
    now = now or utcnow()
    if not transition(session, receipt_id, "verifying", "slashed", reason, now=now,
                      verification=verification):
        return None
    receipt = _receipt(session, receipt_id)
    billing.refund_receipt(session, receipt)
    node = session.execute(
        select(Node).where(Node.id == receipt.node_id).with_for_update()
    ).scalar_one()
    session.refresh(node)
    amount = min(settings.verify.slash_multiplier * receipt.cost, max(0, node.stake))
    fraud_count = node.fraud_count + 1
    reputation = sampling.reputation_after_fraud(node.reputation, settings)
    suspend = node.suspended or fraud_count >= settings.verify.suspend_after_frauds
    session.execute(
        update(Node)
        .where(Node.id == node.id)
        .values(stake=Node.stake - amount, fraud_count=fraud_count, reputation=reputation,
                suspended=suspend)
        .execution_options(synchronize_session=False)
    )
    _record_slash(session, receipt, node, amount)
    if suspend and not node.suspended:
        log.warning("node %s suspended after %d frauds", node.id, fraud_count)
    verification = dict(verification)
    verification["slash"] = {"amount": amount, "refund": receipt.cost,
                             "fraud_count": fraud_count, "suspended": suspend}
    session.execute(update(Receipt).where(Receipt.id == receipt_id)
                    .values(verification=verification)
                    .execution_options(synchronize_session=False))
    _finish_task(session, receipt_id, "fraud", now)
    return SlashResult(amount=amount, suspended=suspend, reputation=reputation)


def settle_verified(
    session: Session,
    receipt_id: str,
    settings: MarketSettings,
    *,
    verification: dict[str, Any],
    now: datetime | None = None,
) -> bool:
    """verifying → settled after an honest verdict; reputation up a little."""
    now = now or utcnow()
    if not settle(session, receipt_id, from_state="verifying", reason="verified honest",
                  verification=verification, now=now):
        return False
    receipt = _receipt(session, receipt_id)
    rep = session.execute(select(Node.reputation).where(Node.id == receipt.node_id)).scalar_one()
    session.execute(update(Node).where(Node.id == receipt.node_id)
                    .values(reputation=sampling.reputation_after_honest(rep, settings))
                    .execution_options(synchronize_session=False))
    _finish_task(session, receipt_id, "honest", now)
    return True


def release_unverifiable(
    session: Session, receipt_id: str, settings: MarketSettings, *, reason: str,
    verification: dict[str, Any], now: datetime | None = None,
) -> bool:
    """The verifier cannot judge (never slash without proof, never pay without one):
    verifying → pending, to be tried again after a backoff, or → escalated once
    ``verify_max_attempts`` verifiers have failed. Reputation is left alone."""
    now = now or utcnow()
    attempts = session.execute(
        select(VerificationTask.attempts).where(VerificationTask.receipt_id == receipt_id)
    ).scalar() or 0
    if attempts >= settings.verify.max_attempts:
        if not transition(session, receipt_id, "verifying", "escalated",
                          f"{reason} (after {attempts} attempts: escalated, unpaid)", now=now,
                          verification=verification):
            return False
        _finish_task(session, receipt_id, "unavailable", now)
        return True
    if not transition(session, receipt_id, "verifying", "pending", reason, now=now,
                      verification=verification):
        return False
    backoff = min(settings.verify.retry_s * 2 ** max(0, attempts - 1), 3600.0)
    session.execute(update(VerificationTask).where(VerificationTask.receipt_id == receipt_id)
                    .values(not_before=now + timedelta(seconds=backoff)))
    return True


def requeue(session: Session, receipt_id: str, *, now: datetime | None = None) -> bool:
    """escalated → pending with a fresh set of attempts (an operator fixed the verifier)."""
    now = now or utcnow()
    if not transition(session, receipt_id, "escalated", "pending", "re-queued by the operator",
                      now=now):
        return False
    session.execute(update(VerificationTask).where(VerificationTask.receipt_id == receipt_id)
                    .values(outcome=None, attempts=0, not_before=None, finished_at=None))
    return True


def _finish_task(session: Session, receipt_id: str, outcome: str, now: datetime) -> None:
    session.execute(update(VerificationTask).where(VerificationTask.receipt_id == receipt_id)
                    .values(outcome=outcome, finished_at=now))


# ---- what a verification needs to know -------------------------------------------------------------


@dataclass
class VerificationInput:
    receipt_id: str
    state: str
    signed: dict[str, Any]
    output_text: str
    job_request: JobRequest | None  # None: the stored request does not parse
    job_model: str
    finish_reason: str | None
    is_last_segment: bool
    previous_token_ids: list[list[int]]  # output ids of earlier segments, in order
    continuation_token_ids: list[int] | None  # the prefix this segment was given, if stored
    registered_model_sha256: str | None
    context_length: int | None
    sampler: str | None = None  # the job's sampler (None: before the protocol fixed one)
    # an embedding job's request (``job_request`` is then None)
    embedding_request: EmbeddingRequest | None = None


def _stored_request(data: Any) -> JobRequest | None:
    try:
        return JobRequest.model_validate(data)
    except ValueError:
        return None


def _stored_embedding(data: Any) -> EmbeddingRequest | None:
    try:
        return EmbeddingRequest.model_validate(data)
    except ValueError:
        return None


def load_input(session: Session, receipt_id: str) -> VerificationInput:
    receipt = _receipt(session, receipt_id)
    job = session.get(Job, receipt.job_id)
    assert job is not None
    siblings = session.execute(
        select(Receipt.seq, Receipt.receipt).where(Receipt.job_id == job.id).order_by(Receipt.seq)
    ).all()
    previous = [list(r.get("output_token_ids") or []) for seq, r in siblings if seq < receipt.seq]
    is_last = all(seq <= receipt.seq for seq, _ in siblings)
    offer = session.execute(
        select(NodeModel.sha256, NodeModel.context_length).where(
            NodeModel.node_id == receipt.node_id, NodeModel.model_id == job.model)
    ).first()
    return VerificationInput(
        receipt_id=receipt.id,
        state=receipt.state,
        signed=dict(receipt.receipt),
        output_text=receipt.output_text,
        job_request=_stored_request(job.request) if job.kind != "embedding" else None,
        embedding_request=_stored_embedding(job.request) if job.kind == "embedding" else None,
        job_model=job.model,
        finish_reason=job.finish_reason,
        is_last_segment=is_last,
        previous_token_ids=previous,
        continuation_token_ids=receipt.continuation_token_ids,
        registered_model_sha256=offer[0] if offer else None,
        context_length=offer[1] if offer else None,
        sampler=job.sampler,
    )
