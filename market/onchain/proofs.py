"""A receipt's Merkle inclusion proof against the root anchored on chain.

Leaves are the anchor's receipt hashes sorted ascending, the order the anchoring task
built the tree in; ``protocol.merkle.verify_inclusion`` (or the explorer's JS) checks it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from market.errors import NotFound
from market.models import Anchor, Receipt
from protocol.merkle import inclusion_proof


def proof_view(session: Session, receipt_hash: str) -> dict[str, Any]:
    receipt_hash = receipt_hash.lower()
    row = session.execute(
        select(Receipt.anchor_id).where(Receipt.receipt_hash == receipt_hash)
    ).first()
    if row is None:
        raise NotFound(f"No receipt {receipt_hash!r}.", param="receipt_hash",
                       code="receipt_not_found")
    body: dict[str, Any] = {"receipt_hash": receipt_hash, "anchor": None, "proof": []}
    anchor = session.get(Anchor, row.anchor_id) if row.anchor_id is not None else None
    if anchor is None or not anchor.tx_signature:
        return body
    leaves = sorted(session.execute(
        select(Receipt.receipt_hash).where(Receipt.anchor_id == anchor.id)
    ).scalars())
    body["anchor"] = {"root": anchor.merkle_root, "tx_signature": anchor.tx_signature,
                      "slot": anchor.slot, "receipt_count": anchor.receipt_count}
    body["proof"] = [{"sibling": s.sibling, "side": s.side}
                     for s in inclusion_proof(leaves, leaves.index(receipt_hash))]
    return body
