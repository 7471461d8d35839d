"""Anchors: a batch of receipts' Merkle root stored by the ``aidp_market`` program, with a
memo beside it for explorers, and read back.

An anchor moves no money; it fixes the receipts' root at a slot so anyone can later
prove a receipt was part of the batch, and the program accepts a slash case only for a
receipt in a root it stored (a ``ReceiptAnchor`` PDA only the config's authority
writes, once per root). Anyone can write an anchor-looking memo, so the memo reader
accepts only well-formed ones from landed, successful transactions, and
``read_anchor_account`` asks the program.
"""

from __future__ import annotations

from dataclasses import dataclass

from solders.instruction import Instruction
from solders.pubkey import Pubkey

from chain import spl
from chain.aidp import program
from chain.aidp.config import ChainConfig
from chain.aidp.memo import AidpMemo, anchor_memo, parse_memo
from chain.ledger.base import Ledger

ROOT_HEX_LENGTH = 64  # a SHA-256 root


def anchor_instructions(cfg: ChainConfig, root_hex: str, count: int) -> list[Instruction]:
    """``anchor_root`` (the program's record) and the memo explorers read."""
    root = bytes.fromhex(root_hex)
    stored = program.instruction(cfg.program_pk, "anchorRoot", {
        "config": cfg.program_config, "authority": cfg.market_pk,
        "anchor": program.anchor_address(cfg.program_pk, root),
        "systemProgram": program.SYSTEM_PROGRAM_ID}, root=root, leafCount=count)
    return [stored, anchor_memo_instruction(cfg.market_pk, root_hex, count)]


def anchor_memo_instruction(signer: Pubkey, root_hex: str, count: int) -> Instruction:
    """The memo alone, signed by ``signer``: what explorers (and ``read_anchor``) read."""
    return spl.memo(anchor_memo(root_hex, count), [signer])


async def read_anchor_account(ledger: Ledger, cfg: ChainConfig,
                              root_hex: str) -> tuple[int, int] | None:
    """(leaf count, slot) of a root the program anchored; None when it did not."""
    address = program.anchor_address(cfg.program_pk, bytes.fromhex(root_hex))
    account = await ledger.get_account(address)
    if account is None or account.owner != cfg.program_pk:
        return None
    fields = program.decode_account("ReceiptAnchor", bytes(account.data))
    return int(fields["leafCount"]), int(fields["slot"])


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
