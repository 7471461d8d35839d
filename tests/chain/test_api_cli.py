"""The public proof endpoint over HTTP, and the `aidp-market chain` commands."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from fastapi.testclient import TestClient
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from sqlalchemy import select

from chain import aidp
from chain.ledger.open import open_ledger
from market.app import create_app
from market.db import sync_session_factory
from market.money import accounts
from market.onchain import bootstrap
from market.onchain.models import ChainAllowance
from market.onchain.runtime import chain_dir
from protocol.merkle import ProofStep, verify_inclusion
from tests.chain.conftest import make_settings, registration
from tests.support.program import program_path

REPO = Path(__file__).resolve().parents[2]


async def test_proof_endpoint_is_public_and_verifies_on_chain(db_world):
    world = db_world
    buyer = world.account()
    node, _ = await world.node()
    receipts = [world.receipt(node, buyer, earning=5, fee=1) for _ in range(3)]
    pending = world.receipt(node, buyer, earning=5, fee=1)
    await world.step("anchor")
    world.receipt(node, buyer, earning=5, fee=1)  # after the anchor: not anchored yet
    with world.sessions.begin() as s:
        _, key = accounts.issue_key(s, buyer)

    settings = world.settings.model_copy(update={"migrate_on_start": False})
    with TestClient(create_app(settings)) as client:
        for r in receipts + [pending]:
            body = client.get(f"/v1/receipts/{r.receipt_hash}/proof").json()
            anchored = await aidp.read_anchor(world.ledger, body["anchor"]["tx_signature"])
            assert body["anchor"]["root"] == anchored.root
            assert body["anchor"]["slot"] == anchored.slot
            assert verify_inclusion(r.receipt_hash, [ProofStep(**p) for p in body["proof"]],
                                    anchored.root)
        assert client.get(f"/v1/receipts/{'ab' * 32}/proof").status_code == 404
        info = client.get("/v1/chain").json()
        assert info["deposit_account"] == world.cfg.deposit and info["mint"] == world.cfg.mint
        assert info["program"] == world.cfg.program and info["verifier_quorum"] == 2

        wallet = await world.wallet()
        market_id = settings.market_id
        auth = {"Authorization": f"Bearer {key}"}
        body = registration(wallet, buyer, market_id)
        assert client.post("/v1/chain/allowance", json=body).status_code == 401
        # somebody else's wallet: the API key alone proves nothing about it
        foreign = {**body, "signature": registration(Keypair(), buyer, market_id)["signature"]}
        assert client.post("/v1/chain/allowance", json=foreign, headers=auth).status_code == 403
        for_other_market = registration(wallet, buyer, "other-market.example")
        assert client.post("/v1/chain/allowance", json=for_other_market,
                           headers=auth).status_code == 403
        resp = client.post("/v1/chain/allowance", json=body, headers=auth)
        assert resp.status_code == 200, resp.text
        replay = client.post("/v1/chain/allowance", json=body, headers=auth)
        assert replay.status_code == 409 and replay.json()["error"]["code"] == \
            "replayed_registration"
        stale = registration(wallet, buyer, market_id, signed_at=int(time.time()) - 3600)
        assert client.post("/v1/chain/allowance", json=stale, headers=auth).status_code == 400
        bad = client.post("/v1/chain/allowance", json={**body, "wallet": "nope"}, headers=auth)
        assert bad.status_code == 400
        # one wallet funds one account: another buyer cannot register it, even signed
        other = world.account()
        with world.sessions.begin() as s:
            _, other_key = accounts.issue_key(s, other)
        taken = client.post("/v1/chain/allowance", json=registration(wallet, other, market_id),
                            headers={"Authorization": f"Bearer {other_key}"})
        assert taken.status_code == 409 and taken.json()["error"]["code"] == "wallet_in_use"
    with world.sessions() as s:
        assert s.get(ChainAllowance, buyer).wallet == str(wallet.pubkey())
        assert s.get(ChainAllowance, other) is None


async def test_init_is_idempotent_and_keys_are_private(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url, chain__demo_wallets=2,
                             chain__demo_tokens=5_000_000)
    sessions = sync_session_factory(db_url)
    ledger = open_ledger("inprocess", settings.data_dir)
    try:
        first = await bootstrap.init(settings, sessions, ledger=ledger)
        assert first.created
        lamports = await ledger.get_balance(first.cfg.market_pk)
        txs = ledger.chain.transaction_count()
        second = await bootstrap.init(settings, sessions, ledger=ledger)
        assert second.created == [] and second.cfg == first.cfg
        assert await ledger.get_balance(first.cfg.market_pk) == lamports
        assert ledger.chain.transaction_count() == txs  # nothing sent
        for pubkey, _path in second.demo_wallets:
            assert await ledger.token_balance(
                first.cfg.ata(Pubkey.from_string(pubkey))) == 5_000_000
        assert await ledger.token_balance(first.cfg.deposit_pk) == 5_000_000  # backing
    finally:
        await ledger.close()
    base = chain_dir(settings)
    for name in ("market.json", "verifier-1.json", "verifier-3.json", "config.json", "demo-1.json"):
        assert stat.S_IMODE(os.stat(base / name).st_mode) == 0o600, name


def test_cli_init_status_reconcile(tmp_path, db_url):
    env = {**os.environ, "PYTHONPATH": str(REPO), "AIDP_DB__URL": db_url,
           "AIDP_DATA_DIR": str(tmp_path / "data"), "AIDP_CHAIN__LEDGER_URL": "inprocess",
           "AIDP_CHAIN__DEMO_WALLETS": "1", "AIDP_CHAIN__PROGRAM_PATH": str(program_path())}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "market.cli", "chain", *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=120)

    out = cli("init")
    assert out.returncode == 0, out.stderr
    assert "created:" in out.stdout and "deposit" in out.stdout
    assert "deployed the aidp_market program" in out.stdout and "immutable" in out.stdout
    again = cli("init")
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout
    assert cli("tick").returncode == 0
    ok = cli("reconcile")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "0 mismatches" in ok.stdout and "deposit account" in ok.stdout

    # break it: the DB forgets the deposit account's backing
    sessions = sync_session_factory(db_url)
    from market.models import ChainTransfer

    with sessions.begin() as s:
        backing = s.execute(select(ChainTransfer).where(ChainTransfer.kind == "mint")).scalar_one()
        backing.amount -= 1
    bad = cli("reconcile")
    assert bad.returncode == 1 and "MISMATCH" in bad.stdout, bad.stdout

    # the in-process chain held by another process: a clear error, no traceback
    held = open_ledger("inprocess", tmp_path / "data")
    try:
        busy = cli("status")
    finally:
        held.chain.close()
    assert busy.returncode == 2 and "in use by another process" in busy.stderr, busy.stderr
    assert "Traceback" not in busy.stderr
