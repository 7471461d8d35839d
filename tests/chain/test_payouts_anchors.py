"""Payout epochs and claims, anchors and inclusion proofs, reconcile — on both ledger
backends."""

from __future__ import annotations

import pytest
from solders.pubkey import Pubkey
from sqlalchemy import func, select

from chain import aidp
from chain.ledger.base import TransactionFailed
from market.models import Anchor, ChainTransfer, Receipt
from market.onchain import reconcile
from market.onchain.models import ChainPayoutEpoch, ChainPayoutItem
from market.onchain.proofs import proof_view
from market.onchain.settle import load_epoch
from protocol.merkle import ProofStep, merkle_root, verify_inclusion


async def test_a_payout_epoch_pays_each_node_once_against_its_posted_root(world):
    buyer = world.account(balance=0)
    n1, k1 = await world.node()
    n2, k2 = await world.node()
    [world.receipt(n1, buyer, earning=900, fee=100) for _ in range(3)]
    world.receipt(n2, buyer, earning=450, fee=50)
    world.receipt(n2, buyer, earning=777, fee=1, state="pending")  # not settled: not paid
    await world.fund_deposit_account(10_000)

    # the epoch's post and the fee, then its claims, one step at a time (the program
    # holds the root each claim is checked against)
    from market.onchain import service, settle, transfers
    from market.onchain.handlers import HANDLERS

    with world.sessions.begin() as s:
        planned = settle.plan_payout_round(s, world.rt, limit=100)
    assert (await transfers.drive(world.rt, world.sessions, planned, HANDLERS)).counts == {
        "confirmed": 2}
    with world.sessions() as s:
        epoch = s.execute(select(ChainPayoutEpoch)).scalar_one()
        planned_epoch = load_epoch(s, epoch.epoch)
    posted = await aidp.read_epoch(world.ledger, world.cfg, epoch.epoch)
    assert posted.root == epoch.root == planned_epoch.root and posted.total == 3150
    assert posted.claimed == 0
    for leaf in planned_epoch.leaves:
        assert verify_inclusion(leaf.leaf_hex(), planned_epoch.proof(leaf.index), posted.root)
    assert {leaf.node: leaf.amount for leaf in planned_epoch.leaves} == {
        str(k1.pubkey()): 2700, str(k2.pubkey()): 450}

    with world.sessions() as s:
        claims = settle.active_claims(s)
    assert (await transfers.drive(world.rt, world.sessions, claims, HANDLERS)).counts == {
        "confirmed": 2}  # one per node
    vault = aidp.program.payout_vault_address(world.cfg.program_pk, epoch.epoch)
    payouts = aidp.program.payouts_address(world.cfg.program_pk, epoch.epoch)
    rent = sum([(await world.ledger.get_account(a)).lamports for a in (vault, payouts)])
    lamports = await world.ledger.get_balance(world.cfg.market_pk)
    out = await service.settle_step(world.rt, world.sessions)
    assert out["closed"] == {"confirmed": 1}  # every leaf paid: the epoch gives its rent back
    assert await world.ledger.get_balance(world.cfg.market_pk) == lamports + rent - 5000
    assert await world.tokens(k1.pubkey()) == 2700
    assert await world.tokens(k2.pubkey()) == 450
    assert await world.ledger.token_balance(world.cfg.treasury_pk) == 350
    assert await aidp.read_epoch(world.ledger, world.cfg, epoch.epoch) is None
    assert await world.ledger.get_account(vault) is None

    # a second step finds nothing to pay, and a replayed claim finds nothing to pay from
    out = (await world.step("settle"))["settle"]
    assert out["payouts"] == {} and out["claims"] == {} and out["closed"] == {}
    leaf, anyone = planned_epoch.leaves[0], await world.wallet()
    replay = aidp.claim_instructions(world.cfg, epoch.epoch, leaf,
                                     planned_epoch.proof(leaf.index), anyone.pubkey())
    with pytest.raises(TransactionFailed):
        await world.ledger.execute(replay, anyone, preflight=False)
    assert await world.tokens(k1.pubkey()) == 2700
    with world.sessions() as s:
        assert s.scalar(select(func.count()).select_from(ChainPayoutItem)) == 4

    lines = await reconcile.reconcile(world.rt, world.sessions)
    assert all(line.ok for line in lines), reconcile.render(lines)
    assert {line.item.split()[0] for line in lines} >= {"deposit", "treasury", "payouts"}


async def test_anchor_proofs_verify_against_the_on_chain_root(world):
    buyer = world.account()
    node, _ = await world.node()
    receipts = [world.receipt(node, buyer, earning=1, fee=0, state=st)
                for st in ("pending", "settled", "slashed", "pending", "verifying")]
    out = await world.step("anchor")
    assert out["anchor"]["anchor"] == {"confirmed": 1}
    assert (await world.step("anchor"))["anchor"] == {"anchored": 0}

    with world.sessions() as s:
        anchor = s.execute(select(Anchor)).scalar_one()
        assert anchor.receipt_count == 5 and anchor.slot is not None
        anchored = s.scalar(select(func.count()).where(Receipt.anchor_id == anchor.id))
        assert anchored == 5
    on_chain = await aidp.read_anchor(world.ledger, anchor.tx_signature)
    assert on_chain is not None
    assert on_chain.root == anchor.merkle_root
    assert on_chain.root == merkle_root(sorted(r.receipt_hash for r in receipts))
    assert on_chain.signer == world.cfg.market
    # the program holds the root too: what a slash case is checked against
    stored = await aidp.read_anchor_account(world.ledger, world.cfg, anchor.merkle_root)
    assert stored is not None and stored[0] == 5

    for r in receipts:
        with world.sessions() as s:
            body = proof_view(s, r.receipt_hash)
        assert body["anchor"]["tx_signature"] == anchor.tx_signature
        assert body["anchor"]["root"] == on_chain.root
        steps = [ProofStep(**p) for p in body["proof"]]
        assert verify_inclusion(r.receipt_hash, steps, on_chain.root)
        assert not verify_inclusion("00" * 32, steps, on_chain.root)

    # new receipts go into the next anchor
    later = world.receipt(node, buyer, earning=1, fee=0)
    assert (await world.step("anchor"))["anchor"]["anchor"] == {"confirmed": 1}
    with world.sessions() as s:
        body = proof_view(s, later.receipt_hash)
    assert body["anchor"]["root"] == merkle_root([later.receipt_hash])


async def test_reconcile_fails_on_a_deliberate_mismatch(world, capsys):
    buyer = world.account()
    node, kp = await world.node()
    world.receipt(node, buyer, earning=500, fee=50)
    await world.fund_deposit_account(1000)
    await world.step("settle")
    lines = await reconcile.reconcile(world.rt, world.sessions)
    assert all(line.ok for line in lines), reconcile.render(lines)

    # someone sends one base unit to the treasury behind the market's back
    from chain import spl

    await world.ledger.execute(
        [spl.mint_to_checked(world.cfg.mint_pk, world.cfg.treasury_pk, world.cfg.market_pk, 1,
                             world.cfg.decimals)], world.rt.market)
    # and the DB forgets part of a claim
    with world.sessions.begin() as s:
        row = s.execute(select(ChainTransfer).where(ChainTransfer.kind == "claim")).scalar_one()
        row.amount -= 7
    lines = await reconcile.reconcile(world.rt, world.sessions)
    bad = {line.item.split()[0]: line.diff for line in lines if not line.ok}
    assert bad == {"treasury": 1, "payouts": 7, "epoch": -7}, reconcile.render(lines)
    text = reconcile.render(lines)
    assert "MISMATCH" in text and "3 mismatches" in text
    assert Pubkey.from_string(world.cfg.treasury)
