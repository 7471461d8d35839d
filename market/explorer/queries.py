"""Read-only queries behind the explorer pages (async sessions, bounded results)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer, selectinload

from market.models import Anchor, ChainTransfer, Job, Node, Receipt, ReceiptEvent

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


def transfers_query(kind: str) -> Select[Any]:
    return (
        select(ChainTransfer)
        .where(ChainTransfer.kind == kind)
        .order_by(ChainTransfer.created_at.desc(), ChainTransfer.id.desc())
    )


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
        return f"transfer:{transfer.kind}"
    return None
