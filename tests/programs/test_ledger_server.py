"""aidp-ledger as a process: restarts keep state, solana-py's typed client parses every
answer, and the command line explains itself."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import httpx
import pytest
from solana.rpc.async_api import AsyncClient
from solana.rpc.models import TokenAccountOpts
from solders.keypair import Keypair
from solders.signature import Signature

from chain import aidp, spl
from chain.ledger.base import TxState
from chain.ledger.open import open_ledger
from chain.localnet.chain import ChainError, LocalChain
from chain.localnet.cli import LedgerProcess

from tests.support.program import program_path

from .conftest import REPO


async def _activity(led):
    """Bootstrap, deploy the program, fund, deposit, anchor: returns what a restart must
    preserve."""
    market, buyer = Keypair(), Keypair()
    cfg = await aidp.bootstrap(led, market)
    params = aidp.ProgramParams(verifiers=[Keypair().pubkey()])
    cfg, _ = await aidp.install(led, market, cfg, params, program_path().read_bytes())
    await aidp.fund_wallet(led, cfg, market, buyer.pubkey(), tokens=5_000_000)
    dep = await led.execute(aidp.deposit_instructions(cfg, buyer.pubkey(), 2_000_000, "acct-9"), buyer)
    anchor = await led.execute([aidp.anchor_memo_instruction(market.pubkey(), "ab" * 32, 42)], market)
    lamports = await led.get_balance(buyer.pubkey())
    return market, buyer, cfg, dep, anchor, lamports


async def _check_preserved(led, market, buyer, cfg, dep, anchor, lamports):
    assert await led.token_balance(cfg.ata(buyer.pubkey())) == 3_000_000
    assert await led.token_balance(cfg.deposit_pk) == 2_000_000
    assert await led.get_balance(buyer.pubkey()) == lamports
    assert (await led.mint_info(cfg.mint_pk)).supply == 5_000_000
    assert (await led.status(dep.signature, dep.last_valid_block_height)).state is TxState.CONFIRMED
    assert (await aidp.read_anchor(led, anchor.signature)).count == 42
    scan = await aidp.scan_deposits(led, cfg)
    assert [(d.signature, d.amount, d.account) for d in scan.deposits] == [
        (dep.signature, 2_000_000, "acct-9")
    ]
    # and the chain keeps working on the restored accounts, the program included
    assert await aidp.bootstrap(led, market) == dataclasses.replace(cfg, program="")
    assert await aidp.read_config(led, cfg) is not None
    await led.execute(aidp.anchor_instructions(cfg, "cd" * 32, 3), market)
    assert await aidp.read_anchor_account(led, cfg, "cd" * 32) is not None
    await led.execute(aidp.deposit_instructions(cfg, buyer.pubkey(), 1_000_000, "acct-9"), buyer)
    assert await led.token_balance(cfg.deposit_pk) == 3_000_000


async def test_inprocess_restart_keeps_balances_and_transactions(tmp_path):
    led = open_ledger("inprocess", tmp_path)
    state = await _activity(led)
    slot = await led.slot()
    await led.close()
    led = open_ledger("inprocess", tmp_path)
    assert await led.slot() >= slot
    await _check_preserved(led, *state)
    await led.close()


async def test_server_restart_keeps_balances_and_transactions(tmp_path):
    server = LedgerProcess(tmp_path / "chain", cwd=REPO).start()
    try:
        led = open_ledger(server.url)
        state = await _activity(led)
        await led.close()
    finally:
        server.stop()
    server = LedgerProcess(tmp_path / "chain", cwd=REPO).start()
    try:
        assert "accounts=0" not in server.ready_line and "transactions=0" not in server.ready_line
        led = open_ledger(server.url)
        await _check_preserved(led, *state)
        await led.close()
    finally:
        server.stop()


def test_one_process_per_chain_directory(tmp_path):
    chain = LocalChain(tmp_path)
    with pytest.raises(ChainError, match="aidp-ledger serve"):
        LocalChain(tmp_path)
    chain.close()
    LocalChain(tmp_path).close()


async def test_program_accounts_are_listed_with_their_filters(ledger_server):
    """getProgramAccounts (what anchorpy's ``account[...].all()`` sends): a program's
    accounts, narrowed by size and by bytes at an offset; a malformed filter is a clear
    invalid-params error."""
    from solana.rpc.models import MemcmpOpts

    led = open_ledger(ledger_server.url)
    market, owner = Keypair(), Keypair()
    cfg = await aidp.bootstrap(led, market)
    await aidp.fund_wallet(led, cfg, market, owner.pubkey(), tokens=10)
    await led.close()
    async with AsyncClient(ledger_server.url) as client:
        mine = MemcmpOpts(offset=32, bytes=str(owner.pubkey()))  # a token account's owner
        found = (await client.get_program_accounts(
            spl.TOKEN_PROGRAM_ID, filters=[spl.TOKEN_ACCOUNT_SIZE, mine])).value
        assert [str(a.pubkey) for a in found] == [str(cfg.ata(owner.pubkey()))]
        mints = (await client.get_program_accounts(
            spl.TOKEN_PROGRAM_ID, filters=[spl.MINT_SIZE])).value
        assert str(cfg.mint_pk) in {str(a.pubkey) for a in mints}
    bad = httpx.post(ledger_server.url, json={
        "jsonrpc": "2.0", "id": 1, "method": "getProgramAccounts",
        "params": [str(spl.TOKEN_PROGRAM_ID), {"filters": [{"memcmp": {"offset": 0}}]}]})
    assert bad.json()["error"]["code"] == -32602


async def test_solana_py_typed_client_parses_every_answer(ledger_server):
    led = open_ledger(ledger_server.url)
    market, owner = Keypair(), Keypair()
    cfg = await aidp.bootstrap(led, market)
    await aidp.fund_wallet(led, cfg, market, owner.pubkey(), tokens=1_500_000)
    sent = await led.execute(aidp.deposit_instructions(cfg, owner.pubkey(), 250_000, "acct-x"), owner)
    await led.close()

    async with AsyncClient(ledger_server.url) as client:
        assert await client.is_connected()
        assert (await client.get_version()).value.solana_core
        assert (await client.get_slot()).value >= 1
        assert (await client.get_block_height()).value >= 1
        bh = (await client.get_latest_blockhash()).value
        assert bh.last_valid_block_height >= 150
        assert (await client.get_minimum_balance_for_rent_exemption(165)).value == 2_039_280
        bal = (await client.get_token_account_balance(cfg.ata(owner.pubkey()))).value
        assert (bal.amount, bal.decimals, bal.ui_amount_string) == ("1250000", 6, "1.25")
        accs = (
            await client.get_token_accounts_by_owner(
                owner.pubkey(), TokenAccountOpts(mint=cfg.mint_pk)
            )
        ).value
        assert [a.pubkey for a in accs] == [cfg.ata(owner.pubkey())]
        info = (await client.get_account_info(cfg.mint_pk)).value
        assert info.owner == spl.TOKEN_PROGRAM_ID and len(info.data) == spl.MINT_SIZE
        sig = Signature.from_string(sent.signature)
        st = (await client.get_signature_statuses([sig])).value[0]
        assert st.err is None and st.confirmation_status is not None
        for encoding in ("json", "base64", "jsonParsed"):
            tx = (await client.get_transaction(sig, encoding=encoding)).value
            assert tx.slot == st.slot and tx.transaction.meta.fee == 5000
        hist = (await client.get_signatures_for_address(cfg.deposit_pk, limit=10)).value
        assert hist[0].signature == sig and hist[0].memo == "[22] aidp:deposit:v1:acct-x"
        drop = (await client.request_airdrop(Keypair().pubkey(), 10**9)).value
        conf = await client.confirm_transaction(drop)
        assert conf.value[0].err is None

    async with httpx.AsyncClient() as http:
        # raw JSON-RPC: batches, blockhash validity, unknown methods, malformed input
        batch = [
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "isBlockhashValid",
                "params": [str(bh.blockhash)],
            },
            {"jsonrpc": "2.0", "id": 2, "method": "getHealth"},
            {"jsonrpc": "2.0", "id": 3, "method": "noSuchMethod"},
            {"jsonrpc": "2.0", "id": 4, "method": "getBalance", "params": ["not-a-key"]},
        ]
        out = (await http.post(ledger_server.url, json=batch)).json()
        assert out[0]["result"]["value"] is True and out[1]["result"] == "ok"
        assert out[2]["error"]["code"] == -32601 and out[3]["error"]["code"] == -32602
        bad = await http.post(ledger_server.url, content=b"{not json")
        assert bad.json()["error"]["code"] == -32700
        assert (await http.get(ledger_server.url + "/health")).text == "ok"


async def test_browser_reads_an_anchor_cross_origin(ledger_server):
    """What the explorer's JavaScript does: a cross-origin getTransaction (encoding json),
    then the Memo instruction's base58 data."""
    from chain.localnet.server import b58decode

    led = open_ledger(ledger_server.url)
    market = Keypair()
    await led.airdrop(market.pubkey(), 10**9)
    root = "cd" * 32
    sent = await led.execute([aidp.anchor_memo_instruction(market.pubkey(), root, 7)], market)
    await led.close()
    origin = {"Origin": "http://127.0.0.1:8000"}
    async with httpx.AsyncClient() as http:
        pre = await http.options(
            ledger_server.url,
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] in (
            "*",
            origin["Origin"],
        )
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "getTransaction",
            "params": [sent.signature, {"encoding": "json", "maxSupportedTransactionVersion": 0}],
        }
        resp = await http.post(ledger_server.url, json=body, headers=origin)
    assert resp.headers["access-control-allow-origin"] in ("*", origin["Origin"])
    tx = resp.json()["result"]
    message = tx["transaction"]["message"]
    memos = [
        b58decode(ix["data"]).decode()
        for ix in message["instructions"]
        if message["accountKeys"][ix["programIdIndex"]] == str(spl.MEMO_PROGRAM_ID)
    ]
    assert memos == [f"aidp:anchor:v1:{root}:7"] and tx["slot"] >= 1


def test_cli_help_explains_usage():
    out = subprocess.run(
        [sys.executable, "-m", "chain.localnet.cli", "serve", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for words in ("--port", "--data-dir", "ready", "AIDP_CHAIN__LEDGER_URL"):
        assert words in out
    top = subprocess.run(
        [sys.executable, "-m", "chain.localnet.cli"], cwd=REPO, capture_output=True, text=True
    )
    assert top.returncode == 2 and "serve" in top.stdout


async def test_a_transaction_the_store_cannot_record_does_not_land(tmp_path):
    led = open_ledger("inprocess", tmp_path)
    market, buyer = Keypair(), Keypair()
    cfg = await aidp.bootstrap(led, market)
    await aidp.fund_wallet(led, cfg, market, buyer.pubkey(), tokens=5_000_000)
    chain = led.chain

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    chain._record = disk_full
    prepared = await led.prepare(aidp.deposit_instructions(cfg, buyer.pubkey(), 2_000_000, "a"), buyer)
    with pytest.raises(OSError):
        await led.submit(prepared)
    del chain._record
    # unknown signature and untouched balances: re-planning it can never pay twice
    assert await led.token_balance(cfg.ata(buyer.pubkey())) == 5_000_000
    assert await led.token_balance(cfg.deposit_pk) == 0
    assert (await led.signature_statuses([prepared.signature])) == [None]
    await led.close()


async def test_the_clock_never_runs_backwards(tmp_path):
    chain = LocalChain(tmp_path / "chain")
    chain._genesis_time -= 3600  # an hour of slots passes ...
    chain.airdrop(Keypair().pubkey(), 10**9)
    landed = chain.slot()
    assert landed > 8000
    chain.close()
    chain = LocalChain(tmp_path / "chain")  # ... then the host clock is set back an hour
    assert chain.slot() >= landed
    chain.close()
