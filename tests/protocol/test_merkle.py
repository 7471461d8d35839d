"""Merkle roots and inclusion proofs over receipt hashes."""

from __future__ import annotations

import hashlib

import pytest

from protocol.merkle import ProofStep, inclusion_proof, merkle_root, verify_inclusion


def leaves(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 33])
def test_every_leaf_proves_against_the_root(n: int) -> None:
    hashes = leaves(n)
    root = merkle_root(hashes)
    for i, leaf in enumerate(hashes):
        assert verify_inclusion(leaf, inclusion_proof(hashes, i), root)


def test_wrong_leaf_or_root_fails() -> None:
    hashes = leaves(6)
    root = merkle_root(hashes)
    proof = inclusion_proof(hashes, 2)
    assert not verify_inclusion(hashes[3], proof, root)
    assert not verify_inclusion(hashes[2], proof, merkle_root(leaves(7)))
    flipped = [ProofStep(s.sibling, "left" if s.side == "right" else "right") for s in proof]
    assert not verify_inclusion(hashes[2], flipped, root)


def test_order_matters_and_empty_is_rejected() -> None:
    hashes = leaves(4)
    assert merkle_root(hashes) != merkle_root(list(reversed(hashes)))
    with pytest.raises(ValueError):
        merkle_root([])
