"""The Celery tasks: registered on the worker's app, scheduled by beat, acknowledged late,
idle before `chain init`, and doing the real steps when run."""

from __future__ import annotations

import asyncio

from solders.keypair import Keypair

from chain import aidp
from market.db import sync_session_factory
from market.models import Account
from market.onchain import bootstrap
from market.onchain.runtime import open_runtime
from market.worker import chain_tasks as tasks
from market.worker.celery_app import celery_app
from tests.chain.conftest import make_settings


def test_tasks_are_registered_and_scheduled():
    celery_app.loader.import_default_modules()
    for name in (tasks.FUNDING_TASK, tasks.SETTLE_TASK, tasks.ANCHOR_TASK):
        task = celery_app.tasks[name]
        assert task.acks_late and task.max_retries >= 2
    scheduled = {e["task"] for e in celery_app.conf.beat_schedule.values()}
    assert scheduled >= {tasks.FUNDING_TASK, tasks.SETTLE_TASK, tasks.ANCHOR_TASK}


def test_tasks_idle_before_init_then_work(tmp_path, db_url, monkeypatch):
    settings = make_settings(tmp_path, db_url)
    sessions = sync_session_factory(db_url)
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    monkeypatch.setattr(tasks, "sessions", lambda: sessions)
    assert "idle" in tasks.funding.apply().get()

    async def deposit() -> str:
        await bootstrap.init(settings, sessions)
        with sessions.begin() as s:
            acct = Account(name="b", balance=0, held=0)
            s.add(acct)
            s.flush()
            account_id = acct.id
        async with open_runtime(settings) as rt:
            wallet = Keypair()
            await aidp.fund_wallet(rt.ledger, rt.cfg, rt.market, wallet.pubkey(),
                                         tokens=500)
            await rt.ledger.execute(aidp.deposit_instructions(
                rt.cfg, wallet.pubkey(), 500, account_id), wallet)
        return account_id

    account_id = asyncio.run(deposit())
    assert tasks.funding.apply().get()["deposits_credited"] == 1
    assert tasks.funding.apply().get()["deposits_credited"] == 0
    assert "payouts" in tasks.settle.apply().get()
    assert tasks.anchor.apply().get() == {"anchored": 0}
    with sessions() as s:
        assert s.get(Account, account_id).balance == 500
