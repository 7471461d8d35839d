"""Binary Merkle trees over receipt hashes, with inclusion proofs.

Leaves and inner nodes are hashed with different prefixes (0x00, 0x01, as in
RFC 6962), so an inner node can never be passed off as a leaf. An odd node at the
end of a level is carried up unchanged. The explorer's JavaScript mirrors this.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"


def hash_leaf(receipt_hash_hex: str) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + bytes.fromhex(receipt_hash_hex)).digest()


def hash_node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


@dataclass(frozen=True)
class ProofStep:
    sibling: str  # hex
    side: Literal["left", "right"]  # where the sibling sits


def _levels(leaf_hashes: list[str]) -> list[list[bytes]]:
    if not leaf_hashes:
        raise ValueError("a Merkle tree needs at least one leaf")
    level = [hash_leaf(h) for h in leaf_hashes]
    levels = [level]
    while len(level) > 1:
        nxt = [hash_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        levels.append(nxt)
        level = nxt
    return levels


def merkle_root(leaf_hashes: list[str]) -> str:
    """Hex root over receipt hashes given in anchoring order."""
    return _levels(leaf_hashes)[-1][0].hex()


def inclusion_proof(leaf_hashes: list[str], index: int) -> list[ProofStep]:
    """Sibling path from leaf ``index`` to the root."""
    levels = _levels(leaf_hashes)
    if not 0 <= index < len(leaf_hashes):
        raise IndexError(index)
    proof: list[ProofStep] = []
    for level in levels[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            side: Literal["left", "right"] = "left" if sibling < index else "right"
            proof.append(ProofStep(sibling=level[sibling].hex(), side=side))
        index //= 2
    return proof


def verify_inclusion(receipt_hash_hex: str, proof: list[ProofStep], root_hex: str) -> bool:
    node = hash_leaf(receipt_hash_hex)
    for step in proof:
        sibling = bytes.fromhex(step.sibling)
        node = hash_node(sibling, node) if step.side == "left" else hash_node(node, sibling)
    return node.hex() == root_hex
