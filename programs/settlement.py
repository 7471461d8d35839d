"""Settlement operations on a ``Ledger``: bootstrap, deposits, allowances, stake, payouts, anchors.

Each operation comes as a pure, synchronous ``*_instructions`` builder (so the market can
``ledger.prepare`` → record ``sent`` → ``ledger.submit`` → ``ledger.confirm`` with its
own exactly-once bookkeeping) plus, where useful, an async convenience that runs it.

Memos (Memo v2, UTF-8) name what each movement is, so anyone reading the chain — the
explorer, a reconcile job, an auditor — can tell them apart:

    aidp:deposit:v1:<account>                buyer → deposit account
    aidp:pull:v1:<key>                       allowance pull, market as delegate
    aidp:payout:v1:<root>:<count>:<key>      deposit → node, root = Merkle root of its jobs
    aidp:fee:v1:<root>:<count>:<key>         deposit → treasury, market fee of a round
    aidp:refund:v1:<key>                     deposit → buyer
    aidp:slash:v1:<key>                      stake → treasury (market + arbiter)
    aidp:withdraw:v1:<key>                   stake → operator (operator + one other)
    aidp:anchor:v1:<root>:<count>            receipts' Merkle root, no transfer

``<key>`` is the caller's idempotency key (``chain_transfers.idempotency_key``), which
lets a reconcile find a payment on chain even when its signature was lost.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from solders.hash import Hash
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey

from . import spl
from .ledger import AllowanceExceeded, Ledger, LedgerError, PreparedTx, SignatureInfo, TxInfo

LAMPORTS_PER_SOL = 1_000_000_000
MINT_SEED = "aidp-mint"
TREASURY_SEED = "aidp-treasury"
MEMO_PREFIX = "aidp:"

log = logging.getLogger("aidp.settlement")


# ---------------------------------------------------------------------------- memos


@dataclass(frozen=True)
class AidpMemo:
    kind: str
    version: str
    fields: tuple[str, ...]


def parse_memo(text: str | None) -> AidpMemo | None:
    """``aidp:<kind>:<version>:<fields...>`` → AidpMemo; anything else → None."""
    if not text or not text.startswith(MEMO_PREFIX):
        return None
    parts = text.split(":")
    if len(parts) < 3:
        return None
    return AidpMemo(parts[1], parts[2], tuple(parts[3:]))


def _check_field(value: str) -> str:
    if ":" in value or not value:
        raise ValueError(f"memo field must be non-empty and contain no ':': {value!r}")
    return value


def deposit_memo(account: str) -> str:
    return f"aidp:deposit:v1:{_check_field(account)}"


def payout_memo(root_hex: str, count: int, key: str) -> str:
    return f"aidp:payout:v1:{bytes.fromhex(root_hex).hex()}:{int(count)}:{_check_field(key)}"


def fee_memo(root_hex: str, count: int, key: str) -> str:
    return f"aidp:fee:v1:{bytes.fromhex(root_hex).hex()}:{int(count)}:{_check_field(key)}"


def anchor_memo(root_hex: str, count: int) -> str:
    return f"aidp:anchor:v1:{bytes.fromhex(root_hex).hex()}:{int(count)}"


def keyed_memo(kind: str, key: str) -> str:
    return f"aidp:{_check_field(kind)}:v1:{_check_field(key)}"


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ChainConfig:
    """The addresses the market settles with. JSON-serialisable for the market's DB/files."""

    mint: str
    decimals: int
    market: str  # market authority (fee payer, deposit owner, delegate, stake co-signer)
    deposit: str  # token account receiving deposits and pulls; payouts leave from it
    treasury: str  # token account receiving fees and slashes

    @property
    def mint_pk(self) -> Pubkey:
        return Pubkey.from_string(self.mint)

    @property
    def market_pk(self) -> Pubkey:
        return Pubkey.from_string(self.market)

    @property
    def deposit_pk(self) -> Pubkey:
        return Pubkey.from_string(self.deposit)

    @property
    def treasury_pk(self) -> Pubkey:
        return Pubkey.from_string(self.treasury)

    def ata(self, owner: Pubkey) -> Pubkey:
        return spl.associated_token_address(owner, self.mint_pk)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ChainConfig:
        return cls(**json.loads(text))

    def save(self, path: Path | str) -> Path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.to_json() + "\n")
        return target

    @classmethod
    def load(cls, path: Path | str) -> ChainConfig:
        return cls.from_json(Path(path).read_text())


# ---------------------------------------------------------------------------- bootstrap


def local_mint_address(market: Pubkey) -> Pubkey:
    return spl.seeded_address(market, MINT_SEED)


async def bootstrap(
    ledger: Ledger,
    market: Keypair,
    *,
    decimals: int = 6,
    mint: Pubkey | str | None = None,
    treasury: Pubkey | str | None = None,
    min_sol: int = 2 * LAMPORTS_PER_SOL,
) -> ChainConfig:
    """Create (or find) the AIDP mint, the deposit account and the treasury. Idempotent.

    Without ``mint`` the mint is created at a deterministic address derived from the
    market key (local chains, devnet). With ``mint`` (mainnet: the real AIDP mint) it must
    exist and have ``decimals``. ``treasury`` defaults to a market-owned seeded account.
    """
    mpk = market.pubkey()
    if ledger.local and await ledger.get_balance(mpk) < min_sol:
        await ledger.airdrop(mpk, 10 * LAMPORTS_PER_SOL)
    ixs: list[Instruction] = []
    if mint is None:
        mint_pk = local_mint_address(mpk)
        info = await ledger.mint_info(mint_pk)
        if info is None:
            rent = await ledger.minimum_balance_for_rent_exemption(spl.MINT_SIZE)
            ixs += [
                spl.create_seeded_account(mpk, mpk, MINT_SEED, rent, spl.MINT_SIZE),
                spl.initialize_mint2(mint_pk, decimals, mpk),
            ]
    else:
        mint_pk = Pubkey.from_string(str(mint))
        info = await ledger.mint_info(mint_pk)
        if info is None:
            raise LedgerError(f"mint {mint_pk} does not exist on this chain")
    if info is not None and info.decimals != decimals:
        raise LedgerError(f"mint {mint_pk} has {info.decimals} decimals, config says {decimals}")
    ixs.append(spl.create_ata_idempotent(mpk, mpk, mint_pk))
    if treasury is None:
        treasury_pk = spl.seeded_address(mpk, TREASURY_SEED)
        if await ledger.get_account(treasury_pk) is None:
            rent = await ledger.minimum_balance_for_rent_exemption(spl.TOKEN_ACCOUNT_SIZE)
            ixs += [
                spl.create_seeded_account(mpk, mpk, TREASURY_SEED, rent, spl.TOKEN_ACCOUNT_SIZE),
                spl.initialize_account3(treasury_pk, mint_pk, mpk),
            ]
    else:
        treasury_pk = Pubkey.from_string(str(treasury))
    await ledger.execute(ixs, market)
    return ChainConfig(
        mint=str(mint_pk),
        decimals=decimals,
        market=str(mpk),
        deposit=str(spl.associated_token_address(mpk, mint_pk)),
        treasury=str(treasury_pk),
    )


async def fund_wallet(
    ledger: Ledger,
    cfg: ChainConfig,
    mint_authority: Keypair,
    wallet: Pubkey,
    *,
    lamports: int = LAMPORTS_PER_SOL,
    tokens: int = 0,
) -> Pubkey:
    """Local chains: airdrop SOL, create the wallet's AIDP account, mint ``tokens`` base units."""
    if lamports:
        await ledger.airdrop(wallet, lamports)
    ata = cfg.ata(wallet)
    ixs = [spl.create_ata_idempotent(mint_authority.pubkey(), wallet, cfg.mint_pk)]
    if tokens:
        ixs.append(
            spl.mint_to_checked(cfg.mint_pk, ata, mint_authority.pubkey(), tokens, cfg.decimals)
        )
    await ledger.execute(ixs, mint_authority)
    return ata


# ---------------------------------------------------------------------------- deposits


def deposit_instructions(
    cfg: ChainConfig, buyer: Pubkey, amount: int, account: str
) -> list[Instruction]:
    """What a buyer's wallet signs: ``transfer_checked`` to the deposit account + memo."""
    return [
        spl.transfer_checked(
            cfg.ata(buyer), cfg.mint_pk, cfg.deposit_pk, buyer, amount, cfg.decimals
        ),
        spl.memo(deposit_memo(account), [buyer]),
    ]


@dataclass(frozen=True)
class Deposit:
    signature: str  # the exactly-once key for crediting
    slot: int
    block_time: int | None
    amount: int  # base units received by the deposit account
    memo: str | None
    account: str | None  # the market account the memo names, None when unattributed
    source_owner: str | None  # wallet whose token account paid
    source_account: str | None


@dataclass(frozen=True)
class DepositScan:
    deposits: list[Deposit]  # oldest first
    cursor: str | None  # newest signature examined: pass as ``since`` next time


async def scan_deposits(
    ledger: Ledger, cfg: ChainConfig, *, since: str | None = None, max_signatures: int = 10_000
) -> DepositScan:
    """Incoming AIDP transfers to the deposit account after signature ``since``.

    A movement the market made itself (pull, payout, refund… memos) is not a deposit.
    Credit each ``Deposit`` once, keyed by ``signature``; the cursor only saves work.

    Signatures are listed newest first back to ``since`` but examined oldest first, at
    most ``max_signatures`` per call, and the cursor is the newest one examined: a backlog
    larger than one call is finished by the next calls, never jumped over. A transaction
    the node lists but cannot return yet (an RPC node lagging behind its own index) ends
    the scan just before it, so it is examined again next time instead of being lost.
    """
    if max_signatures < 1:
        raise ValueError("max_signatures must be >= 1")
    # newest → oldest; the deque keeps the oldest ``max_signatures`` of the backlog
    backlog: deque[SignatureInfo] = deque(maxlen=max_signatures)
    before: str | None = None
    while True:
        page = await ledger.signatures_for_address(
            cfg.deposit_pk, before=before, until=since, limit=1000
        )
        backlog.extend(page)
        if len(page) < 1000:
            break
        before = page[-1].signature
    cursor = since
    deposits: list[Deposit] = []
    for si in reversed(backlog):  # oldest first
        if si.err is None:
            tx = await ledger.get_transaction(si.signature)
            if tx is None:
                log.warning("deposit scan: %s is listed but not retrievable yet", si.signature)
                break
            deposit = _deposit_of(cfg, si.signature, tx)
            if deposit is not None:
                deposits.append(deposit)
        cursor = si.signature
    return DepositScan(deposits, cursor)


def _deposit_of(cfg: ChainConfig, signature: str, tx: TxInfo) -> Deposit | None:
    """The deposit a landed transaction makes, None when it makes none."""
    if not tx.ok:
        return None
    memo = tx.memos[0] if tx.memos else None
    parsed = parse_memo(memo)
    if parsed is not None and parsed.kind != "deposit":
        return None
    changes = tx.token_changes()
    received = changes.get(cfg.deposit)
    if received is None or received[1] <= 0 or received[0].mint != cfg.mint:
        return None
    source = next(
        (b for a, (b, d) in changes.items() if d < 0 and b.mint == cfg.mint and a != cfg.deposit),
        None,
    )
    if parsed is not None:
        account = parsed.fields[0] if parsed.fields else None
    else:
        account = memo.strip() if memo and memo.strip() else None
    return Deposit(
        signature=signature,
        slot=tx.slot,
        block_time=tx.block_time,
        amount=received[1],
        memo=memo,
        account=account,
        source_owner=source.owner if source else None,
        source_account=source.account if source else None,
    )


# ---------------------------------------------------------------------------- allowances


def approve_instructions(cfg: ChainConfig, buyer: Pubkey, amount: int) -> list[Instruction]:
    """What a buyer signs to let the market pull up to ``amount`` (replaces any earlier one)."""
    return [
        spl.approve_checked(cfg.ata(buyer), cfg.mint_pk, cfg.market_pk, buyer, amount, cfg.decimals)
    ]


def revoke_instructions(cfg: ChainConfig, buyer: Pubkey) -> list[Instruction]:
    return [spl.revoke(cfg.ata(buyer), buyer)]


async def allowance(ledger: Ledger, cfg: ChainConfig, buyer: Pubkey) -> int:
    """What the market may still pull from ``buyer``: min(delegated, balance); 0 if revoked."""
    ta = await ledger.token_account(cfg.ata(buyer))
    if ta is None or ta.delegate != cfg.market_pk or ta.state != 1:
        return 0
    return min(ta.delegated_amount, ta.amount)


def pull_instructions(cfg: ChainConfig, buyer: Pubkey, amount: int, key: str) -> list[Instruction]:
    return [
        spl.transfer_checked(
            cfg.ata(buyer), cfg.mint_pk, cfg.deposit_pk, cfg.market_pk, amount, cfg.decimals
        ),
        spl.memo(keyed_memo("pull", key), [cfg.market_pk]),
    ]


async def prepare_pull(
    ledger: Ledger,
    cfg: ChainConfig,
    market: Keypair,
    buyer: Pubkey,
    amount: int,
    key: str,
    *,
    precheck: bool = True,
) -> PreparedTx:
    """Build a delegate pull. The pre-check refuses more than the live allowance; the
    chain refuses it anyway (SPL Token checks ``delegated_amount``)."""
    if precheck:
        available = await allowance(ledger, cfg, buyer)
        if amount > available:
            raise AllowanceExceeded(f"pull of {amount} exceeds allowance {available} of {buyer}")
    return await ledger.prepare(pull_instructions(cfg, buyer, amount, key), market)


# ---------------------------------------------------------------------------- stake


@dataclass(frozen=True)
class Stake:
    """A node's stake: an AIDP account owned by a 2-of-3 SPL multisig."""

    operator: str
    market: str
    arbiter: str
    multisig: str
    account: str
    seed: str

    @property
    def multisig_pk(self) -> Pubkey:
        return Pubkey.from_string(self.multisig)

    @property
    def account_pk(self) -> Pubkey:
        return Pubkey.from_string(self.account)


def stake_for(cfg: ChainConfig, operator: Pubkey, arbiter: Pubkey) -> Stake:
    """Deterministic addresses: a multisig seeded from the market key by (operator, arbiter)."""
    seed = spl.short_seed("ms", operator, arbiter)
    ms = spl.seeded_address(cfg.market_pk, seed)
    return Stake(
        operator=str(operator),
        market=cfg.market,
        arbiter=str(arbiter),
        multisig=str(ms),
        account=str(spl.associated_token_address(ms, cfg.mint_pk)),
        seed=seed,
    )


def create_stake_instructions(
    cfg: ChainConfig, stake: Stake, multisig_rent: int
) -> list[Instruction]:
    market, ms = cfg.market_pk, stake.multisig_pk
    members = [Pubkey.from_string(k) for k in (stake.operator, stake.market, stake.arbiter)]
    return [
        spl.create_seeded_account(market, market, stake.seed, multisig_rent, spl.MULTISIG_SIZE),
        spl.initialize_multisig2(ms, members, 2),
        spl.create_ata_idempotent(market, ms, cfg.mint_pk),
    ]


async def create_stake(
    ledger: Ledger, cfg: ChainConfig, market: Keypair, operator: Pubkey, arbiter: Pubkey
) -> Stake:
    """Create the 2-of-3 {operator, market, arbiter} multisig and its AIDP account. Idempotent."""
    stake = stake_for(cfg, operator, arbiter)
    existing = await ledger.get_account(stake.multisig_pk)
    if existing is not None:
        ms = spl.parse_multisig(bytes(existing.data))
        if ms.m != 2 or [str(s) for s in ms.signers] != [
            stake.operator,
            stake.market,
            stake.arbiter,
        ]:
            raise LedgerError(f"{stake.multisig} exists with another configuration")
        await ledger.execute(
            [spl.create_ata_idempotent(cfg.market_pk, stake.multisig_pk, cfg.mint_pk)], market
        )
        return stake
    rent = await ledger.minimum_balance_for_rent_exemption(spl.MULTISIG_SIZE)
    await ledger.execute(create_stake_instructions(cfg, stake, rent), market)
    return stake


def stake_deposit_instructions(cfg: ChainConfig, stake: Stake, amount: int) -> list[Instruction]:
    """Operator bonds ``amount`` from their AIDP account (signed by the operator)."""
    op = Pubkey.from_string(stake.operator)
    return [
        spl.transfer_checked(cfg.ata(op), cfg.mint_pk, stake.account_pk, op, amount, cfg.decimals)
    ]


@dataclass(frozen=True)
class StakeInfo:
    amount: int
    m: int
    signers: list[str]


async def read_stake(ledger: Ledger, stake: Stake) -> StakeInfo:
    ms_acc = await ledger.get_account(stake.multisig_pk)
    if ms_acc is None:
        raise LedgerError(f"no stake multisig at {stake.multisig}")
    ms = spl.parse_multisig(bytes(ms_acc.data))
    ta = await ledger.token_account(stake.account_pk)
    if ta is not None and ta.owner != stake.multisig_pk:
        raise LedgerError(f"{stake.account} is not owned by the stake multisig")
    return StakeInfo(ta.amount if ta else 0, ms.m, [str(s) for s in ms.signers])


def _stake_transfer(
    cfg: ChainConfig,
    stake: Stake,
    amount: int,
    dest: Pubkey,
    signers: Sequence[Pubkey],
    memo_text: str,
) -> list[Instruction]:
    return [
        spl.transfer_checked(
            stake.account_pk,
            cfg.mint_pk,
            dest,
            stake.multisig_pk,
            amount,
            cfg.decimals,
            list(signers),
        ),
        spl.memo(memo_text),
    ]


def slash_instructions(
    cfg: ChainConfig,
    stake: Stake,
    amount: int,
    key: str,
    *,
    dest: Pubkey | None = None,
    signers: Sequence[Pubkey] | None = None,
) -> list[Instruction]:
    """Stake → treasury (or ``dest``), co-signed by market and arbiter."""
    signers = signers if signers is not None else [cfg.market_pk, Pubkey.from_string(stake.arbiter)]
    return _stake_transfer(
        cfg, stake, amount, dest or cfg.treasury_pk, signers, keyed_memo("slash", key)
    )


def withdraw_instructions(
    cfg: ChainConfig,
    stake: Stake,
    amount: int,
    key: str,
    *,
    cosigner: Pubkey,
    dest: Pubkey | None = None,
) -> list[Instruction]:
    """Stake → operator's AIDP account, signed by the operator and one other member.
    The unbonding policy (when this is allowed) is the market's; the chain enforces 2-of-3."""
    op = Pubkey.from_string(stake.operator)
    return _stake_transfer(
        cfg, stake, amount, dest or cfg.ata(op), [op, cosigner], keyed_memo("withdraw", key)
    )


def withdraw_message(
    cfg: ChainConfig, stake: Stake, amount: int, key: str, blockhash: str
) -> Message:
    """The message of a market-co-signed withdrawal (fee payer and co-signer: the market).

    Both sides build it from the same fields, so the operator can check byte for byte
    what it is asked to sign before its signature makes the 2 of 3."""
    op = Pubkey.from_string(stake.operator)
    ixs = [
        spl.create_ata_idempotent(cfg.market_pk, op, cfg.mint_pk),
        *withdraw_instructions(cfg, stake, amount, key, cosigner=cfg.market_pk),
    ]
    return Message.new_with_blockhash(ixs, cfg.market_pk, Hash.from_string(blockhash))


# ---------------------------------------------------------------------------- payouts


@dataclass(frozen=True)
class NodePayout:
    owner: str  # node operator's wallet
    amount: int  # base units, after the market fee
    root: str  # Merkle root (hex) of the receipts it pays
    count: int  # number of jobs
    key: str  # idempotency key


@dataclass(frozen=True)
class PayoutRound:
    payouts: list[NodePayout]
    fee: int
    fee_root: str
    job_count: int
    key: str


def plan_round(jobs: Iterable[tuple[str, str, int]], fee_bps: int, round_key: str) -> PayoutRound:
    """Group settled jobs ``(node_owner, receipt_hash_hex, price)`` into one payout per node.

    The market fee is ``price * fee_bps // 10_000`` per job; the node receives the rest.
    Each payout's memo carries the Merkle root of its receipts (in the given order).
    """
    from protocol.merkle import merkle_root

    by_node: dict[str, list[tuple[str, int]]] = {}
    all_hashes: list[str] = []
    fee = 0
    for owner, receipt_hash, price in jobs:
        job_fee = price * fee_bps // 10_000
        fee += job_fee
        by_node.setdefault(owner, []).append((receipt_hash, price - job_fee))
        all_hashes.append(receipt_hash)
    payouts = [
        NodePayout(
            owner=owner,
            amount=sum(p for _, p in items),
            root=merkle_root([h for h, _ in items]),
            count=len(items),
            key=f"{round_key}.{owner}",
        )
        for owner, items in sorted(by_node.items())
    ]
    return PayoutRound(
        payouts,
        fee,
        merkle_root(all_hashes) if all_hashes else "00" * 32,
        len(all_hashes),
        round_key,
    )


def payout_instructions(cfg: ChainConfig, payout: NodePayout) -> list[Instruction]:
    """Deposit account → node's AIDP account (created if needed) + memo with the jobs' root."""
    owner = Pubkey.from_string(payout.owner)
    return [
        spl.create_ata_idempotent(cfg.market_pk, owner, cfg.mint_pk),
        spl.transfer_checked(
            cfg.deposit_pk, cfg.mint_pk, cfg.ata(owner), cfg.market_pk, payout.amount, cfg.decimals
        ),
        spl.memo(payout_memo(payout.root, payout.count, payout.key), [cfg.market_pk]),
    ]


def fee_instructions(cfg: ChainConfig, rnd: PayoutRound) -> list[Instruction]:
    return [
        spl.transfer_checked(
            cfg.deposit_pk, cfg.mint_pk, cfg.treasury_pk, cfg.market_pk, rnd.fee, cfg.decimals
        ),
        spl.memo(fee_memo(rnd.fee_root, rnd.job_count, rnd.key + ".fee"), [cfg.market_pk]),
    ]


def round_transactions(
    cfg: ChainConfig, rnd: PayoutRound
) -> list[tuple[str, str, list[Instruction]]]:
    """(kind, idempotency key, instructions) for every transfer of a round, fee last."""
    out = [("payout", p.key, payout_instructions(cfg, p)) for p in rnd.payouts if p.amount > 0]
    if rnd.fee > 0:
        out.append(("payout", rnd.key + ".fee", fee_instructions(cfg, rnd)))
    return out


# ---------------------------------------------------------------------------- anchors


def anchor_instructions(market: Pubkey, root_hex: str, count: int) -> list[Instruction]:
    return [spl.memo(anchor_memo(root_hex, count), [market])]


@dataclass(frozen=True)
class Anchor:
    signature: str
    slot: int
    block_time: int | None
    root: str
    count: int
    signer: str


async def read_anchor(ledger: Ledger, signature: str) -> Anchor | None:
    """The anchored root of a landed, successful anchor transaction (None otherwise)."""
    tx = await ledger.get_transaction(signature)
    if tx is None or not tx.ok:
        return None
    for text in tx.memos:
        m = parse_memo(text)
        if m and m.kind == "anchor" and m.version == "v1" and len(m.fields) >= 2:
            root, count = m.fields[0], m.fields[1]
            # anyone can write an anchor-looking memo: a malformed one anchors nothing
            if len(root) != 64 or not _is_hex(root) or not count.isdigit():
                continue
            return Anchor(signature, tx.slot, tx.block_time, root, int(count), tx.account_keys[0])
    return None


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def memo_texts(field: str | None) -> list[str]:
    """The memos of getSignaturesForAddress's ``memo`` field (``[len] text`` joined by ``; ``).

    Each text is cut by its byte length, so a memo that itself contains ``; `` or ``[``
    is read whole."""
    out: list[str] = []
    data = (field or "").encode()
    pos = 0
    while pos < len(data):
        if data[pos : pos + 1] != b"[":
            return out + [data[pos:].decode(errors="replace")]
        close = data.find(b"] ", pos)
        try:
            length = int(data[pos + 1 : close])
        except ValueError:
            return out + [data[pos:].decode(errors="replace")]
        start = close + 2
        out.append(data[start : start + length].decode(errors="replace"))
        pos = start + length
        if data[pos : pos + 2] == b"; ":
            pos += 2
    return out


def memo_names(text: str, key: str) -> bool:
    """True when memo ``text`` carries ``key`` as a whole field (or is exactly ``key``).

    Whole fields, not substrings: key ``acct.1`` must not match the memo of ``acct.10``."""
    if text == key:
        return True
    parsed = parse_memo(text)
    return parsed is not None and key in parsed.fields


async def find_memo(
    ledger: Ledger, address: Pubkey, needle: str, *, limit: int = 1000
) -> list[str]:
    """Signatures of recent successful transactions touching ``address`` whose memo names
    ``needle`` (e.g. an idempotency key) as a whole field: how a reconcile finds a payment
    it lost track of."""
    return [
        s.signature
        for s in await ledger.signatures_for_address(address, limit=limit)
        if s.err is None and any(memo_names(t, needle) for t in memo_texts(s.memo))
    ]
