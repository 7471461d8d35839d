"""Explorer pages at ``/explorer``: server-rendered HTML, JavaScript only to verify and refresh.

Pages read the database; the verify button reads the chain itself, so a reader need
not trust these pages for the one question that matters: is this receipt anchored?
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from market.explorer import queries
from market.explorer.charts import bar_chart
from market.models import Anchor, ChainTransfer, Job, Node, Receipt
from market.onchain.proofs import proof_view
from market.settings import MarketSettings
from protocol.receipt import ReceiptBody

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["when"] = lambda v: v.strftime("%Y-%m-%d %H:%M:%S UTC") if v else "—"
# ?page=N of every listing, bounded so no page number reaches the database as an overflow
PageNumber = Annotated[int, Query(ge=1, le=queries.MAX_PAGE)]

router = APIRouter(prefix="/explorer", include_in_schema=False)
CHART_MINUTES = 30


STATIC_FILES = {p.name: p for p in (HERE / "static").iterdir()}


@router.get("/static/{path}", name="explorer-static")
async def static(path: str) -> FileResponse:
    """The explorer's two static files (served here so the router stays self-contained)."""
    if path not in STATIC_FILES:
        raise HTTPException(404)
    return FileResponse(STATIC_FILES[path], headers={"Cache-Control": "public, max-age=300"})


async def db_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.market.db.async_sessions() as session:
        yield session


def settings_of(request: Request) -> MarketSettings:
    return request.app.state.market.settings


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("decimals", settings_of(request).billing.token_decimals)
    return templates.TemplateResponse(request, template, context, status_code=status_code)


def not_found(request: Request, what: str) -> HTMLResponse:
    return render(request, "table.html", 404, title=f"{what} not found", columns=[], rows=[],
                  page=_page(request, queries.Page([], 1, False)), empty="Try the search box.")


def _page(request: Request, page: queries.Page[Any]) -> dict[str, Any]:
    def at(n: int) -> str:
        return str(request.url.include_query_params(page=n))

    return {
        "number": page.number,
        "prev_url": at(page.number - 1) if page.number > 1 else None,
        "next_url": at(page.number + 1) if page.has_next else None,
    }


# ---- cells: the tables are built from these small dicts ---------------------------------


def code(value: str | None, href: str | None = None, n: int = 12) -> dict[str, Any]:
    if not value:
        return {"text": "—"}
    text = value[:n] + ("…" if len(value) > n else "")
    return {"text": text, "full": value, "code": True, "href": href}


def text(value: Any, href: str | None = None) -> dict[str, Any]:
    return {"text": "—" if value is None else str(value), "href": href}


def when(value: Any) -> dict[str, Any]:
    return text(templates.env.filters["when"](value))


def receipt_row(request: Request, receipt: Receipt, pubkey: str, model: str) -> list[dict[str, Any]]:
    return [
        code(receipt.receipt_hash, str(request.url_for("explorer_receipt", receipt_hash=receipt.receipt_hash))),
        code(receipt.job_id, str(request.url_for("explorer_job", job_id=receipt.job_id)), n=16),
        code(pubkey, str(request.url_for("explorer_node", node_ref=receipt.node_id))),
        text(model),
        text(receipt.completion_tokens),
        {"text": receipt.state, "state": True},
        text("yes" if receipt.anchor_id else "no"),
        when(receipt.created_at),
    ]


RECEIPT_COLUMNS = ["receipt", "job", "node", "model", "tokens", "state", "anchored", "created"]
ANCHOR_COLUMNS = ["Merkle root", "receipts", "tx signature", "slot", "anchored at"]
TRANSFER_COLUMNS = ["kind", "amount", "to", "memo", "state", "tx signature", "at"]


def anchor_row(anchor: Anchor) -> list[dict[str, Any]]:
    return [code(anchor.merkle_root, n=16), text(anchor.receipt_count),
            code(anchor.tx_signature, n=16), text(anchor.slot), when(anchor.created_at)]


def transfer_row(transfer: ChainTransfer, decimals: int) -> list[dict[str, Any]]:
    return [text(transfer.kind), text(f"{transfer.amount / 10**decimals:.6f} AIDP"),
            code(transfer.to_address), text(transfer.memo), {"text": transfer.state, "state": True},
            code(transfer.signature, n=16), when(transfer.updated_at)]


# ---- pages ---------------------------------------------------------------------------------


@router.get("", name="explorer_home")
async def home(request: Request, session: AsyncSession = Depends(db_session)) -> HTMLResponse:
    settings = settings_of(request)
    counts = await queries.overview_counts(session)
    healthy, _ = request.app.state.market.registry.counts()
    jobs, minutes = await queries.jobs_per_minute(session, CHART_MINUTES)
    speeds, nodes = await queries.node_speeds(session)
    anchors = await queries.paginate(session, queries.anchors_query(), 1)
    receipts = await queries.paginate(session, queries.receipts_query(), 1)
    settled = counts["settled_units"] / 10**settings.billing.token_decimals
    return render(
        request, "index.html",
        cards=[("jobs", counts["jobs"]), ("nodes online", healthy),
               ("in challenge window", counts["pending"]), ("settled", counts["settled"]),
               ("slashed", counts["slashed"]), ("anchored receipts", counts["anchored"]),
               ("AIDP paid to nodes", f"{settled:.6f}")],
        minutes=CHART_MINUTES,
        jobs_chart=bar_chart(jobs, minutes, " jobs"),
        speed_chart=bar_chart(speeds, nodes, " tok/s"),
        anchor_columns=ANCHOR_COLUMNS, anchor_rows=[anchor_row(a) for a in anchors.items[:10]],
        receipt_columns=RECEIPT_COLUMNS,
        receipt_rows=[receipt_row(request, r, pk, m) for r, pk, m in receipts.items],
    )


@router.get("/receipts/{receipt_hash}", name="explorer_receipt")
async def receipt_page(request: Request, receipt_hash: str,
                       session: AsyncSession = Depends(db_session)) -> HTMLResponse:
    receipt = await queries.receipt_by_hash(session, receipt_hash.lower())
    if receipt is None:
        return not_found(request, "Receipt")
    body = ReceiptBody.model_validate(receipt.receipt["body"])
    anchor = await session.get(Anchor, receipt.anchor_id) if receipt.anchor_id else None
    return render(
        request, "receipt.html", r=receipt, body=body, node_pubkey=receipt.node.pubkey,
        canonical=body.canonical().decode(), anchor=anchor,
        events=await queries.receipt_events(session, receipt.id),
    )


@router.get("/api/receipts/{receipt_hash}/proof", name="explorer_receipt_proof")
async def receipt_proof(request: Request, receipt_hash: str,
                        session: AsyncSession = Depends(db_session)) -> dict[str, Any]:
    """The public inclusion proof plus what the browser needs to check it without trusting
    us: the canonical receipt bytes, the node's signature, and where to read the chain."""
    rpc_url = settings_of(request).chain.explorer_rpc_url

    def build(sync_session: Session) -> dict[str, Any]:
        view = proof_view(sync_session, receipt_hash)
        receipt = sync_session.scalars(
            select(Receipt).where(Receipt.receipt_hash == view["receipt_hash"])
        ).one()
        body = ReceiptBody.model_validate(receipt.receipt["body"])
        view.update(canonical=body.canonical().decode(), node_pubkey=body.node_pubkey,
                    signature=receipt.receipt.get("signature", receipt.signature))
        if view["anchor"]:
            view["anchor"]["rpc_url"] = rpc_url
        return view

    return await session.run_sync(build)


@router.get("/jobs/{job_id}", name="explorer_job")
async def job_page(request: Request, job_id: str,
                   session: AsyncSession = Depends(db_session)) -> HTMLResponse:
    job = await queries.job_with_receipts(session, job_id)
    if job is None:
        return not_found(request, "Job")
    rows = [receipt_row(request, r, r.node.pubkey, job.model) for r in job.receipts]
    return render(request, "job.html", job=job, columns=RECEIPT_COLUMNS, rows=rows)


@router.get("/nodes/{node_ref}", name="explorer_node")
async def node_page(request: Request, node_ref: str, page: PageNumber = 1,
                    session: AsyncSession = Depends(db_session)) -> HTMLResponse:
    node = await queries.node_by_ref(session, node_ref)
    if node is None:
        return not_found(request, "Node")
    receipts = await queries.paginate(
        session, queries.receipts_query().where(Receipt.node_id == node.id), page
    )
    rows = [receipt_row(request, r, pk, m) for r, pk, m in receipts.items]
    return render(request, "node.html", node=node, columns=RECEIPT_COLUMNS, rows=rows,
                  page=_page(request, receipts))


async def _list(request: Request, session: AsyncSession, title: str, query: Any, page: int,
                columns: list[str], row: Any, intro: str = "") -> HTMLResponse:
    result = await queries.paginate(session, query, page)
    return render(request, "table.html", title=title, intro=intro, columns=columns,
                  rows=[row(item) for item in result.items], page=_page(request, result))


@router.get("/anchors", name="explorer_anchors")
async def anchors_page(request: Request, page: PageNumber = 1,
                       session: AsyncSession = Depends(db_session)) -> HTMLResponse:
    return await _list(request, session, "Anchors", queries.anchors_query(), page, ANCHOR_COLUMNS,
                       anchor_row, "Merkle roots of receipt batches, each written on chain in a Memo.")


@router.get("/jobs", name="explorer_jobs")
async def jobs_page(request: Request, page: PageNumber = 1,
                    session: AsyncSession = Depends(db_session)) -> HTMLResponse:
    def row(job: Job) -> list[dict[str, Any]]:
        return [code(job.id, str(request.url_for("explorer_job", job_id=job.id)), n=16), text(job.model),
                text(job.status), text(job.completion_tokens), text(job.failovers), when(job.created_at)]

    return await _list(request, session, "Jobs", queries.jobs_query(), page,
                       ["job", "model", "status", "tokens", "failovers", "created"], row)


@router.get("/nodes", name="explorer_nodes")
async def nodes_page(request: Request, page: PageNumber = 1,
                     session: AsyncSession = Depends(db_session)) -> HTMLResponse:
    decimals = settings_of(request).billing.token_decimals

    def row(node: Node) -> list[dict[str, Any]]:
        return [code(node.pubkey, str(request.url_for("explorer_node", node_ref=node.id)), n=16),
                text(node.region), text(f"{node.stake / 10**decimals:.6f}"), text(f"{node.reputation:.3f}"),
                text(node.jobs_total), text("suspended" if node.suspended else "active"), when(node.last_seen_at)]

    return await _list(request, session, "Nodes", queries.nodes_query(), page,
                       ["node", "region", "stake (AIDP)", "reputation", "jobs", "status", "last seen"], row)


@router.get("/settlements", name="explorer_settlements")
async def settlements_page(request: Request, page: PageNumber = 1,
                           session: AsyncSession = Depends(db_session)) -> HTMLResponse:
    decimals = settings_of(request).billing.token_decimals
    return await _list(request, session, "Settlements", queries.transfers_query("payout"), page,
                       TRANSFER_COLUMNS, lambda t: transfer_row(t, decimals),
                       "Payout rounds: one transfer per node, its Memo carries the Merkle root of the jobs it pays.")


@router.get("/slashes", name="explorer_slashes")
async def slashes_page(request: Request, page: PageNumber = 1,
                       session: AsyncSession = Depends(db_session)) -> HTMLResponse:
    query = queries.receipts_query().where(Receipt.state == "slashed")
    result = await queries.paginate(session, query, page)
    transfers = await queries.paginate(session, queries.transfers_query("slash"), page)
    decimals = settings_of(request).billing.token_decimals
    return render(
        request, "slashes.html", columns=RECEIPT_COLUMNS,
        rows=[receipt_row(request, r, pk, m) for r, pk, m in result.items],
        transfer_columns=TRANSFER_COLUMNS,
        transfer_rows=[transfer_row(t, decimals) for t in transfers.items],
        page=_page(request, queries.Page([], page, result.has_next or transfers.has_next)),
    )


@router.get("/search", name="explorer_search")
async def search(request: Request, q: str = "", session: AsyncSession = Depends(db_session)) -> Response:
    target = await queries.resolve_search(session, q)
    if target is None:
        return render(request, "table.html", 404, title=f"Nothing found for “{q}”", columns=[], rows=[],
                      page=_page(request, queries.Page([], 1, False)), query=q,
                      empty="Search by job id, receipt hash, node pubkey or transaction signature.")
    kind, _, ref = target.partition(":")
    urls = {
        "job": lambda: request.url_for("explorer_job", job_id=ref),
        "receipt": lambda: request.url_for("explorer_receipt", receipt_hash=ref),
        "node": lambda: request.url_for("explorer_node", node_ref=ref),
        "anchor": lambda: request.url_for("explorer_anchors"),
        "transfer": lambda: request.url_for(
            "explorer_slashes" if ref == "slash" else "explorer_settlements"),
    }
    return RedirectResponse(str(urls[kind]()), status_code=303)
