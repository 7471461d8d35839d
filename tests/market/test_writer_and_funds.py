"""The group-commit writer and the in-memory funds view, on the real databases."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from market import accounts, billing
from market.db import Database
from market.errors import InsufficientBalance
from market.funds import FundsCache
from market.migrate import upgrade
from market.models import Account, Job, LedgerEntry, new_id
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
        billing.credit_account(s, account.id, balance, new_id("ref"))
        return account.id


def _job(account_id: str, hold: int) -> Job:
    return Job(id=new_id("job"), account_id=account_id, model="m", kind="chat", request={},
               stream=False, status="running", hold_amount=hold)


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


async def test_concurrent_refreshes_share_one_read() -> None:
    cache = FundsCache(ttl=60)
    reads = 0
    gate = asyncio.Event()

    async def read() -> int:
        nonlocal reads
        reads += 1
        await gate.wait()
        return 1_000

    waiting = [asyncio.ensure_future(cache.refresh("a", read)) for _ in range(5)]
    await asyncio.sleep(0)
    assert not cache.is_fresh("a") and not cache.try_reserve("a", 1)
    gate.set()
    await asyncio.gather(*waiting)
    assert reads == 1
    assert cache.try_reserve("a", 600)
    assert not cache.try_reserve("a", 600)  # 400 left while the first hold is pending


async def test_a_reading_older_than_a_commit_is_dropped() -> None:
    cache = FundsCache(ttl=60)
    gate = asyncio.Event()

    async def read() -> int:
        await gate.wait()
        return 1_000  # taken before the hold below committed

    refreshing = asyncio.ensure_future(cache.refresh("a", read))
    await asyncio.sleep(0)
    cache.observe("a", 200)  # a hold committed meanwhile and reported what is left
    gate.set()
    await refreshing
    assert not cache.try_reserve("a", 201)
    assert cache.try_reserve("a", 200)


async def test_a_stale_entry_is_not_trusted() -> None:
    cache = FundsCache(ttl=0.01)
    cache.observe("a", 1_000)
    assert cache.is_fresh("a")
    await asyncio.sleep(0.02)
    assert not cache.is_fresh("a") and not cache.try_reserve("a", 1)
