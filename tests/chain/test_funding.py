"""Buyer funding: deposits credited exactly once, allowances pulled within limits and
revocation stopping new jobs (402) — through billing's real hold check."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from chain import aidp
from chain.ledger.base import TransactionRejected
from market.errors import InsufficientBalance
from market.models import Account, ChainTransfer, Job, LedgerEntry, new_id
from market.money import billing
from market.onchain import deposits
from market.onchain.models import ChainAllowance, ChainDeposit
from tests.chain.conftest import register_allowance


def _balance(world, account_id: str) -> int:
    with world.sessions() as s:
        return s.get(Account, account_id).balance


async def _deposit_flow(world) -> None:
    buyer_acct = world.account()
    wallet = await world.wallet(tokens=5_000)
    await world.ledger.execute(
        aidp.deposit_instructions(world.cfg, wallet.pubkey(), 1_200, buyer_acct), wallet)
    await world.ledger.execute(
        aidp.deposit_instructions(world.cfg, wallet.pubkey(), 300, "acct_nobody"), wallet)

    out = await world.step("funding")
    assert out["funding"]["deposits_credited"] == 1
    assert out["funding"]["deposits_unclaimed"] == 1
    assert _balance(world, buyer_acct) == 1_200
    # scanning again, from the saved cursor and from the very start, credits nothing more
    assert (await world.step("funding"))["funding"]["deposits_credited"] == 0
    again = await deposits.scan(world.rt, world.sessions, from_start=True)
    assert again.seen == 2 and again.credited == [] and again.unclaimed == []
    assert _balance(world, buyer_acct) == 1_200

    with world.sessions() as s:
        rows = {d.status: d for d in s.execute(select(ChainDeposit)).scalars()}
        assert rows["unclaimed"].amount == 300 and rows["unclaimed"].account_id is None
        credits = s.scalar(select(func.count()).where(LedgerEntry.kind == "deposit"))
        assert credits == 1
        transfers = s.execute(
            select(ChainTransfer).where(ChainTransfer.kind == "deposit")).scalars()
        assert sorted((t.state, t.amount) for t in transfers) == [("confirmed", 300),
                                                                   ("confirmed", 1200)]
    # an operator assigns the unclaimed deposit, once
    with world.sessions.begin() as s:
        assert deposits.claim(s, rows["unclaimed"].signature, buyer_acct)
    with world.sessions.begin() as s:
        assert not deposits.claim(s, rows["unclaimed"].signature, buyer_acct)
    assert _balance(world, buyer_acct) == 1_500

    from market.onchain import reconcile

    lines = await reconcile.reconcile(world.rt, world.sessions)
    assert all(line.ok for line in lines), reconcile.render(lines)


def _open_job(world, account_id: str, hold: int) -> str:
    with world.sessions.begin() as s:
        job = Job(id=new_id("job"), account_id=account_id, model="m", kind="chat", request={},
                  hold_amount=hold)
        billing.open_job(s, job)
        return job.id


def _finish_job(world, job_id: str, charge: int) -> None:
    with world.sessions.begin() as s:
        assert billing.finalize_job(s, job_id, billing.Outcome(
            status="completed", unreceipted_charge=charge), challenge_window_s=0)


async def _allowance_flow(world) -> None:
    acct = world.account()
    wallet = await world.wallet(tokens=10_000)
    await world.ledger.execute(aidp.approve_instructions(world.cfg, wallet.pubkey(), 1_000),
                               wallet)
    with world.sessions.begin() as s:
        register_allowance(s, wallet, acct)
    await world.step("funding")
    assert _balance(world, acct) == 1_000  # spendable = on-chain allowance

    with pytest.raises(InsufficientBalance):  # more than the allowance: 402
        _open_job(world, acct, 1_001)
    job = _open_job(world, acct, 900)
    _finish_job(world, job, 800)
    assert _balance(world, acct) == 200  # 1000 allowed − 800 owed

    out = await world.step("settle")
    assert out["settle"]["pulls"] == {"confirmed": 1}
    assert await world.tokens(wallet.pubkey()) == 9_200
    assert await world.ledger.token_balance(world.cfg.deposit_pk) == 800
    assert await aidp.allowance(world.ledger, world.cfg, wallet.pubkey()) == 200
    await world.step("funding")
    assert _balance(world, acct) == 200  # unchanged: the pull paid what was owed
    with world.sessions() as s:
        assert s.get(ChainAllowance, acct).credited == 200
    assert (await world.step("settle"))["settle"]["pulls"] == {}  # nothing owed

    # the buyer moves tokens away: the pull never exceeds what the chain allows
    job = _open_job(world, acct, 200)
    _finish_job(world, job, 200)
    other = await world.wallet()
    from chain import spl

    await world.ledger.execute([spl.transfer_checked(
        world.cfg.ata(wallet.pubkey()), world.cfg.mint_pk, world.cfg.ata(other.pubkey()),
        wallet.pubkey(), 9_150, world.cfg.decimals)], wallet)
    assert await aidp.allowance(world.ledger, world.cfg, wallet.pubkey()) == 50
    out = await world.step("settle")
    assert out["settle"]["pulls"] == {"confirmed": 1}
    assert await world.tokens(wallet.pubkey()) == 0  # pulled 50, the rest is still owed
    with pytest.raises(TransactionRejected):  # and the chain itself refuses more
        await world.ledger.execute(aidp.pull_instructions(
            world.cfg, wallet.pubkey(), 1, "manual"), world.rt.market)

    # revocation: the balance cannot go below zero (the database refuses it); what is
    # still owed is kept as a shortfall, and new jobs get 402
    await world.ledger.execute(aidp.approve_instructions(world.cfg, wallet.pubkey(), 0),
                               wallet)
    await world.ledger.execute(aidp.revoke_instructions(world.cfg, wallet.pubkey()), wallet)
    await world.step("funding")
    assert _balance(world, acct) == 0
    with pytest.raises(InsufficientBalance):
        _open_job(world, acct, 1)
    with world.sessions() as s:
        row = s.get(ChainAllowance, acct)
        assert row.active is False
        assert row.shortfall == 150  # 1000 charged, 850 pulled
        pulled = s.scalar(select(func.sum(LedgerEntry.amount)).where(LedgerEntry.kind == "pull"))
        assert pulled == 850

    # a new approval repays the shortfall first: the buyer can spend only the rest, and
    # the market pulls the 150 it was owed
    await world.ledger.execute([spl.transfer_checked(
        world.cfg.ata(other.pubkey()), world.cfg.mint_pk, world.cfg.ata(wallet.pubkey()),
        other.pubkey(), 1_000, world.cfg.decimals)], other)
    await world.ledger.execute(aidp.approve_instructions(world.cfg, wallet.pubkey(), 400),
                               wallet)
    await world.step("funding")
    assert _balance(world, acct) == 250
    with world.sessions() as s:
        assert s.get(ChainAllowance, acct).shortfall == 0
    out = await world.step("settle")
    assert out["settle"]["pulls"] == {"confirmed": 1}
    with world.sessions() as s:
        pulled = s.scalar(select(func.sum(LedgerEntry.amount)).where(LedgerEntry.kind == "pull"))
        assert pulled == 1_000  # every charge paid


# each flow on every chain backend, and on the in-process chain with every database
async def test_deposit_is_credited_once_and_unknown_memo_is_unclaimed(world):
    await _deposit_flow(world)


async def test_deposits_on_every_database(db_world):
    await _deposit_flow(db_world)


async def test_allowance_limits_pulls_and_revocation(world):
    await _allowance_flow(world)


async def test_allowances_on_every_database(db_world):
    await _allowance_flow(db_world)


async def test_wallet_cannot_change_under_a_pull_in_flight(db_world):
    from market.errors import BadRequest
    from market.onchain import transfers

    world = db_world
    acct = world.account()
    first, second = await world.wallet(), await world.wallet()
    with world.sessions.begin() as s:
        register_allowance(s, first, acct, signed_at=int(time.time()) - 2)
        transfers.plan(s, kind="pull", key=f"pull:{acct}.1", amount=5,
                       from_address=str(world.cfg.ata(first.pubkey())),
                       to_address=world.cfg.deposit,
                       memo=aidp.keyed_memo("pull", f"{acct}.1"))
    with pytest.raises(BadRequest, match="in flight"), world.sessions.begin() as s:
        register_allowance(s, second, acct, signed_at=int(time.time()) - 1)
    with world.sessions.begin() as s:  # once it is settled either way, the switch is allowed
        s.execute(ChainTransfer.__table__.update().values(state="cancelled"))
        assert register_allowance(s, second, acct).wallet == str(second.pubkey())
