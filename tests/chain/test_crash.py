"""Exactly-once under crashes: the settlement worker is SIGKILLed between recording a
transfer as ``sent`` and recording its confirmation, then restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from chain import aidp
from chain.ledger.open import open_ledger
from market.models import ChainTransfer, LedgerEntry
from market.onchain.handlers import HANDLERS
from tests.chain.conftest import make_settings, make_world, open_backend

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import asyncio, json, os, signal, sys
from market.onchain import service, transfers
from market.db import sync_session_factory
from market.settings import MarketSettings, nested

settings = MarketSettings(**nested(json.loads(sys.argv[1])))
point = sys.argv[2]

def crash(at, row_id):
    if at == point:
        os.kill(os.getpid(), signal.SIGKILL)

transfers.fault_hook = crash
out = asyncio.run(service.run_steps(settings, sync_session_factory(settings.db.url),
                                    ["settle"]))
print(json.dumps(out))
"""


def run_worker(settings, point: str) -> subprocess.CompletedProcess[str]:
    values = {"db__url": settings.db.url, "data_dir": str(settings.data_dir),
              "chain__ledger_url": settings.chain.ledger_url, "broker__url": settings.broker.url}
    return subprocess.run([sys.executable, "-c", WORKER, json.dumps(values), point], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("point,expire", [("sent", False), ("sent", True), ("landed", False)])
async def test_killed_worker_never_pays_twice(backend, request, tmp_path, db_url, point, expire):
    ledger = open_backend(backend, request, tmp_path)
    ledger_url = "inprocess" if backend == "inprocess" else request.getfixturevalue(
        "chain_server").url
    settings = make_settings(tmp_path, db_url, chain__ledger_url=ledger_url)
    world = await make_world(settings, ledger)
    buyer = world.account()
    node, kp = await world.node()
    for _ in range(3):
        world.receipt(node, buyer, earning=1_000, fee=100)
    await world.fund_deposit_account(10_000)
    if backend == "inprocess":
        await ledger.close()  # one process holds an in-process chain at a time

    crashed = run_worker(settings, point)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]

    if backend == "inprocess":
        ledger = world.ledger = world.rt.ledger = open_ledger("inprocess", settings.data_dir)
    with world.sessions() as s:
        row = s.execute(select(ChainTransfer).where(ChainTransfer.kind == "payout")).scalar_one()
    assert row.state == "sent" and row.signature
    landed = await ledger.signature_statuses([row.signature])
    vault = aidp.program.payout_vault_address(world.cfg.program_pk, row.id)
    if point == "sent":  # recorded, never broadcast
        assert landed == [None] and await ledger.token_balance(vault) == 0
    else:  # the epoch was posted on chain, the crash lost the confirmation
        assert landed[0] is not None and await ledger.token_balance(vault) == 3_000
    assert await world.tokens(kp.pubkey()) == 0
    if expire:
        await ledger.advance_slots(200)

    if backend == "inprocess":
        await ledger.close()
    restarted = run_worker(settings, "none")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    again = run_worker(settings, "none")
    assert again.returncode == 0, again.stderr[-3000:]
    if backend == "inprocess":
        ledger = world.ledger = world.rt.ledger = open_ledger("inprocess", settings.data_dir)

    assert await world.tokens(kp.pubkey()) == 3_000  # exactly once
    assert await ledger.token_balance(world.cfg.treasury_pk) == 300
    with world.sessions() as s:
        rows = s.execute(select(ChainTransfer).where(
            ChainTransfer.kind.in_(["payout", "claim", "fee"]))).scalars().all()
        assert sorted((r.kind, r.state, r.amount) for r in rows) == [
            ("claim", "confirmed", 3_000), ("fee", "confirmed", 300),
            ("payout", "confirmed", 3_000)]
        final = next(r for r in rows if r.kind == "payout")
        assert (final.signature != row.signature) == expire  # re-planned only when expired
        journal = s.execute(select(LedgerEntry).where(LedgerEntry.kind == "payout")).scalars()
        assert [e.amount for e in journal] == [3_000]
    from market.onchain import reconcile

    lines = await reconcile.reconcile(world.rt, world.sessions)
    assert all(line.ok for line in lines), reconcile.render(lines)
    await ledger.close()


async def test_a_rejected_send_rebroadcast_by_another_worker_is_paid_once(world):
    """Worker A records an epoch's post as ``sent`` and is refused by preflight (the
    deposit account is empty); worker B, which read the row as ``sent``, re-broadcasts the
    same bytes after the account was funded, and they land. The row must still know that
    signature, or the next round re-plans and funds the epoch a second time."""
    from market.onchain import settle, transfers

    buyer = world.account()
    node, kp = await world.node()
    world.receipt(node, buyer, earning=1_000, fee=0)
    with world.sessions.begin() as s:
        (payout_id,) = settle.plan_payout_round(s, world.rt, limit=10)
    (planned,) = transfers._load(world.sessions, [payout_id])

    seen_by_b = []

    def b_reads_the_row(at: str, row_id: int) -> None:
        if at == "sent":
            seen_by_b.extend(transfers._load(world.sessions, [row_id]))

    transfers.fault_hook = b_reads_the_row
    try:
        assert await transfers.drive_one(world.rt, world.sessions, planned, HANDLERS,
                                         timeout=5) == "rejected"
    finally:
        transfers.fault_hook = None
    assert await world.tokens(kp.pubkey()) == 0

    await world.fund_deposit_account(5_000)
    (b_row,) = seen_by_b
    assert b_row.state == "sent"
    assert await transfers.drive_one(world.rt, world.sessions, b_row, HANDLERS,
                                     timeout=10) == "confirmed"
    vault = aidp.program.payout_vault_address(world.cfg.program_pk, payout_id)
    assert await world.ledger.token_balance(vault) == 1_000  # the epoch is posted

    await world.step("settle")
    await world.step("settle")
    assert await world.tokens(kp.pubkey()) == 1_000  # claimed once
    assert await world.ledger.token_balance(vault) == 0
    with world.sessions() as s:
        row = s.get(ChainTransfer, payout_id)
        assert row.state == "confirmed" and row.signature == b_row.signature
