"""Buyer deposits: what a wallet signs to pay in, and finding those payments on chain.

A deposit is the one movement the market does not make itself: it has to be recognised
among everything else that touches the deposit account, credited exactly once by
signature, and attributed to a market account by its memo.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from solders.instruction import Instruction
from solders.pubkey import Pubkey

from chain import spl
from chain.aidp.config import ChainConfig
from chain.aidp.memo import deposit_memo, parse_memo
from chain.ledger.base import Ledger, SignatureInfo, TokenBalance, TxInfo

PAGE = 1000  # getSignaturesForAddress's largest page

log = logging.getLogger("chain.aidp.deposits")


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
    cursor = since
    deposits: list[Deposit] = []
    for si in await _oldest_unseen(ledger, cfg, since, max_signatures):
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


async def _oldest_unseen(
    ledger: Ledger, cfg: ChainConfig, since: str | None, most: int
) -> list[SignatureInfo]:
    """The oldest ``most`` signatures after ``since``, oldest first.

    The chain lists newest first, so the whole backlog is paged through; the deque keeps
    only its oldest part."""
    backlog: deque[SignatureInfo] = deque(maxlen=most)
    before: str | None = None
    while True:
        page = await ledger.signatures_for_address(
            cfg.deposit_pk, before=before, until=since, limit=PAGE
        )
        backlog.extend(page)
        if len(page) < PAGE:
            return list(reversed(backlog))
        before = page[-1].signature


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
    source = _payer(cfg, changes)
    return Deposit(
        signature=signature,
        slot=tx.slot,
        block_time=tx.block_time,
        amount=received[1],
        memo=memo,
        account=_account_named(memo),
        source_owner=source.owner if source else None,
        source_account=source.account if source else None,
    )


def _payer(cfg: ChainConfig, changes: dict[str, tuple[TokenBalance, int]]) -> TokenBalance | None:
    """The AIDP account (other than the deposit account) that the transfer debited."""
    return next(
        (b for a, (b, d) in changes.items() if d < 0 and b.mint == cfg.mint and a != cfg.deposit),
        None,
    )


def _account_named(memo: str | None) -> str | None:
    """The market account a deposit memo names: ``aidp:deposit:v1:<account>``'s field,
    or, from a wallet that writes free text, the text itself."""
    parsed = parse_memo(memo)
    if parsed is not None:
        return parsed.fields[0] if parsed.fields else None
    return memo.strip() if memo and memo.strip() else None
