"""Settlement on a real SVM, each test on both backends (in-process LiteSVM and aidp-ledger
through solana-py). No mocks: every assertion reads the chain."""

from __future__ import annotations

import pytest
from solders.keypair import Keypair

from chain import aidp, spl
from chain.ledger.base import (
    AllowanceExceeded,
    LedgerError,
    PreparedTx,
    TransactionRejected,
    TxState,
)
from protocol.merkle import merkle_root


async def test_bootstrap_creates_mint_and_accounts(market):
    led, cfg = market.ledger, market.cfg
    mint = await led.mint_info(cfg.mint_pk)
    assert mint is not None and mint.decimals == 6 and mint.mint_authority == market.key.pubkey()
    deposit = await led.token_account(cfg.deposit_pk)
    treasury = await led.token_account(cfg.treasury_pk)
    assert deposit.owner == treasury.owner == market.key.pubkey()
    assert deposit.mint == treasury.mint == cfg.mint_pk
    assert cfg.deposit_pk == spl.associated_token_address(market.key.pubkey(), cfg.mint_pk)
    # idempotent: a second run finds everything and changes nothing
    assert await aidp.bootstrap(led, market.key, decimals=6) == cfg
    with pytest.raises(Exception, match="decimals"):
        await aidp.bootstrap(led, market.key, decimals=9)
    # demo wallet: SOL + an ATA holding freshly minted AIDP
    buyer = await market.wallet(tokens=123_000_000)
    assert await led.get_balance(buyer.pubkey()) == 1_000_000_000
    assert await market.tokens(buyer.pubkey()) == 123_000_000
    assert (await led.mint_info(cfg.mint_pk)).supply == 123_000_000
    assert aidp.ChainConfig.from_json(cfg.to_json()) == cfg


async def test_deposit_with_memo_is_found_exactly_once(market):
    led, cfg = market.ledger, market.cfg
    alice, bob = await market.wallet(tokens=50_000_000), await market.wallet(tokens=50_000_000)

    p1 = await led.execute(
        aidp.deposit_instructions(cfg, alice.pubkey(), 7_000_000, "acct-alice"), alice
    )
    # a wallet that sends a plain Transfer with a free-text memo is still a deposit
    await led.execute(
        [
            spl.transfer_unchecked(cfg.ata(bob.pubkey()), cfg.deposit_pk, bob.pubkey(), 3_000_000),
            spl.memo("acct-bob"),
        ],
        bob,
    )
    # money the market moves itself is not a deposit
    await led.execute(aidp.approve_instructions(cfg, alice.pubkey(), 1_000_000), alice)
    await led.execute(aidp.pull_instructions(cfg, alice.pubkey(), 500_000, "pull-1"), market.key)

    first = await aidp.scan_deposits(led, cfg)
    assert [(d.account, d.amount) for d in first.deposits] == [
        ("acct-alice", 7_000_000),
        ("acct-bob", 3_000_000),
    ]
    d0 = first.deposits[0]
    assert d0.signature == p1.signature and d0.memo == "aidp:deposit:v1:acct-alice"
    assert d0.source_owner == str(alice.pubkey()) and d0.source_account == str(
        cfg.ata(alice.pubkey())
    )
    assert d0.slot > 0

    # a watcher crediting by signature: re-scans from the cursor add nothing twice
    credited: dict[str, int] = {d.signature: d.amount for d in first.deposits}
    again = await aidp.scan_deposits(led, cfg, since=first.cursor)
    assert again.deposits == [] and again.cursor == first.cursor
    p3 = await led.execute(aidp.deposit_instructions(cfg, bob.pubkey(), 1_000_000, "acct-bob"), bob)
    later = await aidp.scan_deposits(led, cfg, since=again.cursor)
    assert [d.signature for d in later.deposits] == [p3.signature]
    for d in later.deposits + (await aidp.scan_deposits(led, cfg)).deposits:
        credited.setdefault(d.signature, d.amount)
    assert sum(credited.values()) == 11_000_000 == await led.token_balance(cfg.deposit_pk) - 500_000


async def test_deposit_backlog_is_scanned_oldest_first_and_never_skipped(market):
    led, cfg = market.ledger, market.cfg
    buyer = await market.wallet(tokens=50_000_000)
    start = (await aidp.scan_deposits(led, cfg)).cursor  # past the bootstrap's own transactions
    sigs = [
        (await led.execute(aidp.deposit_instructions(cfg, buyer.pubkey(), n, f"acct-{n}"), buyer))
        .signature
        for n in (1, 2, 3, 4, 5)
    ]
    # a backlog larger than one call: each call takes the oldest part, the cursor its end
    first = await aidp.scan_deposits(led, cfg, since=start, max_signatures=2)
    assert [d.signature for d in first.deposits] == sigs[:2] and first.cursor == sigs[1]
    rest = await aidp.scan_deposits(led, cfg, since=first.cursor, max_signatures=2)
    assert [d.signature for d in rest.deposits] == sigs[2:4] and rest.cursor == sigs[3]

    # an RPC node that lists a signature but cannot return its transaction yet: the scan
    # stops before it instead of moving the cursor past a deposit it never read
    real = led.get_transaction

    async def lagging(signature: str):
        return None if signature == sigs[4] else await real(signature)

    led.get_transaction = lagging
    try:
        lag = await aidp.scan_deposits(led, cfg, since=rest.cursor)
    finally:
        del led.get_transaction
    assert lag.deposits == [] and lag.cursor == rest.cursor
    caught_up = await aidp.scan_deposits(led, cfg, since=lag.cursor)
    assert [d.signature for d in caught_up.deposits] == [sigs[4]]
    assert caught_up.deposits[0].amount == 5 and caught_up.cursor == sigs[4]


async def test_find_memo_matches_whole_keys_only(market):
    led, cfg = market.ledger, market.cfg
    buyer = await market.wallet(tokens=1_000_000)
    await led.execute(aidp.approve_instructions(cfg, buyer.pubkey(), 1_000_000), buyer)
    tenth = await led.execute(
        aidp.pull_instructions(cfg, buyer.pubkey(), 10, "acct.10"), market.key
    )
    assert await aidp.find_memo(led, cfg.deposit_pk, "acct.1") == []
    assert await aidp.find_memo(led, cfg.deposit_pk, "acct.10") == [tenth.signature]
    assert aidp.memo_texts("[4] a; b; [1] c") == ["a; b", "c"]


async def test_malformed_anchor_memo_anchors_nothing(market):
    led = market.ledger
    forged = await led.execute(
        [spl.memo("aidp:anchor:v1:zz:many", [market.key.pubkey()])], market.key
    )
    assert await aidp.read_anchor(led, forged.signature) is None


async def test_allowance_is_enforced_by_the_chain_and_revocable(market):
    led, cfg = market.ledger, market.cfg
    buyer = await market.wallet(tokens=10_000_000)
    await led.execute(aidp.approve_instructions(cfg, buyer.pubkey(), 1_000_000), buyer)
    assert await aidp.allowance(led, cfg, buyer.pubkey()) == 1_000_000

    pull = await aidp.prepare_pull(led, cfg, market.key, buyer.pubkey(), 600_000, "job-1")
    await led.submit(pull)
    assert (
        await led.confirm(pull.signature, pull.last_valid_block_height)
    ).state is TxState.CONFIRMED
    assert await aidp.allowance(led, cfg, buyer.pubkey()) == 400_000
    assert await market.tokens(buyer.pubkey()) == 9_400_000

    # pre-check refuses more than the live allowance ...
    with pytest.raises(AllowanceExceeded):
        await aidp.prepare_pull(led, cfg, market.key, buyer.pubkey(), 400_001, "job-2")
    # ... and without it the chain refuses: preflight rejects, and a forced send lands failed
    over = await aidp.prepare_pull(
        led, cfg, market.key, buyer.pubkey(), 400_001, "job-2", precheck=False
    )
    with pytest.raises(TransactionRejected) as rejected:
        await led.submit(over)
    assert rejected.value.err == {
        "InstructionError": [0, {"Custom": 1}]
    }  # TokenError::InsufficientFunds
    await led.submit(over, preflight=False)
    st = await led.confirm(over.signature, over.last_valid_block_height)
    assert st.state is TxState.FAILED and st.err == {"InstructionError": [0, {"Custom": 1}]}
    assert await market.tokens(buyer.pubkey()) == 9_400_000

    # revocation: the market can pull nothing any more, not even within the old allowance
    await led.execute(aidp.revoke_instructions(cfg, buyer.pubkey()), buyer)
    assert await aidp.allowance(led, cfg, buyer.pubkey()) == 0
    with pytest.raises(AllowanceExceeded):
        await aidp.prepare_pull(led, cfg, market.key, buyer.pubkey(), 1, "job-3")
    late = await aidp.prepare_pull(led, cfg, market.key, buyer.pubkey(), 1, "job-3", precheck=False)
    with pytest.raises(TransactionRejected):
        await led.submit(late)
    assert await market.tokens(buyer.pubkey()) == 9_400_000


async def test_anchor_memo_is_readable(market):
    led = market.ledger
    root = merkle_root([f"{i:064x}" for i in range(1000)])
    sent = await led.execute([aidp.anchor_memo_instruction(market.key.pubkey(), root, 1000)], market.key)
    anchor = await aidp.read_anchor(led, sent.signature)
    assert anchor.root == root and anchor.count == 1000 and anchor.signer == market.cfg.market
    assert anchor.slot > 0 and anchor.block_time
    tx = await led.get_transaction(sent.signature)
    assert tx.memos == [f"aidp:anchor:v1:{root}:1000"]
    assert any(
        f"aidp:anchor:v1:{root}:1000" in line for line in tx.logs
    )  # the Memo program logged it
    # not an anchor / not landed
    other = await led.execute(
        aidp.deposit_instructions(market.cfg, market.key.pubkey(), 0, "x"), market.key
    )
    assert await aidp.read_anchor(led, other.signature) is None
    assert await aidp.read_anchor(led, str(Keypair().sign_message(b"nope"))) is None


async def test_send_returns_identity_before_confirmation_and_status_is_exact(market):
    led, cfg = market.ledger, market.cfg
    buyer = await market.wallet(tokens=1_000)
    node = await market.wallet(tokens=0)
    ixs = [
        spl.transfer_checked(
            cfg.ata(buyer.pubkey()), cfg.mint_pk, cfg.ata(node.pubkey()), buyer.pubkey(), 100, 6
        )
    ]

    prepared = await led.prepare(ixs, buyer)  # signature known before anything is sent
    assert (
        await led.status(prepared.signature, prepared.last_valid_block_height)
    ).state is TxState.PENDING
    # deterministic: rebuilding with the recorded blockhash gives the same transaction
    from solders.hash import Hash

    again = await led.prepare(
        ixs,
        buyer,
        blockhash=Hash.from_string(prepared.blockhash),
        last_valid_block_height=prepared.last_valid_block_height,
    )
    assert again == prepared
    assert await led.submit(prepared) == prepared.signature
    st = await led.confirm(prepared.signature, prepared.last_valid_block_height)
    assert st.state is TxState.CONFIRMED and st.slot > 0
    # re-sending the same bytes never pays twice
    with pytest.raises(TransactionRejected, match="already been processed"):
        await led.submit(again)
    await led.submit(again, preflight=False)
    assert await market.tokens(node.pubkey()) == 100

    # never sent, blockhash expired: safe to re-plan, and the old bytes can never land
    # (a different transfer: identical instructions in the same slot are the same transaction,
    # which is why payments carry their idempotency key in a memo)
    lost = await led.prepare(ixs + [spl.memo("payment-2")], buyer)
    await led.advance_slots(151)
    assert (await led.status(lost.signature, lost.last_valid_block_height)).state is TxState.EXPIRED
    with pytest.raises(TransactionRejected, match="Blockhash not found"):
        await led.submit(lost)
    await led.submit(lost, preflight=False)  # dropped, as a validator would
    assert (await led.status(lost.signature, lost.last_valid_block_height)).state is TxState.EXPIRED
    assert await market.tokens(node.pubkey()) == 100

    # landed with an error: failed, fee paid, nothing moved
    too_much = [
        spl.transfer_checked(
            cfg.ata(buyer.pubkey()), cfg.mint_pk, cfg.ata(node.pubkey()), buyer.pubkey(), 10**9, 6
        )
    ]
    lamports = await led.get_balance(buyer.pubkey())
    bad = await led.send(too_much, buyer, preflight=False)
    st = await led.confirm(bad.signature, bad.last_valid_block_height)
    assert st.state is TxState.FAILED
    assert await led.get_balance(buyer.pubkey()) == lamports - 5000
    assert (await led.get_transaction(bad.signature)).err == st.err


async def test_drive_pays_exactly_once_across_crashes(market):
    """The market's chain_transfers state machine, with crashes at every step."""
    led, cfg = market.ledger, market.cfg
    await led.execute(
        [spl.mint_to_checked(cfg.mint_pk, cfg.deposit_pk, market.key.pubkey(), 10_000, 6)],
        market.key,
    )
    node = Keypair().pubkey()

    def payout(key: str) -> list:
        """A payment out of the deposit account, told apart by its memo's key."""
        return [spl.create_ata_idempotent(market.key.pubkey(), node, cfg.mint_pk),
                spl.transfer_checked(cfg.deposit_pk, cfg.mint_pk, cfg.ata(node),
                                     market.key.pubkey(), 100, cfg.decimals),
                spl.memo(aidp.keyed_memo("pay", key), [market.key.pubkey()])]

    row: dict = {"sent": None}

    async def record(prepared):
        # called before broadcast: the chain has not seen it yet
        assert (await led.signature_statuses([prepared.signature])) == [None]
        row["sent"] = prepared

    # 1. planned → confirmed in one go
    st = await led.drive(payout("p1"), market.key, sent=None, mark_sent=record)
    assert st.state is TxState.CONFIRMED and await market.tokens(node) == 100
    # driving a confirmed record again sends nothing
    first = row["sent"]
    assert (
        await led.drive(payout("p1"), market.key, sent=first, mark_sent=record)
    ).state is TxState.CONFIRMED
    assert row["sent"] == first and await market.tokens(node) == 100

    # 2. crash after recording `sent`, before broadcasting: the same bytes go out later
    class Crash(Exception):
        pass

    async def record_then_crash(prepared):
        row["sent"] = prepared
        raise Crash

    with pytest.raises(Crash):
        await led.drive(payout("p2"), market.key, sent=None, mark_sent=record_then_crash)
    assert await market.tokens(node) == 100
    # the recovery only knows the recorded columns (no raw bytes)
    recorded = PreparedTx(
        row["sent"].signature, row["sent"].blockhash, row["sent"].last_valid_block_height, b""
    )
    st = await led.drive(payout("p2"), market.key, sent=recorded, mark_sent=record)
    assert st.state is TxState.CONFIRMED and row["sent"].signature == recorded.signature
    assert await market.tokens(node) == 200

    # 3. crash before broadcasting and the blockhash expires: re-planned under a new signature
    with pytest.raises(Crash):
        await led.drive(payout("p3"), market.key, sent=None, mark_sent=record_then_crash)
    stale = row["sent"]
    await led.advance_slots(151)
    st = await led.drive(payout("p3"), market.key, sent=stale, mark_sent=record)
    assert st.state is TxState.CONFIRMED and row["sent"].signature != stale.signature
    assert (
        await led.status(stale.signature, stale.last_valid_block_height)
    ).state is TxState.EXPIRED
    assert await market.tokens(node) == 300

    # 4. changed instructions cannot masquerade as the recorded transfer
    with pytest.raises(LedgerError, match="changed"):
        fresh = await led.prepare(payout("p4"), market.key)
        await led.drive(payout("p4-other"), market.key, sent=fresh, mark_sent=record)
