"""Admin API (``Authorization: Bearer <settings.admin_token>``): accounts, API keys,
dev credit, usage, nodes, listed models."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from market import listing as listing_mod
from market.api.schemas import RequestBody
from market.errors import BadRequest, NotFound
from market.gateway.auth import forget_key, market_state, require_admin
from market.models import Node, new_id
from market.money import accounts, billing

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


class NewAccount(RequestBody):
    name: str = Field(min_length=1, max_length=200)
    wallet: str | None = None


class NewKey(RequestBody):
    name: str | None = None


class Credit(RequestBody):
    amount: int = Field(gt=0)
    reference: str | None = Field(
        default=None, description="idempotency reference; the same one never credits twice"
    )


async def _sync(request: Request, fn: Any, *args: Any) -> Any:
    """Run ``fn(session, *args)`` in one transaction (through the batch writer)."""
    return await market_state(request).writer.submit(lambda session: fn(session, *args))


@router.post("/accounts", status_code=201)
async def create_account(body: NewAccount, request: Request) -> Any:
    def run(s: Session) -> dict[str, Any]:
        return accounts.account_dict(accounts.create_account(s, body.name, body.wallet))

    return await _sync(request, run)


@router.get("/accounts")
async def list_accounts(request: Request) -> Any:
    def run(s: Session) -> dict[str, Any]:
        return {"object": "list",
                "data": [accounts.account_dict(a) for a in accounts.list_accounts(s)]}

    return await _sync(request, run)


@router.get("/accounts/{account_id}")
async def get_account(account_id: str, request: Request) -> Any:
    def run(s: Session) -> dict[str, Any]:
        return accounts.account_dict(accounts.get_account(s, account_id))

    return await _sync(request, run)


@router.post("/accounts/{account_id}/keys", status_code=201)
async def create_key(account_id: str, request: Request, body: NewKey | None = None) -> Any:
    def run(s: Session) -> dict[str, Any]:
        key, plaintext = accounts.issue_key(s, account_id, body.name if body else None)
        return accounts.key_dict(key, plaintext)

    return await _sync(request, run)


@router.get("/accounts/{account_id}/keys")
async def list_keys(account_id: str, request: Request) -> Any:
    def run(s: Session) -> dict[str, Any]:
        accounts.get_account(s, account_id)
        return {"object": "list",
                "data": [accounts.key_dict(k) for k in accounts.list_keys(s, account_id)]}

    return await _sync(request, run)


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, request: Request) -> Any:
    def run(s: Session) -> dict[str, Any]:
        return accounts.key_dict(accounts.revoke_key(s, key_id))

    result = await _sync(request, run)
    forget_key(market_state(request), key_id)
    return result


@router.post("/accounts/{account_id}/credit")
async def credit(account_id: str, body: Credit, request: Request) -> Any:
    reference = body.reference or new_id("credit")

    def run(s: Session) -> dict[str, Any]:
        applied = billing.credit_account(s, account_id, body.amount, reference)
        out = accounts.account_dict(accounts.get_account(s, account_id))
        out["credit_applied"] = applied
        return out

    return await _sync(request, run)


@router.get("/accounts/{account_id}/usage")
async def account_usage(
    account_id: str, request: Request, limit: int = Query(50, ge=1, le=1000)
) -> Any:
    return await _sync(request, accounts.usage, account_id, limit)


@router.get("/nodes")
async def nodes(request: Request) -> Any:
    state = market_state(request)

    def run(s: Session) -> list[Node]:
        return list(s.execute(select(Node).order_by(Node.created_at)).scalars())

    rows = await _sync(request, run)
    out = []
    for node in rows:
        conn = state.registry.links.get(node.id)
        out.append(
            {
                "id": node.id,
                "pubkey": node.pubkey,
                "region": node.region,
                "connected": conn is not None,
                "healthy": bool(conn and conn.available),
                "models": sorted(conn.models) if conn else [],
                "price_per_mtok": {"input": node.price_in, "output": node.price_out},
                "max_concurrency": node.max_concurrency,
                "inflight": len(conn.inflight) if conn else 0,
                "load": conn.load if conn else None,
                "reputation": conn.reputation if conn else node.reputation,
                "ttft_ms": conn.ttft_ms if conn else node.ttft_ms,
                "tokens_per_s": conn.tokens_per_s if conn else node.tokens_per_s,
                "failure_rate": conn.failure_rate if conn else node.failure_rate,
                "jobs_total": node.jobs_total,
                "jobs_failed": conn.jobs_failed if conn else node.jobs_failed,
                "suspended": node.suspended,
                "stake": node.stake,
                "earned_pending": node.earned_pending,
                "earned_settled": node.earned_settled,
            }
        )
    return {"object": "list", "data": out}


# ---- listed models (market.listing) ----------------------------------------------------


class ModelListingBody(RequestBody):
    sha256: list[str] = Field(min_length=1, max_length=64)
    vocabulary: str = Field(min_length=1, max_length=1000)
    context_length: int = Field(default=8192, ge=1, le=10_000_000)


def _listing_dict(listing: listing_mod.ListedModel) -> dict[str, Any]:
    return {"id": listing.id, "sha256": sorted(listing.sha256),
            "vocabulary": listing.vocabulary, "context_length": listing.context_length}


@router.get("/models")
async def list_listings(request: Request) -> Any:
    listings = await _sync(request, listing_mod.read_all)
    return {"object": "list", "data": [_listing_dict(v) for _, v in sorted(listings.items())]}


@router.put("/models/{model_id}")
async def put_listing(model_id: str, body: ModelListingBody, request: Request) -> Any:
    """List a model (or change its listing). The vocabulary must load here first: the
    market counts every prompt of the model with it."""
    state = market_state(request)
    listing = listing_mod.validate_listing(model_id, body.sha256, body.vocabulary,
                                           body.context_length)
    try:
        await asyncio.to_thread(listing_mod.load_vocabulary, listing.vocabulary)
    except Exception as exc:  # noqa: BLE001 - any failure to read it is the operator's input
        raise BadRequest(f"vocabulary {listing.vocabulary!r} cannot be read: {exc}",
                         param="vocabulary") from None
    await _sync(request, listing_mod.upsert, listing)
    await listing_mod.refresh(state.catalog, state.db)
    return _listing_dict(listing)


@router.delete("/models/{model_id}")
async def delete_listing(model_id: str, request: Request) -> Any:
    state = market_state(request)
    if not await _sync(request, listing_mod.remove, model_id):
        raise NotFound(f"model {model_id!r} is not listed", param="model_id")
    await listing_mod.refresh(state.catalog, state.db)
    return {"id": model_id, "deleted": True}


@router.post("/receipts/{receipt_id}/requeue")
async def requeue_receipt(receipt_id: str, request: Request) -> Any:
    """Send an escalated receipt (no verifier could judge it) back to verification."""
    from market.verify.window import requeue

    if not await _sync(request, requeue, receipt_id):
        raise NotFound(f"receipt {receipt_id!r} is not escalated", param="receipt_id")
    return {"id": receipt_id, "state": "pending"}
