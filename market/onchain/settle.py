"""Payout rounds, on-chain slashes and proof anchors, planned from the database.

* **Payout round** — settled receipts not yet in ``chain_payout_items`` are grouped per
  node (``chain.aidp.plan_round``): one transfer per node of the sum of its
  receipts' ``node_earning``, memo ``aidp:payout:v1:<root>:<count>:<key>`` where root is
  the Merkle root of the receipt hashes it pays, sorted ascending; plus one transfer of
  the round's market fees (the receipts' ``fee``) to the treasury. The receipts are
  linked to their payout row in the planning transaction, so no receipt is paid twice.
* **Slash** — each ``slash:<receipt>`` journal entry the verification worker wrote (DB
  side: buyer refunded, ``nodes.stake`` reduced) becomes one stake → treasury transfer
  signed by market + arbiter, keyed by the same ``slash:<receipt>`` key.
* **Anchor** — receipts without an anchor, their hashes sorted ascending (the order the
  explorer rebuilds proofs in), Merkle root in an ``aidp:anchor:v1:<root>:<count>``
  memo; the ``anchors`` row and ``receipts.anchor_id`` are written in the same commit
  that confirms the transaction.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from solders.instruction import Instruction
from solders.keypair import Keypair
from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from chain import aidp
from chain.ledger.base import TxStatus
from market.models import Anchor, ChainTransfer, LedgerEntry, Node, Receipt, utcnow
from market.onchain import transfers
from market.onchain.models import ChainAnchorItem, ChainPayoutItem
from market.onchain.runtime import ChainRuntime
from protocol.merkle import merkle_root

PAYOUT_KINDS = ("payout", "fee", "slash", "pull")


def _journal_once(session: Session, kind: str, key: str, amount: int, **refs: Any) -> None:
    if session.execute(select(LedgerEntry.id).where(LedgerEntry.idempotency_key == key)).first():
        return
    session.add(LedgerEntry(kind=kind, idempotency_key=key, amount=amount, **refs))


# ---- payouts -------------------------------------------------------------------------------


def _parse(row: ChainTransfer, kind: str) -> aidp.AidpMemo:
    memo = aidp.parse_memo(row.memo)
    if memo is None or memo.kind != kind:
        raise ValueError(f"chain transfer {row.idempotency_key}: unexpected memo {row.memo!r}")
    return memo


def _payout_of(row: ChainTransfer) -> aidp.NodePayout:
    root, count, key = _parse(row, "payout").fields
    return aidp.NodePayout(
        owner=key.split(".", 1)[1], amount=row.amount, root=root, count=int(count), key=key
    )


def _build_payout(
    rt: ChainRuntime, session: Session, row: ChainTransfer
) -> tuple[list[Instruction], list[Keypair]]:
    return aidp.payout_instructions(rt.cfg, _payout_of(row)), []


def _confirm_payout(rt: ChainRuntime, session: Session, row: ChainTransfer, st: TxStatus) -> None:
    node_id = session.execute(
        select(Node.id).where(Node.pubkey == _payout_of(row).owner)
    ).scalar_one_or_none()
    _journal_once(session, "payout", f"chain:{row.idempotency_key}", row.amount, node_id=node_id,
                  memo=f"on chain {row.signature}")


def _build_fee(
    rt: ChainRuntime, session: Session, row: ChainTransfer
) -> tuple[list[Instruction], list[Keypair]]:
    root, count, key = _parse(row, "fee").fields
    rnd = aidp.PayoutRound([], row.amount, root, int(count), key.removesuffix(".fee"))
    return aidp.fee_instructions(rt.cfg, rnd), []


def plan_payout_round(session: Session, rt: ChainRuntime, *, limit: int) -> list[int]:
    """Plan one round over up to ``limit`` settled, unpaid receipts; returns transfer ids."""
    rows = session.execute(
        select(Receipt.id, Receipt.receipt_hash, Receipt.node_earning, Receipt.fee, Node.pubkey)
        .join(Node, Node.id == Receipt.node_id)
        .where(
            Receipt.state == "settled",
            ~exists().where(ChainPayoutItem.receipt_id == Receipt.id),
        )
        .order_by(Receipt.state_changed_at, Receipt.id)
        .limit(limit)
    ).all()
    if not rows:
        return []
    rows = sorted(rows, key=lambda r: (r.pubkey, r.receipt_hash))
    round_key = f"r{utcnow():%Y%m%d%H%M%S}{secrets.token_hex(4)}"
    rnd = aidp.plan_round(
        [(r.pubkey, r.receipt_hash, r.node_earning) for r in rows], 0, round_key
    )
    rnd = dataclasses.replace(rnd, fee=sum(r.fee for r in rows))
    cfg = rt.cfg
    by_owner: dict[str, int] = {}
    ids: list[int] = []
    for p in rnd.payouts:
        memo = aidp.payout_memo(p.root, p.count, p.key)
        row = transfers.plan(
            session, kind="payout", key=f"payout:{p.key}", amount=p.amount,
            from_address=cfg.deposit, to_address=rt.payout_account(p.owner), memo=memo,
            # nothing to move (a free node): the receipts are still marked paid
            state="planned" if p.amount > 0 else "confirmed",
        )
        by_owner[p.owner] = row.id
        if p.amount > 0:
            ids.append(row.id)
    for r in rows:
        session.add(ChainPayoutItem(receipt_id=r.id, transfer_id=by_owner[r.pubkey]))
    if rnd.fee > 0:
        fee = transfers.plan(
            session, kind="fee", key=f"fee:{round_key}", amount=rnd.fee,
            from_address=cfg.deposit, to_address=cfg.treasury,
            memo=aidp.fee_memo(rnd.fee_root, rnd.job_count, round_key + ".fee"),
        )
        ids.append(fee.id)
    session.flush()
    return ids


# ---- slashes --------------------------------------------------------------------------------


def _stake_of_receipt(rt: ChainRuntime, session: Session, receipt_id: str) -> aidp.Stake:
    pubkey = session.execute(
        select(Node.pubkey)
        .join(Receipt, Receipt.node_id == Node.id)
        .where(Receipt.id == receipt_id)
    ).scalar_one()
    return rt.stake_of(pubkey)


def _build_slash(
    rt: ChainRuntime, session: Session, row: ChainTransfer
) -> tuple[list[Instruction], list[Keypair]]:
    (receipt_id,) = _parse(row, "slash").fields
    stake = _stake_of_receipt(rt, session, receipt_id)
    return aidp.slash_instructions(rt.cfg, stake, row.amount, receipt_id), [rt.arbiter]


def unplanned_slashes(session: Session) -> list[tuple[str, str, int, str]]:
    """(journal key, receipt id, amount, node pubkey) of DB slashes with no chain row yet."""
    return [
        tuple(r)  # type: ignore[misc]
        for r in session.execute(
            select(LedgerEntry.idempotency_key, LedgerEntry.receipt_id, LedgerEntry.amount,
                   Node.pubkey)
            .join(Node, Node.id == LedgerEntry.node_id)
            .where(
                LedgerEntry.kind == "slash",
                LedgerEntry.amount > 0,
                ~exists().where(ChainTransfer.idempotency_key == LedgerEntry.idempotency_key),
            )
            .order_by(LedgerEntry.id)
        ).all()
    ]


async def plan_slashes(rt: ChainRuntime, sessions: sessionmaker[Session]) -> list[int]:
    with sessions() as session:
        todo = unplanned_slashes(session)
    if not todo:
        return []
    on_chain: dict[str, int] = {}
    for _key, _rid, _amount, pubkey in todo:
        if pubkey not in on_chain:
            on_chain[pubkey] = await rt.ledger.token_balance(rt.stake_of(pubkey).account_pk)
    ids = []
    with sessions.begin() as session:
        # slashes planned earlier that have not landed will still take their share: what
        # they take is not there for these (else a transfer would be planned that the stake
        # cannot cover, and retried forever)
        in_flight = dict(session.execute(
            select(ChainTransfer.from_address, func.sum(ChainTransfer.amount))
            .where(ChainTransfer.kind == "slash", ChainTransfer.state.in_(transfers.ACTIVE))
            .group_by(ChainTransfer.from_address)
        ).all())
        for pubkey, balance in list(on_chain.items()):
            reserved = int(in_flight.get(rt.stake_of(pubkey).account) or 0)
            on_chain[pubkey] = max(0, balance - reserved)
        for key, receipt_id, amount, pubkey in todo:
            stake = rt.stake_of(pubkey)
            # never more than the stake holds (the DB capped it at nodes.stake already)
            take = min(amount, on_chain[pubkey])
            on_chain[pubkey] -= take
            row = transfers.plan(
                session, kind="slash", key=key, amount=take,
                from_address=stake.account, to_address=rt.cfg.treasury,
                memo=aidp.keyed_memo("slash", receipt_id),
                state="planned" if take > 0 else "confirmed",
            )
            if take > 0:
                ids.append(row.id)
    return ids


# ---- anchors --------------------------------------------------------------------------------


def _build_anchor(
    rt: ChainRuntime, session: Session, row: ChainTransfer
) -> tuple[list[Instruction], list[Keypair]]:
    root, count = _parse(row, "anchor").fields
    return aidp.anchor_instructions(rt.market.pubkey(), root, int(count)), []


def _confirm_anchor(rt: ChainRuntime, session: Session, row: ChainTransfer, st: TxStatus) -> None:
    root, count = _parse(row, "anchor").fields
    anchor = Anchor(merkle_root=root, receipt_count=int(count), tx_signature=row.signature,
                    slot=st.slot)
    session.add(anchor)
    session.flush()
    session.execute(
        update(Receipt)
        .where(Receipt.id.in_(
            select(ChainAnchorItem.receipt_id).where(ChainAnchorItem.transfer_id == row.id)
        ))
        .values(anchor_id=anchor.id)
        .execution_options(synchronize_session=False)
    )


def plan_anchor(session: Session, rt: ChainRuntime, *, limit: int) -> int | None:
    """Reserve up to ``limit`` unanchored receipts (oldest first) under one anchor row."""
    rows = session.execute(
        select(Receipt.id, Receipt.receipt_hash)
        .where(
            Receipt.anchor_id.is_(None),
            ~exists().where(ChainAnchorItem.receipt_id == Receipt.id),
        )
        .order_by(Receipt.created_at, Receipt.id)
        .limit(limit)
    ).all()
    if not rows:
        return None
    hashes = sorted(r.receipt_hash for r in rows)
    root = merkle_root(hashes)
    row = transfers.plan(
        session, kind="anchor", key=f"anchor:{root}", amount=0,
        from_address=str(rt.market.pubkey()), to_address=None,
        memo=aidp.anchor_memo(root, len(hashes)),
    )
    session.add_all(ChainAnchorItem(receipt_id=r.id, transfer_id=row.id) for r in rows)
    session.flush()
    return row.id


# ---- queries for status / reconcile ----------------------------------------------------------


def unpaid_settled(session: Session) -> tuple[int, int]:
    """(count, node earnings) of settled receipts not yet in a payout round."""
    count, total = session.execute(
        select(func.count(Receipt.id), func.coalesce(func.sum(Receipt.node_earning), 0)).where(
            Receipt.state == "settled",
            ~exists().where(ChainPayoutItem.receipt_id == Receipt.id),
        )
    ).one()
    return int(count), int(total)


#: the transfers this module plans, for ``market.onchain.handlers``
HANDLERS: transfers.Handlers = {
    "payout": transfers.Handler(_build_payout, _confirm_payout),
    "fee": transfers.Handler(_build_fee),
    "slash": transfers.Handler(_build_slash),
    "anchor": transfers.Handler(_build_anchor, _confirm_anchor),
}
