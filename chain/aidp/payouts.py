"""Payout rounds: settled jobs grouped into one transfer per node plus the market's fee.

Paying per node per round instead of per job keeps fees and transactions few; each
transfer's memo carries the Merkle root of the receipts it pays, so a node (or anyone)
can check a payment against the jobs it covers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from solders.instruction import Instruction
from solders.pubkey import Pubkey

from chain import spl
from chain.aidp.config import ChainConfig
from chain.aidp.memo import fee_memo, payout_memo
from protocol.merkle import merkle_root

BPS = 10_000  # fee_bps of the whole price
EMPTY_ROOT = "00" * 32  # the fee root of a round without jobs


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
    by_node: dict[str, list[tuple[str, int]]] = {}
    all_hashes: list[str] = []
    fee = 0
    for owner, receipt_hash, price in jobs:
        job_fee = price * fee_bps // BPS
        fee += job_fee
        by_node.setdefault(owner, []).append((receipt_hash, price - job_fee))
        all_hashes.append(receipt_hash)
    payouts = [
        _node_payout(owner, items, round_key) for owner, items in sorted(by_node.items())
    ]
    root = merkle_root(all_hashes) if all_hashes else EMPTY_ROOT
    return PayoutRound(payouts, fee, root, len(all_hashes), round_key)


def _node_payout(owner: str, items: list[tuple[str, int]], round_key: str) -> NodePayout:
    """One node's share of a round: ``items`` are its (receipt hash, earning) pairs."""
    return NodePayout(
        owner=owner,
        amount=sum(p for _, p in items),
        root=merkle_root([h for h, _ in items]),
        count=len(items),
        key=f"{round_key}.{owner}",
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
