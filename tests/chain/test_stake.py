"""Node stake on chain: slashes (market + arbiter) land once with their memo, nodes.stake
mirrors the chain, and the min_stake registration policy."""

from __future__ import annotations

import asyncio

from sqlalchemy import select

from market.models import ChainTransfer, Node
from market.onchain.handlers import HANDLERS
from market.verify.window import slash


async def test_slash_moves_stake_to_treasury_once_and_stake_is_mirrored(world):
    await _slash_flow(world)


async def test_slashes_on_every_database(db_world):
    await _slash_flow(db_world)


async def _slash_flow(world) -> None:
    buyer = world.account(balance=10_000)
    node_id, operator = await world.node(stake=5_000)
    await world.step("settle")  # stake sync: nodes.stake = chain
    with world.sessions() as s:
        assert s.get(Node, node_id).stake == 5_000
    r = world.receipt(node_id, buyer, earning=90, fee=10, state="verifying")
    with world.sessions.begin() as s:
        result = slash(s, r.id, world.settings, reason="fraud", verification={"ok": False})
    assert result is not None and result.amount == 1_000  # 10 × cost

    out = await world.step("settle")
    assert out["settle"]["slashes"] == {"confirmed": 1}
    stake = world.rt.stake_of(operator.pubkey())
    assert await world.ledger.token_balance(stake.account_pk) == 4_000
    assert await world.ledger.token_balance(world.cfg.treasury_pk) == 1_000
    with world.sessions() as s:
        row = s.execute(select(ChainTransfer).where(ChainTransfer.kind == "slash")).scalar_one()
        assert row.idempotency_key == f"slash:{r.id}" and row.state == "confirmed"
        assert s.get(Node, node_id).stake == 4_000
    tx = await world.ledger.get_transaction(row.signature)
    assert tx.memos == [f"aidp:slash:v1:{r.id}"]
    assert set(tx.account_keys[:2]) == {world.cfg.market, str(world.rt.arbiter.pubkey())}

    assert (await world.step("settle"))["settle"]["slashes"] == {}
    assert await world.ledger.token_balance(stake.account_pk) == 4_000

    from market.onchain import reconcile

    lines = await reconcile.reconcile(world.rt, world.sessions)
    assert all(line.ok for line in lines), reconcile.render(lines)
    assert any(line.item.startswith("stake") and line.chain == 4_000 for line in lines)


async def test_min_stake_policy(db_world):
    from market.onchain.stake import has_min_stake

    world = db_world
    _, staked = await world.node(stake=2_000)
    _, bare = await world.node()
    off = world.settings
    on = world.settings.model_copy(update={"chain": world.settings.chain.model_copy(
        update={"min_stake": 1_500})})
    assert await has_min_stake(str(bare.pubkey()), off, ledger=world.ledger)
    assert await has_min_stake(str(staked.pubkey()), on, ledger=world.ledger)
    assert not await has_min_stake(str(bare.pubkey()), on, ledger=world.ledger)


async def test_a_slash_never_counts_on_stake_an_earlier_unlanded_slash_takes(db_world):
    """Chain stake below the DB's view (e.g. withdrawn meanwhile): the second slash is
    planned on what the first one leaves, so both land instead of one failing forever."""
    from market.models import LedgerEntry
    from market.onchain import settle, transfers

    world = db_world
    buyer = world.account(balance=10_000)
    node_id, operator = await world.node(stake=1_000)
    stake = world.rt.stake_of(operator.pubkey())
    receipts = [world.receipt(node_id, buyer, earning=90, fee=10, state="verifying")
                for _ in range(2)]

    def journal(receipt_id: str) -> None:
        with world.sessions.begin() as s:
            s.add(LedgerEntry(kind="slash", idempotency_key=f"slash:{receipt_id}", amount=800,
                              node_id=node_id, receipt_id=receipt_id))

    journal(receipts[0].id)
    first = await settle.plan_slashes(world.rt, world.sessions)  # planned, not sent yet
    journal(receipts[1].id)
    second = await settle.plan_slashes(world.rt, world.sessions)
    with world.sessions() as s:
        amounts = [s.get(ChainTransfer, i).amount for i in first + second]
    assert amounts == [800, 200]
    result = await transfers.drive(world.rt, world.sessions, first + second, HANDLERS)
    assert result.counts == {"confirmed": 2}
    assert await world.ledger.token_balance(stake.account_pk) == 0
    assert await world.ledger.token_balance(world.cfg.treasury_pk) == 1_000


async def test_link_rejects_a_node_below_min_stake(request, tmp_path, db_url):
    """The node link server enforces min_stake from the chain before welcoming a node."""
    from chain.ledger.open import open_ledger
    from node_agent.link import NodeLink
    from tests.chain.conftest import make_settings, make_world
    from tests.support.engines import DeterministicEngine
    from tests.support.market import start_market, stop_link

    server = request.getfixturevalue("chain_server")
    ledger = open_ledger(server.url)
    try:
        settings = make_settings(tmp_path, db_url, chain__ledger_url=server.url)
        world = await make_world(settings, ledger)
        _, staked = await world.node(stake=2_000)
        _, bare = await world.node()
        market = start_market(db_url, data_dir=settings.data_dir, chain__ledger_url=server.url,
                              chain__min_stake=1_500)
        try:
            market.list_model("staked-model", DeterministicEngine("staked-model").model.sha256)
            for keypair, welcomed in ((bare, False), (staked, True)):
                link = NodeLink(market.url, keypair, DeterministicEngine("staked-model"),
                                price=(1, 1), max_concurrency=1, backoff_initial=5.0)
                task = asyncio.create_task(link.run())
                try:
                    if welcomed:
                        await link.wait_ready(timeout=15)
                    else:
                        deadline = asyncio.get_running_loop().time() + 15
                        while link.stats.last_reject is None:
                            assert asyncio.get_running_loop().time() < deadline
                            await asyncio.sleep(0.05)
                        assert "stake below" in link.stats.last_reject
                        assert not link.ready.is_set()
                finally:
                    await stop_link(link, task)
        finally:
            market.stop()
    finally:
        await ledger.close()
