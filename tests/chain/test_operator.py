"""A node operator and the program, with no market key in between: ``aidp-node``'s
``stake``, ``unbond``, ``withdraw`` and ``claim`` against a real ``aidp-ledger`` server,
with the market's public endpoints as the only thing read from the market.

The stake leaves only by the operator's own ``withdraw``, only after the unbonding period,
and never while a case against the node is open: a node that cheats and unbonds at once
is slashed before it can take its stake back."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from solders.keypair import Keypair

from chain import aidp
from market.onchain import service, settle, transfers, verdicts
from market.onchain.handlers import HANDLERS
from market.verify.window import slash
from node_agent import stake as node_stake

MARKET = "http://testserver"
PERIOD_S = 3  # the unbonding period these tests run with


@pytest.fixture
async def rpc_world(request: pytest.FixtureRequest, tmp_path: Path, db_url: str) -> Any:
    from chain.ledger.open import open_ledger
    from tests.chain.conftest import make_settings, make_world

    server = request.getfixturevalue("chain_server")
    ledger = open_ledger(server.url)
    try:
        settings = make_settings(
            tmp_path, db_url, chain__ledger_url=server.url, chain__unbonding_period_s=PERIOD_S,
            verify__challenge_window_s=1.0, chain__anchor_interval_s=0.5,
            chain__settle_interval_s=0.5, migrate_on_start=False)
        yield await make_world(settings, ledger)
    finally:
        await ledger.close()


async def _operator(world: Any, client: TestClient, tokens: int) -> node_stake.Operator:
    keypair = await world.wallet(tokens=tokens)
    return node_stake.operator(MARKET, keypair, world.settings.chain.ledger_url, client=client)


async def _run(fn: Any, *args: Any) -> Any:
    """The node's calls run their own event loop, as ``aidp-node`` does."""
    return await asyncio.to_thread(fn, *args)


async def test_the_operator_alone_stakes_unbonds_and_withdraws(rpc_world: Any) -> None:
    from market.app import create_app

    world = rpc_world
    with TestClient(create_app(world.settings)) as client:
        op = await _operator(world, client, tokens=3_000)
        assert op.cfg.program == world.cfg.program  # read from GET /v1/chain alone
        out = await _run(node_stake.stake, op, 2_000)
        assert out["bonded"] == 2_000 and out["vault_balance"] == 2_000
        view = client.get(f"/v1/stake/{op.pubkey}").json()
        assert (view["bonded"], view["vault"]) == (2_000, world.rt.stake_of(op.pubkey).vault)
        assert client.get("/v1/stake/not-a-key").status_code == 400

        out = await _run(node_stake.unbond, op, 1_200)
        assert (out["unbonding"], out["bonded"]) == (1_200, 800)
        with pytest.raises(node_stake.ERRORS):  # the period has not passed
            await _run(node_stake.withdraw, op)
        assert await world.tokens(op.pubkey) == 1_000

        # the market's key cannot take the stake: the vault answers to the program only
        stolen = aidp.withdraw_instructions(world.cfg, op.pubkey)
        with pytest.raises(Exception):  # noqa: B017 - a signature the program lacks
            await world.ledger.execute(stolen, world.rt.market)

        await world.ledger.advance_slots(PERIOD_S * 3)  # 400 ms a slot
        out = await _run(node_stake.withdraw, op)
        assert out["withdrawn"] == 1_200 and (out["staked"], out["unbonding"]) == (800, 0)
        assert await world.tokens(op.pubkey) == 2_200
        with pytest.raises(node_stake.ERRORS):  # nothing left unbonding
            await _run(node_stake.withdraw, op)


async def test_a_node_that_cheats_and_unbonds_is_slashed_before_it_can_leave(
        rpc_world: Any) -> None:
    """The node unbonds everything right after a fraud; the case the market opens holds
    the withdrawal past the unbonding period, and the slash lands first."""
    from market.app import create_app

    world = rpc_world
    with TestClient(create_app(world.settings)) as client:
        op = await _operator(world, client, tokens=5_000)
        await _run(node_stake.stake, op, 5_000)
        with world.sessions.begin() as s:
            from market.models import Node

            node = Node(pubkey=str(op.pubkey), price_in=1, price_out=1, stake=5_000)
            s.add(node)
            s.flush()
            node_id = node.id
        buyer = world.account(balance=10_000)
        r = world.receipt(node_id, buyer, earning=90, fee=10, state="verifying",
                          signer=op.keypair)
        await _run(node_stake.unbond, op, 5_000)
        with world.sessions.begin() as s:
            assert slash(s, r.id, world.settings, reason="fraud", verification={}).amount == 1_000

        await service.anchor_step(world.rt, world.sessions)
        verdicts.sign_pending(world.rt, world.sessions)
        quorum = world.settings.chain.verifier_quorum
        cases = await settle.plan_cases(world.rt, world.sessions, quorum)
        assert (await transfers.drive(world.rt, world.sessions, cases, HANDLERS)).counts == {
            "confirmed": 1}
        await world.ledger.advance_slots(PERIOD_S * 3)
        with pytest.raises(node_stake.ERRORS):  # a case is open: the stake is held
            await _run(node_stake.withdraw, op)
        assert (await _run(node_stake.status, op))["open_cases"] == 1

        out = await service.settle_step(world.rt, world.sessions)
        assert out["slashes"] == {"confirmed": 1}
        out = await _run(node_stake.withdraw, op)
        assert out["withdrawn"] == 4_000  # what the slash left
        assert await world.ledger.token_balance(world.cfg.treasury_pk) == 1_000


async def test_a_node_claims_its_payout_itself_and_the_market_records_it(
        rpc_world: Any) -> None:
    """The epoch is posted; the node claims its leaf from the program before the market
    does; the market finds the claim on chain and records it, so it is paid once."""
    from market.app import create_app
    from market.models import LedgerEntry, Node
    from market.onchain import reconcile

    world = rpc_world
    await world.fund_deposit_account(10_000)
    with TestClient(create_app(world.settings)) as client:
        op = await _operator(world, client, tokens=0)
        others = [Keypair() for _ in range(2)]
        buyer = world.account(balance=10_000)
        ids = []
        with world.sessions.begin() as s:
            for key in (op.keypair, *others):
                node = Node(pubkey=str(key.pubkey()), price_in=1, price_out=1)
                s.add(node)
                s.flush()
                ids.append(node.id)
        for node_id in ids:
            world.receipt(node_id, buyer, earning=300, fee=30)
        with world.sessions.begin() as s:
            posted = settle.plan_payout_round(s, world.rt, limit=100)
        post = [i for i in posted if i == min(posted)]
        await transfers.drive(world.rt, world.sessions, post, HANDLERS)  # post, not claims

        body = client.get(f"/v1/chain/payouts/{op.pubkey}").json()
        assert "unclaimed" in body, body
        unclaimed = body["unclaimed"]
        assert [(u["amount"], u["claim_state"]) for u in unclaimed] == [(300, "planned")]
        out = await _run(node_stake.claim, op, client)
        assert out["amount"] == 300 and await world.tokens(op.pubkey) == 300
        assert (await _run(node_stake.claim, op, client))["amount"] == 0  # paid once

        step = await service.settle_step(world.rt, world.sessions)
        assert step["claimed_elsewhere"] == 1
        assert step["resolved"] == {"confirmed": 3}  # the others' claims and the fee
        assert [await world.tokens(k.pubkey()) for k in others] == [300, 300]
        assert await world.tokens(op.pubkey) == 300
        assert client.get(f"/v1/chain/payouts/{op.pubkey}").json()["unclaimed"] == []
        with world.sessions() as s:
            from sqlalchemy import func, select

            paid = s.execute(select(func.sum(LedgerEntry.amount)).where(
                LedgerEntry.kind == "payout", LedgerEntry.node_id == ids[0])).scalar_one()
            assert paid == 300
        lines = await reconcile.reconcile(world.rt, world.sessions)
        assert all(line.ok for line in lines), reconcile.render(lines)
