"""Read-only queries behind the explorer pages (async sessions, bounded results)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, Select, String, cast, func, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, defer, selectinload

from market.models import Anchor, ChainTransfer, Job, Node, Receipt, ReceiptEvent
from market.onchain.models import ChainPayoutEpoch, ChainPayoutLeaf, ChainVerdict
from market.onchain.settle import case_key, claim_key, close_key, load_epoch
from protocol.merkle import ProofStep, inclusion_proof, merkle_root

PAGE_SIZE = 25
T = TypeVar("T")


@dataclass
class Page(Generic[T]):
    items: list[T]
    number: int
    has_next: bool


# past this the offset would overflow what a database accepts; nobody pages that far
MAX_PAGE = 100_000


async def paginate(session: AsyncSession, query: Select[Any], number: int) -> Page[Any]:
    """One page of ``query``; fetches one extra row to know whether another page exists."""
    number = min(max(number, 1), MAX_PAGE)
    rows = (await session.execute(query.limit(PAGE_SIZE + 1).offset((number - 1) * PAGE_SIZE))).all()
    items = [row[0] if len(row) == 1 else tuple(row) for row in rows[:PAGE_SIZE]]
    return Page(items=items, number=number, has_next=len(rows) > PAGE_SIZE)


def receipts_query() -> Select[Any]:
    """Receipts for the list pages, without their outputs (an embedding job's vectors are
    megabytes; no list shows them)."""
    return select(Receipt, Node.pubkey, Job.model).options(defer(Receipt.output_text)).join(
        Node, Receipt.node_id == Node.id).join(
        Job, Receipt.job_id == Job.id
    ).order_by(Receipt.created_at.desc(), Receipt.id.desc())


async def overview_counts(session: AsyncSession) -> dict[str, int]:
    states = dict(
        (await session.execute(select(Receipt.state, func.count()).group_by(Receipt.state))).all()
    )
    return {
        "jobs": await session.scalar(select(func.count()).select_from(Job)) or 0,
        "pending": states.get("pending", 0) + states.get("verifying", 0),
        "settled": states.get("settled", 0),
        "slashed": states.get("slashed", 0),
        "anchored": await session.scalar(
            select(func.count()).select_from(Receipt).where(Receipt.anchor_id.is_not(None))
        )
        or 0,
        "settled_units": await session.scalar(
            select(func.coalesce(func.sum(Receipt.node_earning), 0)).where(Receipt.state == "settled")
        )
        or 0,
    }


async def jobs_per_minute(session: AsyncSession, minutes: int) -> tuple[list[float], list[str]]:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    start = now - timedelta(minutes=minutes - 1)
    stamps = (await session.scalars(select(Job.created_at).where(Job.created_at >= start))).all()
    counts = Counter(stamp.replace(second=0, microsecond=0) for stamp in stamps)
    buckets = [start + timedelta(minutes=i) for i in range(minutes)]
    return [float(counts.get(b, 0)) for b in buckets], [b.strftime("%H:%M") for b in buckets]


async def node_speeds(session: AsyncSession, limit: int = 12) -> tuple[list[float], list[str]]:
    rows = (
        await session.execute(
            select(Node.pubkey, Node.tokens_per_s)
            .where(Node.tokens_per_s.is_not(None))
            .order_by(Node.tokens_per_s.desc())
            .limit(limit)
        )
    ).all()
    return [round(float(speed), 1) for _, speed in rows], [pubkey[:8] for pubkey, _ in rows]


async def receipt_by_hash(session: AsyncSession, receipt_hash: str) -> Receipt | None:
    return await session.scalar(
        select(Receipt).options(selectinload(Receipt.node)).where(Receipt.receipt_hash == receipt_hash)
    )


async def receipt_events(session: AsyncSession, receipt_id: str) -> list[ReceiptEvent]:
    query = select(ReceiptEvent).where(ReceiptEvent.receipt_id == receipt_id).order_by(ReceiptEvent.id)
    return list((await session.scalars(query)).all())


async def job_with_receipts(session: AsyncSession, job_id: str) -> Job | None:
    return await session.scalar(
        select(Job)
        .options(selectinload(Job.receipts).selectinload(Receipt.node))
        .where(Job.id == job_id)
    )


async def node_by_ref(session: AsyncSession, ref: str) -> Node | None:
    return await session.scalar(
        select(Node).options(selectinload(Node.models)).where(or_(Node.id == ref, Node.pubkey == ref))
    )


# ---- payout epochs -----------------------------------------------------------------------


def epochs_query() -> Select[Any]:
    """Epochs with the ``payout`` row that posts them (its id is the program's epoch)."""
    return (
        select(ChainPayoutEpoch, ChainTransfer)
        .join(ChainTransfer, ChainTransfer.id == ChainPayoutEpoch.epoch)
        .order_by(ChainPayoutEpoch.epoch.desc())
    )


def _claim_key_of_leaf() -> ColumnElement[str]:
    """``claim:<epoch>:<index>`` built in SQL, so claims join their leaves through the
    unique index on the key instead of a prefix scan of every transfer."""
    return (literal("claim:") + cast(ChainPayoutLeaf.epoch, String) + literal(":")
            + cast(ChainPayoutLeaf.leaf_index, String))


def claimed_counts_query(epochs: list[int]) -> Select[Any]:
    return (
        select(ChainPayoutLeaf.epoch, func.count())
        .join(ChainTransfer, ChainTransfer.idempotency_key == _claim_key_of_leaf())
        .where(ChainPayoutLeaf.epoch.in_(epochs), ChainTransfer.kind == "claim",
               ChainTransfer.state == "confirmed")
        .group_by(ChainPayoutLeaf.epoch)
    )


async def claimed_counts(session: AsyncSession, epochs: list[int]) -> dict[int, int]:
    if not epochs:
        return {}
    return {int(e): int(n) for e, n in (await session.execute(claimed_counts_query(epochs))).all()}


@dataclass
class EpochLeaf:
    index: int
    node: str
    amount: int
    leaf: str  # hex of the bytes the program hashes: index u32 LE, node, amount u64 LE
    proof: list[ProofStep]
    claim: ChainTransfer | None  # None until the epoch is funded


@dataclass
class EpochView:
    epoch: ChainPayoutEpoch
    post: ChainTransfer
    claimed: int
    # the root the stored leaves rebuild; differs from ``epoch.root`` only if the table
    # was altered after posting, and then no proof here would pass on chain
    rebuilt_root: str | None
    leaves: Page[EpochLeaf]
    # the ``close`` row once every leaf was paid (the program then closed the epoch's
    # accounts and returned their rent); None while any leaf is unpaid
    closed: ChainTransfer | None = None


def epoch_view(session: Session, epoch: int, number: int) -> EpochView | None:
    """One epoch and a page of its leaves with their proofs. Synchronous because the
    proofs come from ``load_epoch``, the very function the claims are built from."""
    row = session.execute(epochs_query().where(ChainPayoutEpoch.epoch == epoch)).first()
    if row is None:
        return None
    full = load_epoch(session, epoch)
    hexes = [leaf.leaf_hex() for leaf in full.leaves]
    number = min(max(number, 1), MAX_PAGE)
    start = (number - 1) * PAGE_SIZE
    shown = list(enumerate(full.leaves))[start:start + PAGE_SIZE]
    keys = [claim_key(epoch, leaf.index) for _, leaf in shown]
    claims = {t.idempotency_key: t for t in session.scalars(
        select(ChainTransfer).where(ChainTransfer.idempotency_key.in_(keys)))}
    leaves = [EpochLeaf(leaf.index, leaf.node, leaf.amount, hexes[position],
                        inclusion_proof(hexes, position), claims.get(key))
              for (position, leaf), key in zip(shown, keys, strict=True)]
    counted = dict(session.execute(claimed_counts_query([epoch])).all())
    closed = session.scalars(select(ChainTransfer).where(
        ChainTransfer.idempotency_key == close_key(epoch))).first()
    return EpochView(epoch=row[0], post=row[1], claimed=int(counted.get(epoch, 0)),
                     rebuilt_root=merkle_root(hexes) if hexes else None,
                     leaves=Page(leaves, number, start + PAGE_SIZE < len(hexes)),
                     closed=closed)


# ---- slashes ------------------------------------------------------------------------------


@dataclass
class SlashRecord:
    """What the chain side holds for one slashed receipt; every part may still be missing
    (a case waits for the receipt's anchor and a quorum of verdict signatures)."""

    case: ChainTransfer | None
    slash: ChainTransfer | None
    verdicts: list[ChainVerdict]

    @property
    def verifiers(self) -> list[str]:
        return list(dict.fromkeys(v.verifier for v in self.verdicts))


async def slash_records(session: AsyncSession, receipt_ids: list[str]) -> dict[str, SlashRecord]:
    if not receipt_ids:
        return {}
    keys = {case_key(r): r for r in receipt_ids} | {f"slash:{r}": r for r in receipt_ids}
    records = {r: SlashRecord(None, None, []) for r in receipt_ids}
    for transfer in (await session.scalars(
            select(ChainTransfer).where(ChainTransfer.idempotency_key.in_(list(keys))))).all():
        record = records[keys[transfer.idempotency_key]]
        if transfer.kind == "case":
            record.case = transfer
        elif transfer.kind == "slash":
            record.slash = transfer
    for verdict in (await session.scalars(
            select(ChainVerdict).where(ChainVerdict.receipt_id.in_(receipt_ids))
            .order_by(ChainVerdict.id))).all():
        records[verdict.receipt_id].verdicts.append(verdict)
    return records


def anchors_query() -> Select[Any]:
    return select(Anchor).order_by(Anchor.id.desc())


def nodes_query() -> Select[Any]:
    return select(Node).order_by(Node.created_at.desc(), Node.id)


def jobs_query() -> Select[Any]:
    return select(Job).order_by(Job.created_at.desc(), Job.id.desc())


async def resolve_search(session: AsyncSession, query: str) -> str | None:
    """Where a search term leads: a job, a receipt, a node, or a transaction's subject."""
    term = query.strip()
    if not term:
        return None
    if await session.scalar(select(Job.id).where(Job.id == term)):
        return f"job:{term}"
    if await session.scalar(select(Receipt.id).where(Receipt.receipt_hash == term.lower())):
        return f"receipt:{term.lower()}"
    node_id = await session.scalar(select(Node.id).where(or_(Node.pubkey == term, Node.id == term)))
    if node_id:
        return f"node:{node_id}"
    if await session.scalar(select(Anchor.id).where(Anchor.tx_signature == term)):
        return f"anchor:{term}"
    transfer = await session.scalar(select(ChainTransfer).where(ChainTransfer.signature == term))
    if transfer is not None:
        epoch = {"payout": str(transfer.id),
                 "claim": transfer.idempotency_key.split(":")[1]}.get(transfer.kind)
        if (epoch is not None and epoch.isascii() and epoch.isdigit()
                and await session.get(ChainPayoutEpoch, int(epoch)) is not None):
            return f"epoch:{epoch}"
        return f"transfer:{transfer.kind}"
    return None
