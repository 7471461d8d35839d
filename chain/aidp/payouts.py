"""Payout epochs: settled jobs grouped into one Merkle leaf per node, posted and funded
through the ``aidp_market`` program, then claimed leaf by leaf; and the market's fee.

``post_payouts(epoch, root, total)`` moves the epoch's total from the market's deposit
account into a vault of the program and records the root of its ``(index, node,
amount)`` leaves. From then on each node is paid by ``claim`` with its leaf and proof,
submitted by anyone (the market does it for every node; ``aidp-node claim`` does it
without the market), to the node's associated token account only, once (a bitmap).
The fee is the market's own money: a plain transfer to the treasury with a memo.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from solders.instruction import Instruction
from solders.pubkey import Pubkey

from chain import spl
from chain.aidp import program
from chain.aidp.config import ChainConfig
from chain.aidp.deploy import programdata_address
from chain.aidp.memo import fee_memo
from chain.ledger.base import Ledger
from protocol.merkle import ProofStep, inclusion_proof, merkle_root

EMPTY_ROOT = "00" * 32  # the fee root of a round without jobs


@dataclass(frozen=True)
class PayoutLeaf:
    index: int
    node: str  # the operator's key (its associated token account is paid)
    amount: int

    def leaf_hex(self) -> str:
        return program.payout_leaf(self.index, Pubkey.from_string(self.node), self.amount).hex()


@dataclass(frozen=True)
class PayoutEpoch:
    epoch: int
    leaves: list[PayoutLeaf]

    @property
    def total(self) -> int:
        return sum(leaf.amount for leaf in self.leaves)

    @property
    def root(self) -> str:
        return merkle_root([leaf.leaf_hex() for leaf in self.leaves])

    def proof(self, index: int) -> list[ProofStep]:
        return inclusion_proof([leaf.leaf_hex() for leaf in self.leaves], index)


def plan_epoch(epoch: int, earnings: Iterable[tuple[str, int]]) -> PayoutEpoch:
    """One leaf per node of the summed ``(node, earning)`` pairs, nodes in key order;
    nodes owed nothing get no leaf."""
    by_node: dict[str, int] = {}
    for node, earning in earnings:
        by_node[node] = by_node.get(node, 0) + earning
    owed = [(node, amount) for node, amount in sorted(by_node.items()) if amount > 0]
    return PayoutEpoch(epoch, [PayoutLeaf(i, node, amount)
                               for i, (node, amount) in enumerate(owed)])


def post_instructions(cfg: ChainConfig, epoch: PayoutEpoch) -> list[Instruction]:
    """Fund the epoch's vault from the deposit account and record its root."""
    pid = cfg.program_pk
    return [program.instruction(pid, "postPayouts", {
        "config": cfg.program_config, "authority": cfg.market_pk,
        "payouts": program.payouts_address(pid, epoch.epoch),
        "payoutVault": program.payout_vault_address(pid, epoch.epoch),
        "source": cfg.deposit_pk, "mint": cfg.mint_pk, "tokenProgram": spl.TOKEN_PROGRAM_ID,
        "systemProgram": program.SYSTEM_PROGRAM_ID, "programData": programdata_address(pid)},
        epoch=epoch.epoch, root=bytes.fromhex(epoch.root), total=epoch.total,
        leafCount=len(epoch.leaves))]


def claim_instructions(cfg: ChainConfig, epoch: int, leaf: PayoutLeaf,
                       proof: list[ProofStep], payer: Pubkey) -> list[Instruction]:
    """Pay one leaf into the node's associated token account (created by ``payer`` if
    missing)."""
    pid, node = cfg.program_pk, Pubkey.from_string(leaf.node)
    return [spl.create_ata_idempotent(payer, node, cfg.mint_pk),
            program.instruction(pid, "claim", {
                "payouts": program.payouts_address(pid, epoch),
                "payoutVault": program.payout_vault_address(pid, epoch),
                "destination": cfg.ata(node), "tokenProgram": spl.TOKEN_PROGRAM_ID},
                index=leaf.index, node=node, amount=leaf.amount,
                lefts=sum(1 << i for i, step in enumerate(proof) if step.side == "left"),
                ataBump=spl.ata_bump(node, cfg.mint_pk),
                proof=[bytes.fromhex(step.sibling) for step in proof])]


def close_instructions(cfg: ChainConfig, epoch: int) -> list[Instruction]:
    """Close a fully claimed epoch: its Payouts account's and vault's rent back to the
    market (the program refuses while any leaf is unpaid)."""
    pid = cfg.program_pk
    return [program.instruction(pid, "closeEpoch", {
        "config": cfg.program_config, "authority": cfg.market_pk,
        "payouts": program.payouts_address(pid, epoch),
        "payoutVault": program.payout_vault_address(pid, epoch),
        "tokenProgram": spl.TOKEN_PROGRAM_ID})]


def fee_instructions(cfg: ChainConfig, fee: int, root: str, job_count: int,
                     key: str) -> list[Instruction]:
    """Deposit account → treasury, the memo naming the receipts' root it is the fee of."""
    return [
        spl.transfer_checked(
            cfg.deposit_pk, cfg.mint_pk, cfg.treasury_pk, cfg.market_pk, fee, cfg.decimals
        ),
        spl.memo(fee_memo(root, job_count, key), [cfg.market_pk]),
    ]


@dataclass(frozen=True)
class PostedEpoch:
    """A ``Payouts`` account: what was posted and what has been claimed."""

    root: str
    total: int
    claimed: int
    leaf_count: int
    bitmap: bytes

    def is_claimed(self, index: int) -> bool:
        byte = index // 8
        return byte < len(self.bitmap) and bool(self.bitmap[byte] >> (index % 8) & 1)


async def read_epoch(ledger: Ledger, cfg: ChainConfig, epoch: int) -> PostedEpoch | None:
    account = await ledger.get_account(program.payouts_address(cfg.program_pk, epoch))
    if account is None or account.owner != cfg.program_pk:
        return None
    f = program.decode_account("Payouts", bytes(account.data))
    return PostedEpoch(f["root"].hex(), f["total"], f["claimed"], f["leafCount"], f["bitmap"])
