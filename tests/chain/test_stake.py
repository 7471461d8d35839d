"""Node stake in the program: a fraud the verification worker found is slashed on chain
only with the node's own signed receipt, its anchor and a quorum of verifier signatures;
once per receipt; nodes.stake mirrors the chain; the min_stake registration policy."""

from __future__ import annotations

import asyncio

from solders.signature import Signature
from sqlalchemy import select

from chain import aidp
from market.models import ChainTransfer, Node, Receipt
from market.onchain.handlers import HANDLERS
from market.onchain.models import ChainVerdict
from market.verify.window import slash


async def test_slash_on_evidence_moves_stake_to_treasury_once(world):
    await _slash_flow(world)


async def test_slashes_on_every_database(db_world):
    await _slash_flow(db_world)


async def _slash_flow(world) -> None:
    buyer = world.account(balance=10_000)
    node_id, operator = await world.node(stake=5_000)
    await world.step("settle")  # stake sync: nodes.stake = chain
    with world.sessions() as s:
        assert s.get(Node, node_id).stake == 5_000
    r = world.receipt(node_id, buyer, earning=90, fee=10, state="verifying", signer=operator)
    with world.sessions.begin() as s:
        result = slash(s, r.id, world.settings, reason="fraud", verification={"ok": False})
    assert result is not None and result.amount == 1_000  # 10 × cost

    # not anchored yet: the verifiers sign, but no case can be opened
    out = (await world.step("settle"))["settle"]
    assert out["verdicts_signed"] == 3 and out["cases"] == {} and out["slashes"] == {}
    stake = world.rt.stake_of(operator.pubkey())
    assert await world.ledger.token_balance(stake.vault_pk) == 5_000
    with world.sessions() as s:
        verdicts = s.execute(select(ChainVerdict)).scalars().all()
        assert {v.amount for v in verdicts} == {1_000} and len(verdicts) == 3
        assert s.get(Node, node_id).stake == 4_000  # the DB already counts the slash

    await world.step("anchor")
    out = (await world.step("settle"))["settle"]
    assert out["verdicts_signed"] == 0  # each verifier signs a receipt once
    assert out["cases"] == {"confirmed": 1} and out["slashes"] == {"confirmed": 1}
    assert await world.ledger.token_balance(stake.vault_pk) == 4_000
    assert await world.ledger.token_balance(world.cfg.treasury_pk) == 1_000
    info = await aidp.read_stake(world.ledger, world.cfg, operator.pubkey())
    assert (info.staked, info.slashed, info.open_cases) == (4_000, 1_000, 0)
    case = await aidp.read_case(world.ledger, world.cfg, bytes.fromhex(r.receipt_hash))
    assert case is not None and case.state == "slashed" and case.amount == 1_000
    with world.sessions() as s:
        row = s.execute(select(ChainTransfer).where(ChainTransfer.kind == "slash")).scalar_one()
        assert row.idempotency_key == f"slash:{r.id}" and row.state == "confirmed"
        assert s.get(Node, node_id).stake == 4_000
    # the market only paid the fee: the verdict's authority is the verifiers' signatures,
    # checked by the Ed25519 precompile, not a signer of the transaction
    tx = await world.ledger.get_transaction(row.signature)
    assert tx.ok and len(tx.transaction.signatures) == 1
    assert tx.account_keys[0] == world.cfg.market

    assert (await world.step("settle"))["settle"]["slashes"] == {}
    assert await world.ledger.token_balance(stake.vault_pk) == 4_000

    from market.onchain import reconcile

    lines = await reconcile.reconcile(world.rt, world.sessions)
    assert all(line.ok for line in lines), reconcile.render(lines)
    assert any(line.item.startswith("stake") and line.chain == 4_000 for line in lines)


async def test_a_verdict_short_of_its_quorum_never_slashes(db_world):
    """Held keys below the quorum (a market holding one verifier key of three): the case
    is never opened and the stake stays whole, however often settlement runs, until
    another verifier signs."""
    world = db_world
    world.rt.verifiers = world.rt.verifiers[:1]
    buyer = world.account(balance=10_000)
    node_id, operator = await world.node(stake=5_000)
    r = world.receipt(node_id, buyer, earning=90, fee=10, state="verifying", signer=operator)
    with world.sessions.begin() as s:
        slash(s, r.id, world.settings, reason="fraud", verification={"ok": False})
    from market.onchain import service, settle

    await service.anchor_step(world.rt, world.sessions)
    for _ in range(2):
        out = await service.settle_step(world.rt, world.sessions)
        assert out["cases"] == {} and out["slashes"] == {}
    with world.sessions() as s:
        assert len(s.execute(select(ChainVerdict)).all()) == 1
        assert settle.agreed_verdict(s, r.id, world.settings.chain.verifier_quorum) is None
    vault = world.rt.stake_of(operator.pubkey()).vault_pk
    assert await world.ledger.token_balance(vault) == 5_000

    # a second verifier, on its own host with its own key and no market key, signs
    # (what `aidp-market chain sign-verdicts` runs): the quorum is reached and it lands
    from market.onchain.runtime import verifier_paths
    from market.onchain.verdicts import sign_with
    from protocol.keys import load_keypair

    other = load_keypair(verifier_paths(world.settings)[1])
    limit = world.settings.chain.max_slash_per_receipt
    assert sign_with(world.cfg, limit, other, world.sessions) == 1
    assert sign_with(world.cfg, limit, other, world.sessions) == 0  # once per key
    out = await service.settle_step(world.rt, world.sessions)
    assert out["cases"] == {"confirmed": 1} and out["slashes"] == {"confirmed": 1}
    assert await world.ledger.token_balance(vault) == 4_000


async def test_a_forged_verdict_or_receipt_is_refused_on_chain(db_world):
    """What the program checks, seen from the market's side: verifier signatures on
    another amount, and a receipt signature that is not the node's, both fail."""
    from chain.ledger.base import TransactionFailed
    from market.onchain import service, settle

    world = db_world
    buyer = world.account(balance=10_000)
    node_id, operator = await world.node(stake=5_000)
    r = world.receipt(node_id, buyer, earning=90, fee=10, state="verifying", signer=operator)
    with world.sessions.begin() as s:
        slash(s, r.id, world.settings, reason="fraud", verification={"ok": False})
    await service.anchor_step(world.rt, world.sessions)
    from market.onchain import verdicts

    verdicts.sign_pending(world.rt, world.sessions)
    with world.sessions() as s:
        evidence = settle.evidence_of(s, r.id)
        verdict, signatures = settle.agreed_verdict(s, r.id, 2)
    import dataclasses

    from solders.keypair import Keypair

    forged = dataclasses.replace(evidence, node_signature=Keypair().sign_message(b"x"))
    try:
        await world.ledger.execute(aidp.open_case_instructions(world.cfg, forged),
                                   world.rt.market, preflight=False)
        raise AssertionError("a case opened on a forged receipt signature")
    except TransactionFailed:
        pass
    await world.ledger.execute(aidp.open_case_instructions(world.cfg, evidence), world.rt.market)
    more = dataclasses.replace(verdict, amount=verdict.amount + 1)  # not what they signed
    try:
        await world.ledger.execute(aidp.slash_instructions(world.cfg, more, signatures),
                                   world.rt.market, preflight=False)
        raise AssertionError("a slash landed on signatures over another verdict")
    except TransactionFailed:
        pass
    assert await world.ledger.token_balance(world.rt.stake_of(operator.pubkey()).vault_pk) == 5_000
    assert isinstance(signatures[0][1], Signature)


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
    """Two frauds on one stake: the second slash is planned on what the first leaves (the
    program takes no more than the stake holds), so the rows match what lands."""
    from market.models import LedgerEntry
    from market.onchain import service, settle, transfers, verdicts

    world = db_world
    buyer = world.account(balance=10_000)
    node_id, operator = await world.node(stake=1_000)
    stake = world.rt.stake_of(operator.pubkey())
    receipts = [world.receipt(node_id, buyer, earning=90, fee=10, state="slashed",
                              signer=operator) for _ in range(2)]
    with world.sessions.begin() as s:
        for r in receipts:
            s.add(LedgerEntry(kind="slash", idempotency_key=f"slash:{r.id}", amount=800,
                              node_id=node_id, receipt_id=r.id))
    await service.anchor_step(world.rt, world.sessions)
    verdicts.sign_pending(world.rt, world.sessions)
    quorum = world.settings.chain.verifier_quorum
    cases = await settle.plan_cases(world.rt, world.sessions, quorum)
    assert (await transfers.drive(world.rt, world.sessions, cases, HANDLERS)).counts == {
        "confirmed": 2}
    planned = await settle.plan_slashes(world.rt, world.sessions, quorum)  # none sent yet
    with world.sessions() as s:
        amounts = sorted(s.get(ChainTransfer, i).amount for i in planned)
    assert amounts == [200, 800]
    result = await transfers.drive(world.rt, world.sessions, planned, HANDLERS)
    assert result.counts == {"confirmed": 2}
    assert await world.ledger.token_balance(stake.vault_pk) == 0
    assert await world.ledger.token_balance(world.cfg.treasury_pk) == 1_000


async def test_a_node_with_nothing_staked_has_nothing_to_take(db_world):
    """A fraud by a node with no stake on chain: the slash is recorded as nothing moved,
    not retried forever."""
    world = db_world
    buyer = world.account(balance=10_000)
    node_id, operator = await world.node()
    r = world.receipt(node_id, buyer, earning=90, fee=10, state="verifying", signer=operator)
    with world.sessions.begin() as s:
        s.execute(Node.__table__.update().where(Node.id == node_id).values(stake=500))
        assert slash(s, r.id, world.settings, reason="fraud", verification={}).amount == 500
    await world.step("anchor")
    await world.step("settle")
    with world.sessions() as s:
        row = s.execute(select(ChainTransfer).where(ChainTransfer.kind == "slash")).scalar_one()
        assert (row.state, row.amount) == ("confirmed", 0)
        assert s.get(Receipt, r.id).state == "slashed"


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
