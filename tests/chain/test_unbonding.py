"""Stake unbonding: the market co-signs a withdrawal (operator + market of the 2-of-3) only
after the unbonding period, once, after the node's slashes, and only for signed requests."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from market.errors import APIError
from market.models import ChainTransfer
from market.onchain import unbonding
from market.onchain.handlers import HANDLERS
from market.onchain.models import UnbondingRequest
from market.verify.window import slash
from protocol.keys import UNBOND_DOMAIN, WITHDRAW_DOMAIN, sign


def _rt(world, period_s: float):
    settings = world.settings.model_copy(update={"chain": world.settings.chain.model_copy(
        update={"unbonding_period_s": period_s})})
    return dataclasses.replace(world.rt, settings=settings)


async def _unbond(rt, world, operator, amount: int, requested_at: int, *, signer=None):
    signature = sign(signer or operator, UNBOND_DOMAIN,
                     unbonding.unbond_message(str(operator.pubkey()), amount, requested_at))
    return await unbonding.request_unbond(rt, world.sessions, pubkey=str(operator.pubkey()),
                                          amount=amount, requested_at=requested_at,
                                          signature=signature)


async def _withdraw(rt, world, operator, *, tamper: bool = False,
                    sent: list | None = None) -> dict:
    """What ``aidp-node withdraw`` does: signed request, sign the message, submit."""
    pubkey, now = str(operator.pubkey()), int(time.time())
    offer = await unbonding.prepare_withdraw(
        rt, world.sessions, pubkey=pubkey, issued_at=now,
        signature=sign(operator, WITHDRAW_DOMAIN, unbonding.withdraw_message(pubkey, now)))
    tx_sig = unbonding.sign_withdraw_message(operator, offer["message"])
    if tamper:  # a signature of something else
        tx_sig = str(operator.sign_message(b"not the message"))
    submission = {"pubkey": pubkey, "request_id": offer["request_id"],
                  "blockhash": offer["blockhash"], "tx_signature": tx_sig}
    if sent is not None:
        sent.append(submission)
    return await unbonding.submit_withdraw(rt, world.sessions, **submission)


async def _balances(world, operator) -> tuple[int, int]:
    stake = world.rt.stake_of(operator.pubkey())
    return (await world.ledger.token_balance(stake.account_pk),
            await world.tokens(operator.pubkey()))


def _withdraw_rows(world) -> list[ChainTransfer]:
    with world.sessions() as s:
        return list(s.execute(select(ChainTransfer).where(ChainTransfer.kind == "withdraw"))
                    .scalars())


async def _due_unbond_and_receipt(world, amount: int, state: str):
    """A node with 5 000 stake whose unbond of ``amount`` is already due, and one of its
    receipts in ``state``: what the withdrawal-gating tests start from."""
    buyer = world.account(balance=10_000)
    node_id, operator = await world.node(stake=5_000)
    rt = _rt(world, 5)
    await _unbond(rt, world, operator, amount, int(time.time()) - 10)
    receipt = world.receipt(node_id, buyer, earning=90, fee=10, state=state)
    return rt, operator, receipt


async def test_withdraw_before_the_period_is_refused_and_moves_nothing(db_world):
    world = db_world
    _, operator = await world.node(stake=5_000)
    rt = _rt(world, 3600)
    req = await _unbond(rt, world, operator, 2_000, int(time.time()))
    assert req["state"] == "requested"
    before = await _balances(world, operator)
    with pytest.raises(APIError) as exc:
        await _withdraw(rt, world, operator)
    assert exc.value.status_code == 409 and exc.value.code == "unbonding_period_not_elapsed"
    assert await _balances(world, operator) == before
    assert _withdraw_rows(world) == []


async def test_withdraw_after_the_period_lands_once(db_world):
    world = db_world
    node_id, operator = await world.node(stake=5_000)
    rt = _rt(world, 5)
    await _unbond(rt, world, operator, 2_000, int(time.time()) - 10)
    assert await _balances(world, operator) == (5_000, 0)

    submitted: list = []
    out = await _withdraw(rt, world, operator, sent=submitted)
    assert out["confirmed"] and out["amount"] == 2_000
    assert await _balances(world, operator) == (3_000, 2_000)
    (row,) = _withdraw_rows(world)
    assert row.state == "confirmed" and row.signature == out["signature"]
    tx = await world.ledger.get_transaction(row.signature)
    assert tx.ok and tx.memos == [row.memo] and row.memo.startswith("aidp:withdraw:v1:")
    signers = set(tx.account_keys[:2])
    assert signers == {world.cfg.market, str(operator.pubkey())}  # operator + market
    with world.sessions() as s:
        req = s.execute(select(UnbondingRequest)).scalar_one()
        assert req.state == "withdrawn" and req.transfer_key == row.idempotency_key

    with pytest.raises(APIError) as exc:  # a second call pays nothing more
        await _withdraw(rt, world, operator)
    assert exc.value.status_code == 409 and exc.value.code == "nothing_to_withdraw"
    with pytest.raises(APIError) as exc:  # the same signed submission replayed
        await unbonding.submit_withdraw(rt, world.sessions, **submitted[0])
    assert exc.value.status_code == 409 and exc.value.code == "nothing_to_withdraw"
    assert await _balances(world, operator) == (3_000, 2_000)
    assert len(_withdraw_rows(world)) == 1
    await world.step("settle")  # stake sync mirrors the chain
    from market.models import Node

    with world.sessions() as s:
        assert s.get(Node, node_id).stake == 3_000


async def test_bad_signatures_replays_and_stale_requests_are_refused(db_world):
    world = db_world
    _, operator = await world.node(stake=5_000)
    _, other = await world.node(stake=1)
    rt = _rt(world, 5)
    now = int(time.time())
    cases = [
        ({"amount": 1_000, "requested_at": now - 10, "signer": other}, 403, "invalid_signature"),
        ({"amount": 1_000, "requested_at": now - 3600}, 400, "stale_request"),
        ({"amount": 9_000, "requested_at": now - 9}, 409, "insufficient_stake"),
    ]
    for kwargs, status, code in cases:
        with pytest.raises(APIError) as exc:
            await _unbond(rt, world, operator, **kwargs)
        assert (exc.value.status_code, exc.value.code) == (status, code), kwargs
    await _unbond(rt, world, operator, 1_000, now - 10)
    with pytest.raises(APIError) as exc:  # the same signed request again
        await _unbond(rt, world, operator, 1_000, now - 10)
    assert (exc.value.status_code, exc.value.code) == (409, "replayed_request")
    with world.sessions() as s:
        assert len(s.execute(select(UnbondingRequest)).all()) == 1

    pubkey = str(operator.pubkey())
    with pytest.raises(APIError) as exc:  # withdraw request signed by someone else
        await unbonding.prepare_withdraw(
            rt, world.sessions, pubkey=pubkey, issued_at=now,
            signature=sign(other, WITHDRAW_DOMAIN, unbonding.withdraw_message(pubkey, now)))
    assert (exc.value.status_code, exc.value.code) == (403, "invalid_signature")
    with pytest.raises(APIError) as exc:  # an unbond signature is no withdraw signature
        await unbonding.prepare_withdraw(
            rt, world.sessions, pubkey=pubkey, issued_at=now,
            signature=sign(operator, UNBOND_DOMAIN, unbonding.withdraw_message(pubkey, now)))
    assert exc.value.code == "invalid_signature"
    with pytest.raises(APIError) as exc:  # the message signature must be the operator's
        await _withdraw(rt, world, operator, tamper=True)
    assert (exc.value.status_code, exc.value.code) == (403, "invalid_signature")
    offer = await unbonding.prepare_withdraw(
        rt, world.sessions, pubkey=pubkey, issued_at=now,
        signature=sign(operator, WITHDRAW_DOMAIN, unbonding.withdraw_message(pubkey, now)))
    thief = str(other.pubkey())
    with pytest.raises(APIError) as exc:  # another node submitting for this request
        await unbonding.submit_withdraw(
            rt, world.sessions, pubkey=thief, request_id=offer["request_id"],
            blockhash=offer["blockhash"],
            tx_signature=str(other.sign_message(bytes(unbonding.withdraw_tx_message(
                rt, thief, offer["request_id"], offer["amount"], offer["blockhash"])))))
    assert (exc.value.status_code, exc.value.code) == (409, "nothing_to_withdraw")
    # the market alone cannot send a withdrawal: the settlement loop refuses to build one
    (row,) = _withdraw_rows(world)
    from market.onchain import transfers

    assert (await transfers.drive(rt, world.sessions, [row.id], HANDLERS)).counts == {"error": 1}
    assert await _balances(world, operator) == (5_000, 0)
    assert all(r.state == "planned" for r in _withdraw_rows(world))


async def test_a_slash_planned_before_the_withdrawal_is_taken_first(db_world):
    world = db_world
    rt, operator, r = await _due_unbond_and_receipt(world, 4_500, "verifying")
    with world.sessions.begin() as s:
        assert slash(s, r.id, world.settings, reason="fraud", verification={}).amount == 1_000

    with pytest.raises(APIError) as exc:
        await _withdraw(rt, world, operator)
    assert (exc.value.status_code, exc.value.code) == (409, "slash_pending")
    assert await _balances(world, operator) == (5_000, 0)

    assert (await world.step("settle"))["settle"]["slashes"] == {"confirmed": 1}
    out = await _withdraw(rt, world, operator)
    assert out["confirmed"] and out["amount"] == 4_000  # what the slash left
    assert await _balances(world, operator) == (0, 4_000)
    assert await world.ledger.token_balance(world.cfg.treasury_pk) == 1_000


async def test_a_withdrawal_waits_for_the_nodes_open_challenge_windows(db_world):
    """Stake answers for receipts that may still be slashed: while one of the node's
    receipts is in its window (or being verified, or escalated), nothing is withdrawn."""
    from sqlalchemy import update

    from market.models import Receipt

    world = db_world
    rt, operator, r = await _due_unbond_and_receipt(world, 2_000, "pending")
    for state in ("pending", "verifying", "escalated"):
        with world.sessions.begin() as s:
            s.execute(update(Receipt).where(Receipt.id == r.id).values(state=state))
        with pytest.raises(APIError) as exc:
            await _withdraw(rt, world, operator)
        assert (exc.value.status_code, exc.value.code) == (409, "challenge_window_open"), state
        assert await _balances(world, operator) == (5_000, 0)
    with world.sessions.begin() as s:
        s.execute(update(Receipt).where(Receipt.id == r.id).values(state="settled"))
    out = await _withdraw(rt, world, operator)
    assert out["confirmed"] and out["amount"] == 2_000


async def test_unbond_and_withdraw_over_http_through_aidp_ledger(request, tmp_path, db_url):
    """The endpoints and ``aidp-node``'s client against a real ``aidp-ledger`` server."""
    from chain.ledger.open import open_ledger
    from market.app import create_app
    from node_agent.stake import stake_unbond, stake_withdraw
    from tests.chain.conftest import make_settings, make_world

    server = request.getfixturevalue("chain_server")
    ledger = open_ledger(server.url)
    try:
        settings = make_settings(tmp_path, db_url, chain__ledger_url=server.url,
                                 chain__unbonding_period_s=2, migrate_on_start=False)
        world = await make_world(settings, ledger)
        _, operator = await world.node(stake=3_000)
        with TestClient(create_app(settings)) as client:
            market = "http://testserver"
            req = stake_unbond(client, market, operator, 1_200)
            with pytest.raises(RuntimeError, match="409 unbonding_period_not_elapsed"):
                stake_withdraw(client, market, operator)
            bad = client.post("/v1/stake/unbond", json={
                "pubkey": str(operator.pubkey()), "amount": 1, "requested_at": 1,
                "signature": "x"})
            assert bad.status_code == 403
            assert bad.json()["error"]["code"] == "invalid_signature"
            assert await _balances(world, operator) == (3_000, 0)
            await asyncio.sleep(max(0.0, req["requested_at"] + 2.2 - time.time()))
            out = stake_withdraw(client, market, operator)
            assert out["confirmed"] and out["amount"] == 1_200
            with pytest.raises(RuntimeError, match="409 nothing_to_withdraw"):
                stake_withdraw(client, market, operator)
        assert await _balances(world, operator) == (1_800, 1_200)
    finally:
        await ledger.close()


async def test_a_withdrawal_lost_after_it_was_recorded_sent_is_never_paid_twice(db_world):
    """The market dies between recording ``sent`` and broadcasting: the row waits while its
    blockhash may still land, then (expired, so it never can) is re-planned on the same key."""
    world = db_world
    _, operator = await world.node(stake=5_000)
    rt = _rt(world, 5)
    await _unbond(rt, world, operator, 1_000, int(time.time()) - 10)

    class Crash(Exception):
        pass

    async def crash(prepared, **_kw):
        raise Crash

    real_submit = world.ledger.submit
    world.ledger.submit = crash  # fault: nothing is broadcast
    try:
        with pytest.raises(Crash):
            await _withdraw(rt, world, operator)
    finally:
        world.ledger.submit = real_submit
    (row,) = _withdraw_rows(world)
    assert row.state == "sent" and row.signature
    with pytest.raises(APIError) as exc:  # may still land: no second message meanwhile
        await _withdraw(rt, world, operator)
    assert exc.value.code == "withdrawal_in_flight"
    assert await _balances(world, operator) == (5_000, 0)

    await world.ledger.advance_slots(200)  # its blockhash expires: it can never land now
    out = await _withdraw(rt, world, operator)
    assert out["confirmed"] and out["signature"] != row.signature
    (again,) = _withdraw_rows(world)
    assert again.idempotency_key == row.idempotency_key and again.state == "confirmed"
    assert await _balances(world, operator) == (4_000, 1_000)
