"""Anchors: a batch of receipts' Merkle root written to the chain in a memo, and read back.

An anchor moves no money; it fixes the receipts' root at a slot so anyone can later
prove a receipt was part of the batch. Anyone can write an anchor-looking memo, so the
reader accepts only well-formed ones from landed, successful transactions.
"""

from __future__ import annotations

from dataclasses import dataclass

from solders.instruction import Instruction
from solders.pubkey import Pubkey

from chain import spl
from chain.aidp.memo import AidpMemo, anchor_memo, parse_memo
from chain.ledger.base import Ledger

ROOT_HEX_LENGTH = 64  # a SHA-256 root


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
        if m is not None and _is_anchor(m):
            root, count = m.fields[0], m.fields[1]
            return Anchor(signature, tx.slot, tx.block_time, root, int(count), tx.account_keys[0])
    return None


def _is_anchor(m: AidpMemo) -> bool:
    """A v1 anchor memo with a 64-hex-digit root and a decimal count: a malformed one
    anchors nothing."""
    if m.kind != "anchor" or m.version != "v1" or len(m.fields) < 2:
        return False
    root, count = m.fields[0], m.fields[1]
    return len(root) == ROOT_HEX_LENGTH and _is_hex(root) and count.isdigit()


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True
