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
from solders.pubkey import Pubkey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from chain.aidp import program
from chain.aidp.config import ChainConfig
from market.errors import NotFound
from market.explorer import queries
from market.explorer.charts import bar_chart
from market.models import Anchor, ChainTransfer, Job, Node, Receipt
from market.onchain.models import ChainPayoutEpoch
from market.onchain.proofs import proof_view
from market.onchain.runtime import config_path
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


def program_id(settings: MarketSettings) -> Pubkey | None:
    """The program the market settles with, as ``chain init`` recorded it (a file, not the
    chain: pages never wait on an RPC), else the configured id; None before init, and the
    pages then leave out the addresses derived from it."""
    try:
        recorded = ChainConfig.load(config_path(settings)).program
    except (OSError, ValueError, TypeError):
        recorded = ""
    named = recorded or settings.chain.program_id
    try:
        return Pubkey.from_string(named) if named else None
    except ValueError:
        return None


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


def codes(values: list[str]) -> dict[str, Any]:
    return {"text": "—", "codes": values} if values else {"text": "none yet"}


def state(value: str | None) -> dict[str, Any]:
    return {"text": value, "state": True} if value else {"text": "—"}


def aidp(units: int, decimals: int) -> str:
    return f"{units / 10**decimals:.6f} AIDP"


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
EPOCH_COLUMNS = ["epoch", "Merkle root", "total", "leaves", "claimed", "post", "tx signature", "at"]
SLASH_COLUMNS = ["receipt", "node", "case", "case tx", "stake taken", "slash", "slash tx",
                 "verdict signed by"]


def anchor_row(anchor: Anchor) -> list[dict[str, Any]]:
    return [code(anchor.merkle_root, n=16), text(anchor.receipt_count),
            code(anchor.tx_signature, n=16), text(anchor.slot), when(anchor.created_at)]


def epoch_row(request: Request, epoch: ChainPayoutEpoch, post: ChainTransfer, claimed: int,
              decimals: int) -> list[dict[str, Any]]:
    href = str(request.url_for("explorer_epoch", epoch=str(epoch.epoch)))
    return [text(epoch.epoch, href), code(epoch.root, href, n=16),
            text(aidp(epoch.total, decimals)), text(epoch.leaf_count),
            text(f"{claimed} / {epoch.leaf_count}"), state(post.state),
            code(post.signature, n=16), when(post.updated_at)]


def slash_tx(transfer: ChainTransfer | None) -> dict[str, Any]:
    if transfer is not None and transfer.state == "confirmed" and not transfer.signature:
        # recorded, never sent: the node had nothing staked on chain left to take
        return text("nothing to take: not sent")
    return code(transfer.signature if transfer else None, n=16)


def slash_row(request: Request, receipt: Receipt, pubkey: str, record: queries.SlashRecord,
              decimals: int) -> list[dict[str, Any]]:
    case, slash = record.case, record.slash
    receipt_url = request.url_for("explorer_receipt", receipt_hash=receipt.receipt_hash)
    return [
        code(receipt.receipt_hash, str(receipt_url)),
        code(pubkey, str(request.url_for("explorer_node", node_ref=receipt.node_id))),
        state(case.state if case else None), code(case.signature if case else None, n=16),
        text(aidp(slash.amount, decimals) if slash else None),
        state(slash.state if slash else None), slash_tx(slash), codes(record.verifiers),
    ]


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
    slashed = None
    if receipt.state == "slashed":
        slashed = (await queries.slash_records(session, [receipt.id]))[receipt.id]
    return render(
        request, "receipt.html", r=receipt, body=body, node_pubkey=receipt.node.pubkey,
        canonical=body.canonical().decode(), anchor=anchor,
        events=await queries.receipt_events(session, receipt.id),
        slashed=slashed, quorum=settings_of(request).chain.verifier_quorum,
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
                  page=_page(request, receipts),
                  stake_accounts=stake_accounts(settings_of(request), node.pubkey))


def stake_accounts(settings: MarketSettings, pubkey: str) -> dict[str, str] | None:
    """The operator's stake PDAs, derived rather than read: the page names where the bond
    lives; a reader asks the chain what it holds."""
    pid = program_id(settings)
    try:
        operator = Pubkey.from_string(pubkey)
    except ValueError:
        return None
    if pid is None:
        return None
    return {"account": str(program.stake_address(pid, operator)),
            "vault": str(program.vault_address(pid, operator))}


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
    result = await queries.paginate(session, queries.epochs_query(), page)
    claimed = await queries.claimed_counts(session, [e.epoch for e, _ in result.items])
    rows = [epoch_row(request, e, post, claimed.get(e.epoch, 0), decimals)
            for e, post in result.items]
    return render(
        request, "table.html", title="Settlements", columns=EPOCH_COLUMNS, rows=rows,
        page=_page(request, result), empty="No payout epoch posted yet.",
        intro="Payout epochs: each posts to the aidp_market program the Merkle root of its "
              "(index, node, amount) leaves and funds the epoch's vault with their total; "
              "each node is then paid by a claim of its leaf, checked by the program "
              "against that root.")


# an epoch is the id of its ``payout`` row, a 32-bit column: a larger number names none
# (and would overflow the query on PostgreSQL)
MAX_EPOCH = 2**31 - 1


async def _epoch(session: AsyncSession, ref: str, page: int) -> queries.EpochView | None:
    if not (ref.isascii() and ref.isdigit()) or int(ref) > MAX_EPOCH:
        return None
    return await session.run_sync(lambda s: queries.epoch_view(s, int(ref), page))


def payouts_account(request: Request, epoch: int) -> str | None:
    """Where the program holds the epoch's root, the one a proof must reach."""
    pid = program_id(settings_of(request))
    return str(program.payouts_address(pid, epoch)) if pid else None


@router.get("/epochs/{epoch}", name="explorer_epoch")
async def epoch_page(request: Request, epoch: str, page: PageNumber = 1,
                     session: AsyncSession = Depends(db_session)) -> HTMLResponse:
    view = await _epoch(session, epoch, page)
    if view is None:
        return not_found(request, "Epoch")
    return render(request, "epoch.html", v=view, page=_page(request, view.leaves),
                  payouts_account=payouts_account(request, view.epoch.epoch))


@router.get("/api/epochs/{epoch}", name="explorer_epoch_api")
async def epoch_api(request: Request, epoch: str, page: PageNumber = 1,
                    session: AsyncSession = Depends(db_session)) -> dict[str, Any]:
    """The epoch page as data: each leaf's bytes and proof, for a script that checks them
    against the root in the program's ``Payouts`` account (``payouts_account``)."""
    view = await _epoch(session, epoch, page)
    if view is None:
        raise NotFound(f"No payout epoch {epoch!r}.", param="epoch", code="epoch_not_found")
    return {
        "epoch": view.epoch.epoch, "root": view.epoch.root, "rebuilt_root": view.rebuilt_root,
        "total": view.epoch.total, "leaf_count": view.epoch.leaf_count, "claimed": view.claimed,
        "post": {"state": view.post.state, "signature": view.post.signature},
        "closed": None if view.closed is None else
        {"state": view.closed.state, "signature": view.closed.signature},
        "payouts_account": payouts_account(request, view.epoch.epoch),
        "page": view.leaves.number, "has_next": view.leaves.has_next,
        "leaves": [{"index": x.index, "node": x.node, "amount": x.amount, "leaf": x.leaf,
                    "claim": None if x.claim is None else
                    {"state": x.claim.state, "signature": x.claim.signature},
                    "proof": [{"sibling": p.sibling, "side": p.side} for p in x.proof]}
                   for x in view.leaves.items],
    }


@router.get("/slashes", name="explorer_slashes")
async def slashes_page(request: Request, page: PageNumber = 1,
                       session: AsyncSession = Depends(db_session)) -> HTMLResponse:
    query = queries.receipts_query().where(Receipt.state == "slashed")
    result = await queries.paginate(session, query, page)
    records = await queries.slash_records(session, [r.id for r, _, _ in result.items])
    settings = settings_of(request)
    decimals = settings.billing.token_decimals
    return render(
        request, "slashes.html", columns=SLASH_COLUMNS,
        rows=[slash_row(request, r, pk, records[r.id], decimals) for r, pk, _ in result.items],
        page=_page(request, result), quorum=settings.chain.verifier_quorum,
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
        "epoch": lambda: request.url_for("explorer_epoch", epoch=ref),
        "transfer": lambda: request.url_for(
            "explorer_slashes" if ref in ("case", "slash") else "explorer_settlements"),
    }
    return RedirectResponse(str(urls[kind]()), status_code=303)
