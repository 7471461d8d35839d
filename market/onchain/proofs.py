"""Merkle proofs anyone can check against roots the program holds.

* a receipt's inclusion proof against its anchor: leaves are the anchor's receipt hashes
  sorted ascending, the order the anchoring task built the tree in;
  ``protocol.merkle.verify_inclusion`` (or the explorer's JS) checks it;
* a node's payout leaves with their proofs: what ``claim`` needs, so a node can be paid
  without the market sending anything (``aidp-node claim``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from market.errors import NotFound
from market.models import Anchor, ChainTransfer, Receipt
from market.onchain.models import ChainPayoutLeaf
from market.onchain.settle import claim_key, load_epoch
from protocol.merkle import inclusion_proof

#: the most payout leaves one answer lists (oldest unclaimed first)
MAX_PAYOUT_LEAVES = 100


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


def payouts_view(session: Session, node: str, *, limit: int = MAX_PAYOUT_LEAVES) -> dict[str, Any]:
    """The node's payout leaves not yet claimed (oldest first), each with its proof and
    the state of the market's own claim for it."""
    leaves = session.execute(
        select(ChainPayoutLeaf).where(ChainPayoutLeaf.node == node)
        .order_by(ChainPayoutLeaf.epoch, ChainPayoutLeaf.leaf_index)).scalars().all()
    keys = [claim_key(x.epoch, x.leaf_index) for x in leaves]
    states = dict(session.execute(select(ChainTransfer.idempotency_key, ChainTransfer.state)
                                  .where(ChainTransfer.idempotency_key.in_(keys))).all())
    out: list[dict[str, Any]] = []
    epochs: dict[int, Any] = {}
    for leaf, key in zip(leaves, keys, strict=True):
        state = states.get(key)
        if state is None or state in ("confirmed", "cancelled"):
            continue  # epoch not funded yet, or already paid
        if leaf.epoch not in epochs:
            epochs[leaf.epoch] = load_epoch(session, leaf.epoch)
        proof = epochs[leaf.epoch].proof(leaf.leaf_index)
        out.append({"epoch": leaf.epoch, "index": leaf.leaf_index, "amount": leaf.amount,
                    "claim_state": state,
                    "proof": [{"sibling": p.sibling, "side": p.side} for p in proof]})
        if len(out) >= limit:
            break
    return {"node": node, "unclaimed": out}
