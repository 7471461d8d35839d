"""The ``aidp_market`` program through the project's ledgers, as the market will reach
it: deployed by the upgradeable loader's real path with ``chain.aidp.deploy.deploy_to``,
initialised over the market's own mint and treasury (``chain.aidp.config.bootstrap``)
and anchoring a receipt root, on the in-process LiteSVM backend and through a real
``aidp-ledger`` server with solana-py."""

from __future__ import annotations

import os

import pytest
from solders.keypair import Keypair

from chain.aidp import program as client
from chain.aidp.deploy import deploy_to, programdata_address, upgrade_authority
from chain.ledger.base import TransactionFailed
from protocol import merkle
from tests.programs.conftest import Market


async def test_deploy_initialise_and_anchor_through_the_ledger(market: Market,
                                                               aidp_program: bytes) -> None:
    ledger, key, cfg = market.ledger, market.key, market.cfg
    program_id = await deploy_to(ledger, aidp_program, key)
    account = await ledger.get_account(programdata_address(program_id))
    assert account is not None and upgrade_authority(bytes(account.data)) == key.pubkey()
    await ledger.advance_slots(1)
    verifiers = [Keypair().pubkey() for _ in range(3)]
    config = client.config_address(program_id)
    await ledger.execute([client.instruction(program_id, "initialize", {
        "config": config, "authority": key.pubkey(), "mint": cfg.mint_pk,
        "treasury": cfg.treasury_pk, "systemProgram": client.SYSTEM_PROGRAM_ID,
        "programData": programdata_address(program_id)}, feeBps=1000, quorum=2,
        verifiers=verifiers, minStake=10, unbondingPeriod=60, maxSlashPerReceipt=100,
        challengePeriod=60)], key)
    stored = await ledger.get_account(config)
    assert stored is not None
    decoded = client.MarketConfig.decode(bytes(stored.data))
    assert decoded.verifiers == verifiers and decoded.treasury == cfg.treasury_pk

    receipts = [os.urandom(32).hex() for _ in range(5)]
    root = bytes.fromhex(merkle.merkle_root(receipts))
    anchor = client.anchor_address(program_id, root)
    anchor_ix = client.instruction(program_id, "anchorRoot", {
        "config": config, "authority": key.pubkey(), "anchor": anchor,
        "systemProgram": client.SYSTEM_PROGRAM_ID}, root=root, leafCount=5)
    await ledger.execute([anchor_ix], key)
    stored = await ledger.get_account(anchor)
    assert stored is not None
    assert client.decode_account("ReceiptAnchor", bytes(stored.data))["leafCount"] == 5
    await ledger.advance_slots(2)  # a new blockhash: not the same transaction again
    with pytest.raises(TransactionFailed):  # a root is anchored once
        await ledger.execute([anchor_ix], key, preflight=False)
