"""Holds never leak and money is never counted twice, whatever dies on the way.

Invariants held here: 9 (a periodic sweeper, finalize retried until it lands), 1 (the
database constraint on balances).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import openai
from solders.keypair import Keypair
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from inference.fake import fake_sha256
from market.db import Database
from market.models import Account, Job, LedgerEntry, new_id, utcnow
from market.money import billing
from market.money.accounts import create_account
from market.money.journal import audit
from node_agent.link import NodeLink
from tests.support.engines import DeterministicEngine
from tests.support.market import ADMIN_TOKEN, Market, Nodes, start_market, unique_model, wait_for
from tests.support.net import free_port

BIN = Path(sys.executable).parent


def _journal_ok(db: Database) -> None:
    with db.session() as s:
        bad = [ln for ln in audit(s) if not ln.ok]
    assert not bad, bad


def _account(db: Database, account_id: str) -> tuple[int, int]:
    with db.session() as s:
        a = s.get(Account, account_id)
        return int(a.balance), int(a.held)


async def test_the_sweeper_releases_a_hold_left_by_a_dead_process(db_url: str) -> None:
    """Not only at start-up: a running market releases, within a sweep, the hold of a job
    another (dead) process left running past its deadline, and leaves live ones alone."""
    market = start_market(db_url, routing__hold_sweep_interval_s=0.2, routing__hold_sweep_grace_s=0.0,
                          routing__cancel_receipt_timeout_s=0.1)
    try:
        db = market.state.db
        with db.session() as s:
            account_id = create_account(s, "orphan").id
            billing.credit_account(s, account_id, 1_000, new_id("ref"))
        orphan = Job(id=new_id("job"), account_id=account_id, model="m", kind="chat",
                     request={}, status="running", hold_amount=400,
                     deadline_at=utcnow() - timedelta(seconds=1))
        live = Job(id=new_id("job"), account_id=account_id, model="m", kind="chat",
                   request={}, status="running", hold_amount=100,
                   deadline_at=utcnow() + timedelta(hours=1))
        with db.session() as s:
            billing.open_job(s, orphan)
            billing.open_job(s, live)
        assert _account(db, account_id) == (1_000, 500)
        await wait_for(lambda: _account(db, account_id) == (1_000, 100), timeout=10)
        with db.session() as s:
            assert s.get(Job, orphan.id).status == "failed"
            assert s.get(Job, live.id).status == "running"
            releases = s.scalar(select(func.count()).select_from(LedgerEntry).where(
                LedgerEntry.job_id == orphan.id, LedgerEntry.kind == "release"))
            assert releases == 1
    finally:
        market.stop()


async def test_a_failed_finalize_is_retried_until_it_lands_and_charges_once(
    market: Market, nodes: Nodes, monkeypatch
) -> None:
    model = unique_model("flaky-db")
    await nodes.start(model)
    buyer = market.buyer(credit=10**9)
    calls: dict[str, int] = {}
    real = billing.finalize_job

    def flaky(session, job_id, outcome, **kwargs):
        if outcome.status != "completed":  # a sweep, another test's job: untouched
            return real(session, job_id, outcome, **kwargs)
        calls[job_id] = calls.get(job_id, 0) + 1
        if calls[job_id] <= 2:  # the database goes away twice (an injected fault)
            raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection"))
        return real(session, job_id, outcome, **kwargs)

    monkeypatch.setattr(billing, "finalize_job", flaky)
    reply = await buyer.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "pay me once"}], max_tokens=6)
    assert reply.choices[0].message.content  # the buyer is answered meanwhile
    job_id = reply.id.removeprefix("chatcmpl-")
    db = market.state.db

    def finalized() -> bool:
        with db.session() as s:
            return s.get(Job, job_id).status == "completed"

    await wait_for(lambda: finalized() and job_id not in market.state.finalizing, timeout=15)
    with db.session() as s:
        job = s.get(Job, job_id)
        charges = s.scalars(select(LedgerEntry.amount).where(
            LedgerEntry.job_id == job_id, LedgerEntry.kind == "charge")).all()
    assert calls[job_id] == 3 and charges == [job.charged_amount] and job.charged_amount > 0
    balance, held = _account(db, buyer.account_id)
    assert held == 0 and balance == 10**9 - job.charged_amount
    _journal_ok(db)


def _serve(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(BIN / "aidp-market"), "serve"], env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115


def _wait_up(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "the market exited"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError("market did not start")


async def test_a_market_killed_between_hold_and_finalize_releases_the_hold_on_restart(
    db_url: str, tmp_path: Path
) -> None:
    """SIGKILL mid-stream: the job's hold is in the database, its finalize never ran. The
    restarted market (its sweeper) fails the job and releases the hold; nothing is charged
    and the journal still explains every base unit."""
    port, model = free_port(), unique_model("crash")
    env = {**os.environ, "AIDP_DB__URL": db_url, "AIDP_PORT": str(port),
           "AIDP_HOST": "127.0.0.1", "AIDP_DATA_DIR": str(tmp_path),
           "AIDP_ADMIN_TOKEN": ADMIN_TOKEN, "AIDP_LIST_DEFAULT_MODEL": "false",
           "AIDP_MODELS": json.dumps({model: {"sha256": [fake_sha256(model)],
                                              "vocabulary": "fake"}}),
           "AIDP_ROUTING__JOB_FIRST_TOKEN_TIMEOUT": "2", "AIDP_LIMITS__JOB_MAX_DURATION_S": "2",
           "AIDP_ROUTING__HOLD_SWEEP_INTERVAL_S": "0.3", "AIDP_ROUTING__HOLD_SWEEP_GRACE_S": "0",
           "AIDP_ROUTING__CANCEL_RECEIPT_TIMEOUT_S": "0.2", "AIDP_ROUTING__HEARTBEAT_INTERVAL": "0.5"}
    url = f"http://127.0.0.1:{port}"
    process = _serve(env, tmp_path / "market.log")
    link = task = None
    db = Database(db_url)
    try:
        _wait_up(url, process)
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        account = httpx.post(f"{url}/admin/accounts", json={"name": "crash"},
                             headers=admin).json()
        httpx.post(f"{url}/admin/accounts/{account['id']}/credit", json={"amount": 10**6},
                   headers=admin).raise_for_status()
        key = httpx.post(f"{url}/admin/accounts/{account['id']}/keys", json={},
                         headers=admin).json()["key"]
        link = NodeLink(url, Keypair(), DeterministicEngine(model, token_delay=0.2),
                        price=(1_000, 1_000), backoff_initial=0.2, backoff_max=0.5)
        task = asyncio.create_task(link.run())
        await link.wait_ready(20)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        await asyncio.sleep(0.6)  # routable after the link's first heartbeat
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "a long answer"}],
            max_tokens=200, stream=True)
        received = 0
        try:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received += 1
                    if received == 3:
                        process.send_signal(signal.SIGKILL)  # the market dies mid-stream
                        process.wait(10)
        except (openai.APIError, httpx.HTTPError):
            pass  # the buyer's stream ends with the connection
        assert received >= 3
        await client.close()
        balance, held = _account(db, account["id"])
        assert held > 0 and balance == 10**6  # held, never finalized
        with db.session() as s:
            running = s.scalars(select(Job.id).where(Job.account_id == account["id"],
                                                     Job.status == "running")).all()
        assert len(running) == 1

        process = _serve(env, tmp_path / "market.log")  # the operator restarts it
        _wait_up(url, process)
        await wait_for(lambda: _account(db, account["id"]) == (10**6, 0), timeout=20)
        with db.session() as s:
            job = s.get(Job, running[0])
            assert job.status == "failed" and job.charged_amount == 0
        _journal_ok(db)
        await link.wait_ready(20)  # the node reconnects by itself
    finally:
        if link is not None:
            await link.stop()
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if process.poll() is None:
            process.terminate()
            process.wait(10)
        await db.dispose()
