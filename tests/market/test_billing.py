"""Billing on the real database (SQLite and PostgreSQL): holds, charges, idempotency,
and the group-commit writer the request path submits them through."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from market.db import Database
from market.errors import InsufficientBalance
from market.migrate import upgrade
from market.models import Account, Job, LedgerEntry, Node, Receipt, ReceiptEvent, new_id
from market.money import accounts, billing
from market.writer import BatchWriter


@pytest.fixture(scope="module")
def db(db_url: str) -> Iterator[Database]:
    upgrade(db_url)
    database = Database(db_url)
    yield database
    database.sync_engine.dispose()


def _account(db: Database, balance: int) -> str:
    with db.session() as s:
        account = accounts.create_account(s, "t")
        if balance:
            billing.credit_account(s, account.id, balance, new_id("ref"))
        return account.id


def _node(db: Database) -> str:
    with db.session() as s:
        node = Node(pubkey=new_id("pk"), region="local", agent_version="t", gpus=[],
                    price_in=1000, price_out=2000, max_concurrency=1, stake=0, reputation=0.5,
                    jobs_total=0, jobs_failed=0, failure_rate=0.0, suspended=False,
                    fraud_count=0, earned_pending=0, earned_settled=0)
        s.add(node)
        s.flush()
        return node.id


def _job(account_id: str, hold: int) -> Job:
    return Job(id=new_id("job"), account_id=account_id, model="m", kind="chat", request={},
               stream=False, status="running", hold_amount=hold, charged_amount=0, fee_amount=0,
               prompt_tokens=0, completion_tokens=0, failovers=0)


def _segment(node_id: str, earning: int = 70, fee: int = 7) -> billing.Segment:
    return billing.Segment(
        node_id=node_id, seq=0, signed_receipt={"r": 1}, receipt_hash=new_id("h")[:64],
        signature="sig", output_text="out", prompt_tokens=3, completion_tokens=5,
        node_earning=earning, fee=fee,
    )


def test_pricing_rounds_up() -> None:
    assert billing.token_cost(1, 1) == 1
    assert billing.token_cost(0, 10**9) == 0
    assert billing.token_cost(10**6, 7) == 7
    assert billing.token_cost(10**6 + 1, 7) == 8
    assert billing.node_cost(1, 1, 1, 1) == 2
    assert billing.market_fee(100, 1000) == 10
    assert billing.market_fee(101, 1000) == 11
    assert billing.worst_case_hold(10, 10, 10**6, 10**6, 1000) == 22


def test_credit_is_idempotent(db: Database) -> None:
    account_id = _account(db, 0)
    with db.session() as s:
        assert billing.credit_account(s, account_id, 500, "dep-1")
        assert not billing.credit_account(s, account_id, 500, "dep-1")
        assert billing.credit_account(s, account_id, 1, "dep-2")
    with db.session() as s:
        assert s.get(Account, account_id).balance == 501


def test_hold_needs_spendable_balance(db: Database) -> None:
    account_id = _account(db, 100)
    with db.session() as s:
        billing.open_job(s, _job(account_id, 60))
    with pytest.raises(InsufficientBalance):
        with db.session() as s:
            billing.open_job(s, _job(account_id, 41))  # 100 - 60 held = 40 spendable
    with db.session() as s:
        account = s.get(Account, account_id)
        assert (account.balance, account.held) == (100, 60)
        assert s.execute(select(func.count()).select_from(Job)
                         .where(Job.account_id == account_id)).scalar() == 1


def test_finalize_once_charges_once(db: Database) -> None:
    account_id = _account(db, 1000)
    node_id = _node(db)
    job = _job(account_id, 200)
    with db.session() as s:
        billing.open_job(s, job)
    outcome = billing.Outcome(status="completed", prompt_tokens=3, completion_tokens=5,
                              finish_reason="stop", segments=[_segment(node_id)])
    with db.session() as s:
        assert billing.finalize_job(s, job.id, outcome, challenge_window_s=60)
    with db.session() as s:  # a replay (crash-retry) changes nothing
        assert not billing.finalize_job(s, job.id, outcome, challenge_window_s=60)
    with db.session() as s:
        account = s.get(Account, account_id)
        assert (account.balance, account.held) == (1000 - 77, 0)
        stored = s.get(Job, job.id)
        assert stored.status == "completed" and stored.charged_amount == 77
        assert stored.fee_amount == 7
        receipts = s.execute(select(Receipt).where(Receipt.job_id == job.id)).scalars().all()
        assert len(receipts) == 1 and receipts[0].state == "pending"
        events = s.execute(select(ReceiptEvent).where(
            ReceiptEvent.receipt_id == receipts[0].id)).scalars().all()
        assert [(e.from_state, e.to_state) for e in events] == [(None, "pending")]
        node = s.get(Node, node_id)
        assert node.earned_pending == 70 and node.jobs_total == 1
        kinds = sorted(s.execute(select(LedgerEntry.kind).where(
            LedgerEntry.job_id == job.id)).scalars())
        assert kinds == ["charge", "fee", "hold", "node_earning", "release"]


def test_settle_and_refund_are_idempotent(db: Database) -> None:
    account_id = _account(db, 1000)
    node_id = _node(db)
    jobs = [_job(account_id, 100), _job(account_id, 100)]
    with db.session() as s:
        for job in jobs:
            billing.open_job(s, job)
    with db.session() as s:
        for job in jobs:
            seg = _segment(node_id)
            billing.finalize_job(s, job.id, billing.Outcome(status="completed", segments=[seg]),
                                 challenge_window_s=60)
    with db.session() as s:
        honest, cheat = (s.execute(select(Receipt).where(Receipt.job_id == j.id)).scalar_one()
                         for j in jobs)
        assert billing.settle_receipt_earnings(s, honest)
        assert not billing.settle_receipt_earnings(s, honest)
        assert billing.refund_receipt(s, cheat)
        assert not billing.refund_receipt(s, cheat)
        assert not billing.settle_receipt_earnings(s, cheat)  # forfeited earnings never settle
    with db.session() as s:
        node = s.get(Node, node_id)
        assert node.earned_settled == 70
        assert node.earned_pending == 0
        account = s.get(Account, account_id)
        assert account.balance == 1000 - 77 - 77 + 77
        assert account.held == 0


def test_jobs_past_their_deadline_are_released_and_others_are_not(db: Database) -> None:
    from datetime import timedelta

    from market.models import utcnow

    account_id = _account(db, 100)
    expired, live, legacy = _job(account_id, 50), _job(account_id, 20), _job(account_id, 10)
    expired.deadline_at = utcnow() - timedelta(minutes=5)
    live.deadline_at = utcnow() + timedelta(minutes=5)
    legacy.created_at = utcnow() - timedelta(hours=2)  # stored before jobs had deadlines
    with db.session() as s:
        for job in (expired, live, legacy):
            billing.open_job(s, job)
    with db.session() as s:
        now = utcnow()
        assert billing.release_expired_jobs(
            s, now, grace_s=60, legacy_before=now - timedelta(hours=1)) == 2
    with db.session() as s:
        assert s.get(Job, expired.id).status == "failed"
        assert s.get(Job, legacy.id).status == "failed"
        assert s.get(Job, live.id).status == "running"
        account = s.get(Account, account_id)
        assert (account.balance, account.held) == (100, 20)


def test_the_database_refuses_a_balance_below_what_is_held(db: Database) -> None:
    from sqlalchemy import update
    from sqlalchemy.exc import IntegrityError

    account_id = _account(db, 100)
    with db.session() as s:
        billing.open_job(s, _job(account_id, 60))
    for values in ({"balance": 59}, {"held": -1}, {"balance": -5, "held": 0}):
        with pytest.raises(IntegrityError), db.session() as s:
            s.execute(update(Account).where(Account.id == account_id).values(**values))
    with db.session() as s:
        account = s.get(Account, account_id)
        assert (account.balance, account.held) == (100, 60)


def test_a_charge_beyond_the_hold_is_refused_and_changes_nothing(db: Database) -> None:
    account_id, node_id = _account(db, 1_000), _node(db)
    job = _job(account_id, 50)
    with db.session() as s:
        billing.open_job(s, job)
    outcome = billing.Outcome(status="completed", segments=[_segment(node_id, 70, 7)])
    with pytest.raises(billing.HoldExceeded), db.session() as s:
        billing.finalize_job(s, job.id, outcome, challenge_window_s=60)
    with db.session() as s:
        assert s.get(Job, job.id).status == "running"
        account = s.get(Account, account_id)
        assert (account.balance, account.held) == (1_000, 50)
        assert s.scalar(select(func.count()).select_from(Receipt)
                        .where(Receipt.job_id == job.id)) == 0


@pytest.mark.parametrize("earning,left,fee_bps", [(70, 77, 1000), (70, 76, 1000), (70, 0, 1000),
                                                  (1_000_003, 999, 250), (5, 1_000, 0)])
def test_cap_to_hold_never_exceeds_what_is_left(earning: int, left: int, fee_bps: int) -> None:
    capped, fee = billing.cap_to_hold(earning, fee_bps, left)
    assert capped + fee <= left
    assert fee == billing.market_fee(capped, fee_bps)
    assert capped <= earning
    if earning + billing.market_fee(earning, fee_bps) <= left:
        assert capped == earning
    else:  # the largest earning that fits: one more would not
        assert capped + 1 + billing.market_fee(capped + 1, fee_bps) > left


# ---- the group-commit writer ---------------------------------------------------------


async def _submit_together(db: Database, fns: list) -> list:
    """Submit every function before the writer runs: they share one batch."""
    writer = BatchWriter(db)
    futures = [asyncio.ensure_future(writer.submit(fn)) for fn in fns]
    writer.start()
    try:
        return await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await writer.stop()
        assert writer.batches == 1


async def test_a_refusal_in_a_batch_leaves_no_trace_and_the_rest_commit(db: Database) -> None:
    rich, poor = _account(db, 1_000), _account(db, 10)
    jobs = [_job(rich, 100), _job(poor, 500), _job(rich, 200)]
    results = await _submit_together(
        db, [lambda s, j=j: billing.open_job(s, j) for j in jobs]
    )
    assert results[0] == 900 and results[2] == 700
    assert isinstance(results[1], InsufficientBalance)
    with db.session() as s:
        assert s.get(Account, rich).held == 300
        assert s.get(Account, poor).held == 0
        ids = set(s.scalars(select(Job.id).where(Job.account_id.in_([rich, poor]))))
        assert ids == {jobs[0].id, jobs[2].id}
        holds = s.scalar(select(func.count()).select_from(LedgerEntry).where(
            LedgerEntry.kind == "hold", LedgerEntry.account_id.in_([rich, poor])))
        assert holds == 2


async def test_an_unexpected_error_fails_only_its_caller(db: Database) -> None:
    account = _account(db, 1_000)
    job = _job(account, 100)

    def broken(session: Session) -> None:
        billing.credit_account(session, account, 5, new_id("ref"))  # written, then undone
        raise RuntimeError("boom")

    results = await _submit_together(db, [broken, lambda s: billing.open_job(s, job)])
    assert isinstance(results[0], RuntimeError)
    assert results[1] == 900
    with db.session() as s:
        assert s.get(Account, account).balance == 1_000  # the broken credit left nothing


async def test_spendable_balance_reads_balance_minus_held(db: Database) -> None:
    account = _account(db, 1_000)
    await _submit_together(db, [lambda s: billing.open_job(s, _job(account, 250))])
    with db.session() as s:
        assert billing.spendable_balance(s, account) == 750
        assert billing.spendable_balance(s, "acct_unknown") == 0


def test_the_journal_audit_finds_any_balance_or_hold_the_journal_does_not_explain(
    db: Database,
) -> None:
    from sqlalchemy import update

    from market.money.journal import audit

    account_id, node_id = _account(db, 1_000), _node(db)
    done, running = _job(account_id, 300), _job(account_id, 100)
    with db.session() as s:
        billing.open_job(s, done)
        billing.open_job(s, running)
        billing.finalize_job(s, done.id, billing.Outcome(
            status="completed", segments=[_segment(node_id, 70, 7)]), challenge_window_s=60)

    def mine() -> list:
        with db.session() as s:
            return [ln for ln in audit(s) if ln.subject in (account_id, "all jobs")]

    lines = mine()
    assert all(ln.ok for ln in lines), lines
    assert {(ln.item, ln.db) for ln in lines if ln.subject == account_id} == {
        ("balance", 1_000 - 77), ("held", 100)}
    for column, value in (("balance", 1_000), ("held", 0)):
        with db.session() as s:  # a write that bypassed the journal
            before = s.get(Account, account_id)
            saved = (before.balance, before.held)
            s.execute(update(Account).where(Account.id == account_id).values(**{column: value}))
        bad = [ln for ln in mine() if not ln.ok]
        assert [ln.item for ln in bad] == [column], bad
        with db.session() as s:
            s.execute(update(Account).where(Account.id == account_id)
                      .values(balance=saved[0], held=saved[1]))
    with db.session() as s:
        s.execute(update(Job).where(Job.id == done.id).values(charged_amount=301))
    bad = [ln for ln in mine() if not ln.ok]
    assert sorted(ln.item for ln in bad) == ["job charges not in the journal",
                                             "jobs charged beyond their hold"]
