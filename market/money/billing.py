"""Money: holds, charges, fees, node earnings, refunds — integer AIDP base units only.

Every movement writes a :class:`~market.models.LedgerEntry` whose ``idempotency_key``
is unique (``kind:job_or_receipt_id``), so a replayed call is a no-op instead of a
second charge. Functions take a sync ``Session`` and never commit: the caller owns the
transaction (the request path submits them to :class:`market.writer.BatchWriter`).

Accounts hold ``balance`` (funds owned) and ``held`` (reserved for running jobs);
spendable = balance − held. A job's lifetime is one transaction to place the hold and
create the job, and one to finalize it: store its receipts, charge the actual cost,
release the hold — guarded by ``UPDATE jobs … WHERE status = 'running'`` so a job is
finalized at most once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, insert, or_, select, update
from sqlalchemy.orm import Session

from market.errors import InsufficientBalance, NotFound
from market.models import (
    Account,
    Job,
    LedgerEntry,
    Node,
    Receipt,
    ReceiptEvent,
    new_id,
    utcnow,
)

MTOK = 1_000_000

# ---- hot-path statements, built once -----------------------------------------------------
# open_job / finalize_job run for every request: they execute these prebuilt Core
# statements on the session's connection (no ORM bulk machinery, cached compilation).

_accounts = Account.__table__
_jobs = Job.__table__
_nodes = Node.__table__
_HOLD = (
    update(_accounts)
    .where(_accounts.c.id == bindparam("b_account"),
           _accounts.c.balance - _accounts.c.held >= bindparam("b_amount"))
    .values(held=_accounts.c.held + bindparam("b_amount"))
    .returning(_accounts.c.balance - _accounts.c.held)
)
_SPENDABLE = select(_accounts.c.balance - _accounts.c.held).where(
    _accounts.c.id == bindparam("b_account"))
_INSERT_JOB = insert(_jobs)
_INSERT_ENTRY = insert(LedgerEntry.__table__)
_INSERT_RECEIPT = insert(Receipt.__table__)
_INSERT_EVENT = insert(ReceiptEvent.__table__)
_FINISH_JOB = (
    update(_jobs)
    .where(_jobs.c.id == bindparam("b_job"), _jobs.c.status == "running")
    .values(
        status=bindparam("b_status"),
        charged_amount=bindparam("b_charged"),
        fee_amount=bindparam("b_fee"),
        prompt_tokens=bindparam("b_prompt"),
        completion_tokens=bindparam("b_completion"),
        usage=bindparam("b_usage", type_=_jobs.c.usage.type),
        finish_reason=bindparam("b_finish"),
        failovers=bindparam("b_failovers"),
        error=bindparam("b_error"),
        finished_at=bindparam("b_now", type_=_jobs.c.finished_at.type),
    )
    .returning(_jobs.c.account_id, _jobs.c.hold_amount)
)
_CHARGE = (
    update(_accounts)
    .where(_accounts.c.id == bindparam("b_account"))
    .values(balance=_accounts.c.balance - bindparam("b_charged"),
            held=_accounts.c.held - bindparam("b_hold"))
)
_NODE_EARNED = (
    update(_nodes)
    .where(_nodes.c.id == bindparam("b_node"))
    .values(earned_pending=_nodes.c.earned_pending + bindparam("b_earning"),
            jobs_total=_nodes.c.jobs_total + 1)
)


# ---- pricing --------------------------------------------------------------------------


def token_cost(tokens: int, price_per_mtok: int) -> int:
    """ceil(tokens × price_per_mtok / 1e6), in base units."""
    return -(-tokens * price_per_mtok // MTOK)


def node_cost(prompt_tokens: int, completion_tokens: int, price_in: int, price_out: int) -> int:
    return token_cost(prompt_tokens, price_in) + token_cost(completion_tokens, price_out)


def market_fee(cost: int, fee_bps: int) -> int:
    return -(-cost * fee_bps // 10_000)


def worst_case_hold(
    prompt_tokens: int, max_tokens: int, price_in: int, price_out: int, fee_bps: int
) -> int:
    """What a job may cost at most: its prompt (counted by the market) and ``max_tokens``
    at the highest prices of the nodes it may run on, plus the fee. Failover segments
    share this one hold (:func:`cap_to_hold`)."""
    cost = node_cost(prompt_tokens, max_tokens, price_in, price_out)
    return cost + market_fee(cost, fee_bps)


def cap_to_hold(earning: int, fee_bps: int, left: int) -> tuple[int, int]:
    """(earning, fee) for a segment when only ``left`` of the job's hold remains: the
    largest earning whose cost (earning + fee) fits. A node's claim never takes money
    the buyer did not put on hold."""
    left = max(0, left)
    if earning + market_fee(earning, fee_bps) <= left:
        return earning, market_fee(earning, fee_bps)
    capped = left * 10_000 // (10_000 + fee_bps)
    while capped > 0 and capped + market_fee(capped, fee_bps) > left:
        capped -= 1
    return capped, market_fee(capped, fee_bps)


class HoldExceeded(RuntimeError):
    """A finalize would charge more than the job's hold (a bug upstream): refused."""


# ---- journal --------------------------------------------------------------------------


def _journal_exists(session: Session, key: str) -> bool:
    return (
        session.execute(
            select(LedgerEntry.id).where(LedgerEntry.idempotency_key == key)
        ).first()
        is not None
    )


def _entry(kind: str, key: str, amount: int, at: datetime, *, account_id: str | None = None,
           node_id: str | None = None, job_id: str | None = None,
           receipt_id: str | None = None) -> dict[str, Any]:
    """One journal row for a multi-row insert (every row carries every column)."""
    return {"kind": kind, "idempotency_key": key, "amount": amount, "account_id": account_id,
            "node_id": node_id, "job_id": job_id, "receipt_id": receipt_id, "memo": None,
            "created_at": at}


def _journal(session: Session, kind: str, key: str, amount: int, **refs: Any) -> None:
    session.execute(
        insert(LedgerEntry).values(kind=kind, idempotency_key=key, amount=amount, **refs)
    )


# ---- buyers' funds ------------------------------------------------------------------


def credit_account(
    session: Session, account_id: str, amount: int, reference: str, kind: str = "credit"
) -> bool:
    """Add ``amount`` to an account once per ``reference``; False when already applied."""
    if amount <= 0:
        raise ValueError("credit amount must be positive")
    key = f"{kind}:{reference}"
    if _journal_exists(session, key):
        return False
    result = session.execute(
        update(Account).where(Account.id == account_id).values(balance=Account.balance + amount)
    )
    if result.rowcount != 1:
        raise NotFound(f"no account {account_id}")
    _journal(session, kind, key, amount, account_id=account_id, memo=reference)
    return True


def open_job(session: Session, job: Job) -> int:
    """Reserve ``job.hold_amount`` from the buyer's spendable balance and store the job;
    returns the spendable balance left.

    Raises :class:`InsufficientBalance` (nothing written) when the account cannot cover it.
    """
    amount = job.hold_amount
    conn = session.connection()
    spendable = conn.execute(_HOLD, {"b_account": job.account_id, "b_amount": amount}).first()
    if spendable is None:
        raise InsufficientBalance(
            f"insufficient balance: this request may cost up to {amount} base units "
            "(worst case, held until it finishes)"
        )
    conn.execute(_INSERT_JOB, _row_with_defaults(_jobs, job))
    if amount:
        conn.execute(_INSERT_ENTRY, _entry("hold", f"hold:{job.id}", amount, utcnow(),
                                           account_id=job.account_id, job_id=job.id))
    return int(spendable[0])


def spendable_balance(session: Session, account_id: str) -> int:
    """balance − held as committed now (0 for an unknown account)."""
    value = session.connection().execute(_SPENDABLE, {"b_account": account_id}).scalar()
    return int(value or 0)


def _row_with_defaults(table: Any, obj: Any) -> dict[str, Any]:
    """The INSERT parameters for an unsaved ORM object: its attributes, the columns'
    Python defaults where unset (also set on ``obj``), NULLs left out."""
    row: dict[str, Any] = {}
    for column in table.columns:
        value = getattr(obj, column.key)
        if value is None and column.default is not None:
            default = column.default
            value = default.arg(None) if default.is_callable else default.arg
            setattr(obj, column.key, value)
        if value is not None:
            row[column.key] = value
    return row


@dataclass
class Segment:
    """One node's verified part of a job, ready to be stored as a receipt."""

    node_id: str
    seq: int
    signed_receipt: dict[str, Any]
    receipt_hash: str
    signature: str
    output_text: str
    prompt_tokens: int
    completion_tokens: int
    node_earning: int  # node_cost at the node's price
    fee: int
    # Output of a failed node that this segment continued from (empty: none).
    continuation_token_ids: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cost(self) -> int:
        return self.node_earning + self.fee


@dataclass
class Outcome:
    status: str  # completed | failed | cancelled
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    failovers: int = 0
    error: str | None = None
    segments: list[Segment] = field(default_factory=list)
    # Charge for relayed output that carries no receipt (client disconnected mid-stream).
    unreceipted_charge: int = 0
    unreceipted_fee: int = 0


def finalize_job(
    session: Session,
    job_id: str,
    outcome: Outcome,
    *,
    challenge_window_s: float,
    now: datetime | None = None,
) -> bool:
    """Store receipts, charge, release the hold — once. False when already finalized."""
    now = now or utcnow()
    receipts_cost = sum(s.cost for s in outcome.segments)
    receipts_fee = sum(s.fee for s in outcome.segments)
    charged = receipts_cost + outcome.unreceipted_charge
    fee = receipts_fee + outcome.unreceipted_fee
    usage = {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }
    conn = session.connection()
    row = conn.execute(_FINISH_JOB, {
        "b_job": job_id,
        "b_status": outcome.status,
        "b_charged": charged,
        "b_fee": fee,
        "b_prompt": outcome.prompt_tokens,
        "b_completion": outcome.completion_tokens,
        "b_usage": usage,
        "b_finish": outcome.finish_reason,
        "b_failovers": outcome.failovers,
        "b_error": outcome.error,
        "b_now": now,
    }).first()
    if row is None:
        return False
    account_id, hold = row
    if charged > hold:
        raise HoldExceeded(f"job {job_id}: charge {charged} exceeds its hold {hold}")
    conn.execute(_CHARGE, {"b_account": account_id, "b_charged": charged, "b_hold": hold})
    entries = [
        _entry(kind, f"{kind}:{job_id}", amount, now, account_id=account_id, job_id=job_id)
        for kind, amount in (("release", hold), ("charge", charged), ("fee", fee))
        if amount
    ]
    window = now + timedelta(seconds=challenge_window_s)
    receipts: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for seg in outcome.segments:
        receipt_id = new_id("rcpt")
        receipts.append({
            "id": receipt_id,
            "job_id": job_id,
            "node_id": seg.node_id,
            "seq": seg.seq,
            "receipt": seg.signed_receipt,
            "receipt_hash": seg.receipt_hash,
            "signature": seg.signature,
            "output_text": seg.output_text,
            "continuation_token_ids": seg.continuation_token_ids or None,
            "prompt_tokens": seg.prompt_tokens,
            "completion_tokens": seg.completion_tokens,
            "cost": seg.cost,
            "node_earning": seg.node_earning,
            "fee": seg.fee,
            "state": "pending",
            "window_closes_at": window,
            "state_changed_at": now,
            "challenged": False,
            "created_at": now,
        })
        events.append({"receipt_id": receipt_id, "from_state": None, "to_state": "pending",
                       "at": now, "reason": "receipt accepted"})
        if seg.node_earning:
            entries.append(_entry("node_earning", f"node_earning:{receipt_id}", seg.node_earning,
                                  now, node_id=seg.node_id, job_id=job_id,
                                  receipt_id=receipt_id))
        conn.execute(_NODE_EARNED, {"b_node": seg.node_id, "b_earning": seg.node_earning})
    if receipts:
        conn.execute(_INSERT_RECEIPT, receipts)
        conn.execute(_INSERT_EVENT, events)
    if entries:
        conn.execute(_INSERT_ENTRY, entries)
    return True


def release_expired_jobs(session: Session, now: datetime, *, grace_s: float,
                         legacy_before: datetime, skip: frozenset[str] = frozenset()) -> int:
    """Fail jobs still 'running' past their deadline (plus ``grace_s`` for a finalize
    still on its way) and release their holds, charging nothing. Whatever happened to
    the process that ran them (a crash, a lost finalize), a hold never outlives its
    job. Jobs stored without a deadline count from ``legacy_before``."""
    cutoff = now - timedelta(seconds=grace_s)
    ids = session.execute(
        select(Job.id).where(
            Job.status == "running",
            or_(Job.deadline_at < cutoff,
                and_(Job.deadline_at.is_(None), Job.created_at < legacy_before)),
        ).limit(1000)
    ).scalars().all()
    count = 0
    for job_id in ids:
        if job_id in skip:
            continue
        count += finalize_job(
            session, job_id, Outcome(status="failed", error="job expired without finalizing"),
            challenge_window_s=0,
        )
    return count


# ---- seams for settlement / verification (sync sessions, idempotent) ---------------------


def settle_receipt_earnings(session: Session, receipt: Receipt) -> bool:
    """Move the receipt's node earning from pending to settled (window closed, honest).

    Idempotent: journal key ``settle:<receipt id>``; returns False when already done.
    """
    key = f"settle:{receipt.id}"
    if _journal_exists(session, key) or _journal_exists(session, f"forfeit:{receipt.id}"):
        return False
    amount = receipt.node_earning
    session.execute(
        update(Node)
        .where(Node.id == receipt.node_id)
        .values(
            earned_pending=Node.earned_pending - amount,
            earned_settled=Node.earned_settled + amount,
        )
    )
    _journal(session, "settle", key, amount, node_id=receipt.node_id, job_id=receipt.job_id,
             receipt_id=receipt.id)
    return True


def refund_receipt(session: Session, receipt: Receipt) -> bool:
    """Give the buyer back what this receipt cost them; the node forfeits its pending
    earning for it (unless already settled). Idempotent: key ``refund:<receipt id>``."""
    key = f"refund:{receipt.id}"
    if _journal_exists(session, key):
        return False
    account_id = session.execute(
        select(Job.account_id).where(Job.id == receipt.job_id)
    ).scalar_one()
    if receipt.cost:
        session.execute(
            update(Account)
            .where(Account.id == account_id)
            .values(balance=Account.balance + receipt.cost)
        )
    _journal(session, "refund", key, receipt.cost, account_id=account_id,
             job_id=receipt.job_id, receipt_id=receipt.id)
    if not _journal_exists(session, f"settle:{receipt.id}"):
        session.execute(
            update(Node)
            .where(Node.id == receipt.node_id)
            .values(earned_pending=Node.earned_pending - receipt.node_earning)
        )
        _journal(session, "forfeit", f"forfeit:{receipt.id}", receipt.node_earning,
                 node_id=receipt.node_id, job_id=receipt.job_id, receipt_id=receipt.id)
    return True
