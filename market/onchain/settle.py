"""Payout epochs, slashes on evidence and receipt anchors, planned from the database and
carried out through the ``aidp_market`` program.

* **Payout epoch** — settled receipts not yet in ``chain_payout_items`` are summed per
  node into the leaves of one epoch (``chain.aidp.plan_epoch``); one ``payout`` row posts
  the root and moves the total from the deposit account into the epoch's vault
  (``post_payouts``); the program's epoch number is that row's id. Once it lands, one
  ``claim`` row per leaf pays the node (the program checks the leaf against the root; a
  node may also claim by itself, which the market then finds on chain and records). The
  round's market fees go to the treasury in one ``fee`` row. The receipts are linked to
  their epoch in the planning transaction, so no receipt is paid twice.
* **Slash** — each ``slash:<receipt>`` journal entry the verification worker wrote (DB
  side: buyer refunded, ``nodes.stake`` reduced) needs on chain: the receipt anchored,
  verdict signatures of a quorum of the verifier set (``market.onchain.verdicts``), a
  ``case`` row (``open_case``: the node's own signature on the receipt and its Merkle
  proof) and, once the case is open, the ``slash`` row keyed by the journal key. The
  buyer's refund is what it paid, which never left the deposit account (a slashed
  receipt is never paid), so the verdict refunds 0 and the stake taken goes to the
  treasury.
* **Anchor** — receipts without an anchor, their hashes sorted ascending (the order the
  explorer rebuilds proofs in): the program stores the root (``anchor_root``) and a memo
  names it for explorers; the ``anchors`` row and ``receipts.anchor_id`` are written in
  the same commit that confirms the transaction.
"""

from __future__ import annotations

import secrets
from typing import Any

from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature
from sqlalchemy import String, cast, exists, func, literal, select, update
from sqlalchemy.orm import Session, sessionmaker

from chain import aidp
from chain.ledger.base import TxStatus
from market.models import Anchor, ChainTransfer, LedgerEntry, Node, Receipt, utcnow
from market.onchain import transfers
from market.onchain.models import (
    ChainAnchorItem,
    ChainPayoutEpoch,
    ChainPayoutItem,
    ChainPayoutLeaf,
    ChainVerdict,
)
from market.onchain.runtime import ChainRuntime
from protocol.merkle import inclusion_proof, merkle_root

PAYOUT_KINDS = ("payout", "claim", "close", "fee", "case", "slash", "pull")


def _journal_once(session: Session, kind: str, key: str, amount: int, **refs: Any) -> None:
    if session.execute(select(LedgerEntry.id).where(LedgerEntry.idempotency_key == key)).first():
        return
    session.add(LedgerEntry(kind=kind, idempotency_key=key, amount=amount, **refs))


def _parse(row: ChainTransfer, kind: str) -> aidp.AidpMemo:
    memo = aidp.parse_memo(row.memo)
    if memo is None or memo.kind != kind:
        raise ValueError(f"chain transfer {row.idempotency_key}: unexpected memo {row.memo!r}")
    return memo


# ---- payout epochs ---------------------------------------------------------------------------


def load_epoch(session: Session, epoch: int) -> aidp.PayoutEpoch:
    leaves = session.execute(
        select(ChainPayoutLeaf).where(ChainPayoutLeaf.epoch == epoch)
        .order_by(ChainPayoutLeaf.leaf_index)
    ).scalars().all()
    return aidp.PayoutEpoch(epoch, [aidp.PayoutLeaf(x.leaf_index, x.node, x.amount)
                                    for x in leaves])


def _build_post(rt: ChainRuntime, session: Session,
                row: ChainTransfer) -> tuple[list[Instruction], list[Keypair]]:
    return aidp.post_instructions(rt.cfg, load_epoch(session, row.id)), []


def _confirm_post(rt: ChainRuntime, session: Session, row: ChainTransfer, st: TxStatus) -> None:
    """The epoch is funded: one claim per leaf, planned in this same commit."""
    epoch = load_epoch(session, row.id)
    vault = str(aidp.program.payout_vault_address(rt.cfg.program_pk, row.id))
    for leaf in epoch.leaves:
        transfers.plan(session, kind="claim", key=claim_key(row.id, leaf.index),
                       amount=leaf.amount, from_address=vault,
                       to_address=rt.payout_account(leaf.node), memo=None)


def claim_key(epoch: int, index: int) -> str:
    return f"claim:{epoch}:{index}"


def _claim_leaf(session: Session, row: ChainTransfer) -> tuple[int, aidp.PayoutLeaf]:
    _, epoch, index = row.idempotency_key.split(":")
    leaf = session.get(ChainPayoutLeaf, (int(epoch), int(index)))
    if leaf is None:
        raise LookupError(f"{row.idempotency_key}: no such payout leaf")
    return int(epoch), aidp.PayoutLeaf(leaf.leaf_index, leaf.node, leaf.amount)


def _build_claim(rt: ChainRuntime, session: Session,
                 row: ChainTransfer) -> tuple[list[Instruction], list[Keypair]]:
    epoch, leaf = _claim_leaf(session, row)
    proof = load_epoch(session, epoch).proof(leaf.index)
    return aidp.claim_instructions(rt.cfg, epoch, leaf, proof, rt.cfg.market_pk), []


def _confirm_claim(rt: ChainRuntime, session: Session, row: ChainTransfer,
                   st: TxStatus | None) -> None:
    _epoch, leaf = _claim_leaf(session, row)
    node_id = session.execute(select(Node.id).where(Node.pubkey == leaf.node)).scalar_one_or_none()
    _journal_once(session, "payout", f"chain:{row.idempotency_key}", row.amount,
                  node_id=node_id, memo=f"claimed on chain {row.signature or '(by the node)'}")


async def record_claims_made_elsewhere(rt: ChainRuntime, sessions: sessionmaker[Session]) -> int:
    """Claims a node (or anyone) submitted itself: the program's bitmap says the leaf is
    paid, so the market's own claim row is confirmed instead of sent (it would fail). The
    bitmap pays a leaf once whoever sent the claim, so a row of ours in flight (perhaps
    refused at preflight for that very reason) is confirmed the same way."""
    with sessions() as session:
        rows = session.execute(select(ChainTransfer).where(
            ChainTransfer.kind == "claim",
            ChainTransfer.state.in_(transfers.ACTIVE))).scalars().all()
        session.expunge_all()
    posted: dict[int, aidp.PostedEpoch | None] = {}
    done = 0
    for row in rows:
        _, epoch, index = row.idempotency_key.split(":")
        if int(epoch) not in posted:
            posted[int(epoch)] = await aidp.read_epoch(rt.ledger, rt.cfg, int(epoch))
        on_chain = posted[int(epoch)]
        if on_chain is not None and on_chain.is_claimed(int(index)):
            with sessions.begin() as session:
                if transfers.confirm_elsewhere(session, row, transfers.ACTIVE):
                    _confirm_claim(rt, session, row, None)
                    done += 1
    return done


def _build_fee(rt: ChainRuntime, session: Session,
               row: ChainTransfer) -> tuple[list[Instruction], list[Keypair]]:
    root, count, key = _parse(row, "fee").fields
    return aidp.fee_instructions(rt.cfg, row.amount, root, int(count), key), []


def plan_payout_round(session: Session, rt: ChainRuntime, *, limit: int) -> list[int]:
    """Plan one epoch over up to ``limit`` settled, unpaid receipts; returns transfer ids."""
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
    round_key = f"r{utcnow():%Y%m%d%H%M%S}{secrets.token_hex(4)}"
    cfg, ids = rt.cfg, []
    leaves = aidp.plan_epoch(0, [(r.pubkey, r.node_earning) for r in rows]).leaves
    # nothing owed (free nodes): the receipts are still marked paid, under a row that
    # moves nothing
    post = transfers.plan(
        session, kind="payout", key=f"payout:{round_key}", amount=sum(x.amount for x in leaves),
        from_address=cfg.deposit, to_address=None, memo=None,
        state="planned" if leaves else "confirmed")
    if leaves:
        epoch = aidp.PayoutEpoch(post.id, leaves)
        session.add(ChainPayoutEpoch(epoch=post.id, root=epoch.root, total=epoch.total,
                                     leaf_count=len(leaves)))
        session.flush()
        session.add_all(ChainPayoutLeaf(epoch=post.id, leaf_index=x.index, node=x.node,
                                        amount=x.amount) for x in leaves)
        post.to_address = str(aidp.program.payout_vault_address(cfg.program_pk, post.id))
        ids.append(post.id)
    session.add_all(ChainPayoutItem(receipt_id=r.id, transfer_id=post.id) for r in rows)
    fee = sum(r.fee for r in rows)
    if fee > 0:
        hashes = sorted(r.receipt_hash for r in rows)
        row = transfers.plan(
            session, kind="fee", key=f"fee:{round_key}", amount=fee,
            from_address=cfg.deposit, to_address=cfg.treasury,
            memo=aidp.fee_memo(merkle_root(hashes), len(hashes), round_key + ".fee"),
        )
        ids.append(row.id)
    session.flush()
    return ids


def active_claims(session: Session) -> list[int]:
    return transfers.active_ids(session, ["claim"])


def close_key(epoch: int) -> str:
    return f"close:{epoch}"


def plan_closes(session: Session, rt: ChainRuntime) -> list[int]:
    """A ``close`` row for each epoch whose every leaf's claim is confirmed: the program
    then returns the epoch's rent (and refuses while a leaf is unpaid)."""
    epoch_text = cast(ChainPayoutEpoch.epoch, String)
    confirmed = (
        select(func.count(ChainTransfer.id))
        .where(ChainTransfer.kind == "claim", ChainTransfer.state == "confirmed",
               ChainTransfer.idempotency_key.like(literal("claim:") + epoch_text + ":%"))
        .scalar_subquery())
    epochs = session.execute(
        select(ChainPayoutEpoch.epoch).where(
            confirmed == ChainPayoutEpoch.leaf_count,
            ~exists().where(ChainTransfer.idempotency_key == literal("close:") + epoch_text))
        .order_by(ChainPayoutEpoch.epoch).limit(100)).scalars().all()
    return [transfers.plan(session, kind="close", key=close_key(epoch), amount=0,
                           from_address=None, to_address=None, memo=None).id
            for epoch in epochs]


def closed_epochs(session: Session) -> set[int]:
    """Epochs whose accounts the program closed (so every leaf of them was paid)."""
    return {int(key.split(":")[1]) for key in session.execute(
        select(ChainTransfer.idempotency_key).where(
            ChainTransfer.kind == "close", ChainTransfer.state == "confirmed")).scalars()}


def _build_close(rt: ChainRuntime, session: Session,
                 row: ChainTransfer) -> tuple[list[Instruction], list[Keypair]]:
    return aidp.close_instructions(rt.cfg, int(row.idempotency_key.split(":")[1])), []


# ---- slashes --------------------------------------------------------------------------------


def case_key(receipt_id: str) -> str:
    return f"case:{receipt_id}"


def _receipt_id(row: ChainTransfer) -> str:
    return row.idempotency_key.split(":", 1)[1]


def evidence_of(session: Session, receipt_id: str) -> aidp.Evidence:
    """The node's signed receipt and its proof in the anchor that holds it."""
    receipt, pubkey = session.execute(
        select(Receipt, Node.pubkey).join(Node, Node.id == Receipt.node_id)
        .where(Receipt.id == receipt_id)).one()
    if receipt.anchor_id is None:
        raise LookupError(f"receipt {receipt_id} is not anchored yet")
    anchor = session.get(Anchor, receipt.anchor_id)
    hashes = sorted(session.execute(
        select(Receipt.receipt_hash).where(Receipt.anchor_id == receipt.anchor_id)).scalars())
    return aidp.Evidence(
        receipt_hash=bytes.fromhex(receipt.receipt_hash), node=Pubkey.from_string(pubkey),
        node_signature=Signature.from_string(receipt.signature),
        root=bytes.fromhex(anchor.merkle_root),
        proof=inclusion_proof(hashes, hashes.index(receipt.receipt_hash)))


def _build_case(rt: ChainRuntime, session: Session,
                row: ChainTransfer) -> tuple[list[Instruction], list[Keypair]]:
    return aidp.open_case_instructions(rt.cfg, evidence_of(session, _receipt_id(row))), []


def verdict_rows(session: Session, receipt_id: str) -> list[ChainVerdict]:
    return list(session.execute(select(ChainVerdict).where(ChainVerdict.receipt_id == receipt_id)
                                .order_by(ChainVerdict.id)).scalars())


def agreed_verdict(session: Session, receipt_id: str,
                   quorum: int) -> tuple[aidp.Verdict, list[tuple[Pubkey, Signature]]] | None:
    """The verdict at least ``quorum`` verifiers signed identically, with ``quorum`` of
    their signatures (no more: the transaction stays small); None while short."""
    pubkey, receipt_hash = session.execute(
        select(Node.pubkey, Receipt.receipt_hash).join(Receipt, Receipt.node_id == Node.id)
        .where(Receipt.id == receipt_id)).one()
    groups: dict[tuple[int, int, str, int], list[ChainVerdict]] = {}
    for v in verdict_rows(session, receipt_id):
        groups.setdefault((v.amount, v.refund, v.refund_account, v.nonce), []).append(v)
    for (amount, refund, account, nonce), rows in groups.items():
        if len(rows) >= quorum:
            verdict = aidp.Verdict(bytes.fromhex(receipt_hash), Pubkey.from_string(pubkey),
                                   amount, refund, Pubkey.from_string(account), nonce)
            return verdict, [(Pubkey.from_string(v.verifier), Signature.from_string(v.signature))
                             for v in rows[:quorum]]
    return None


def _build_slash(rt: ChainRuntime, session: Session,
                 row: ChainTransfer) -> tuple[list[Instruction], list[Keypair]]:
    agreed = agreed_verdict(session, _receipt_id(row), rt.settings.chain.verifier_quorum)
    if agreed is None:
        raise LookupError(f"{row.idempotency_key}: the verdict lost its quorum")
    return aidp.slash_instructions(rt.cfg, *agreed), []


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


async def plan_cases(rt: ChainRuntime, sessions: sessionmaker[Session],
                     quorum: int) -> list[int]:
    """Open a case for each DB slash whose receipt is anchored and whose verdict has its
    quorum; a node with nothing staked on chain has nothing to take (recorded as such)."""
    with sessions() as session:
        todo = unplanned_slashes(session)
    ids = []
    for key, receipt_id, _amount, pubkey in todo:
        info = await aidp.read_stake(rt.ledger, rt.cfg, pubkey)
        with sessions.begin() as session:
            if info is None or info.staked == 0:
                transfers.plan(session, kind="slash", key=key, amount=0,
                               from_address=rt.stake_of(pubkey).vault,
                               to_address=rt.cfg.treasury, memo=None, state="confirmed")
                continue
            anchored = session.execute(select(Receipt.anchor_id).where(
                Receipt.id == receipt_id)).scalar_one()
            if anchored is None or agreed_verdict(session, receipt_id, quorum) is None:
                continue  # waits for its anchor and its verdict's quorum
            row = transfers.plan(session, kind="case", key=case_key(receipt_id), amount=0,
                                 from_address=None, to_address=rt.stake_of(pubkey).address,
                                 memo=None)
            if row.state != "confirmed":
                ids.append(row.id)
    return ids


def _unlanded_slashes(session: Session, vault: str) -> int:
    """What slash rows already planned on this vault will take when they land."""
    return int(session.execute(
        select(func.coalesce(func.sum(ChainTransfer.amount), 0)).where(
            ChainTransfer.kind == "slash", ChainTransfer.from_address == vault,
            ChainTransfer.state.in_(transfers.ACTIVE))).scalar_one())


async def plan_slashes(rt: ChainRuntime, sessions: sessionmaker[Session],
                       quorum: int) -> list[int]:
    """A slash row for each DB slash whose case is open on chain (its row confirmed), for
    the agreed verdict's amount or what the stake holds after the slashes still on their
    way, if less (the program takes no more than the stake holds)."""
    with sessions() as session:
        opened = [key.split(":", 1)[1] for key in session.execute(
            select(ChainTransfer.idempotency_key)
            .where(ChainTransfer.kind == "case", ChainTransfer.state == "confirmed")).scalars()]
        planned = set(session.execute(select(ChainTransfer.idempotency_key).where(
            ChainTransfer.idempotency_key.in_([f"slash:{r}" for r in opened]))).scalars())
    ids = []
    for receipt_id in opened:
        if f"slash:{receipt_id}" in planned:
            continue
        with sessions() as session:
            agreed = agreed_verdict(session, receipt_id, quorum)
        if agreed is None:
            continue
        verdict, _ = agreed
        info = await aidp.read_stake(rt.ledger, rt.cfg, verdict.node)
        vault = rt.stake_of(verdict.node).vault
        with sessions.begin() as session:
            left = (info.staked if info else 0) - _unlanded_slashes(session, vault)
            amount = max(0, min(verdict.amount, left))
            row = transfers.plan(  # nothing left to take: recorded, not sent
                session, kind="slash", key=f"slash:{receipt_id}", amount=amount,
                from_address=vault, to_address=rt.cfg.treasury, memo=None,
                state="planned" if amount else "confirmed")
            if row.state != "confirmed":
                ids.append(row.id)
    return ids


# ---- anchors --------------------------------------------------------------------------------


def _build_anchor(
    rt: ChainRuntime, session: Session, row: ChainTransfer
) -> tuple[list[Instruction], list[Keypair]]:
    root, count = _parse(row, "anchor").fields
    return aidp.anchor_instructions(rt.cfg, root, int(count)), []


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
    "payout": transfers.Handler(_build_post, _confirm_post),
    "claim": transfers.Handler(_build_claim, _confirm_claim),
    "close": transfers.Handler(_build_close),
    "fee": transfers.Handler(_build_fee),
    "case": transfers.Handler(_build_case),
    "slash": transfers.Handler(_build_slash),
    "anchor": transfers.Handler(_build_anchor, _confirm_anchor),
}
