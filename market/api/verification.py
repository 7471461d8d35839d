"""Buyer-facing verification API.

* ``GET /v1/jobs/{id}`` — the buyer's job with each receipt's challenge state,
  window, events and verification evidence.
* ``POST /v1/jobs/{id}/challenge`` — ask for re-execution of the job's receipts while
  their challenge window is open: 202 and the receipts now due for verification;
  404 for a job that is not the caller's; 409 when no receipt can be challenged
  (window closed, already verified, settled or slashed).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from market.errors import Conflict, NotFound
from market.gateway.auth import Buyer, authenticate, market_state
from market.models import Job, Receipt, ReceiptEvent, utcnow
from market.verify import window

router = APIRouter()


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _own_job(session: Session, job_id: str, account_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.account_id != account_id:
        raise NotFound(f"No job {job_id!r}.", param="job_id", code="job_not_found")
    return job


def job_view(session: Session, job: Job) -> dict[str, Any]:
    receipts = session.execute(
        select(Receipt).where(Receipt.job_id == job.id).order_by(Receipt.seq)
    ).scalars().all()
    events: dict[str, list[dict[str, Any]]] = {r.id: [] for r in receipts}
    if receipts:
        for ev in session.execute(
            select(ReceiptEvent)
            .where(ReceiptEvent.receipt_id.in_(list(events)))
            .order_by(ReceiptEvent.id)
        ).scalars():
            events[ev.receipt_id].append(
                {"from": ev.from_state, "to": ev.to_state, "at": _iso(ev.at), "reason": ev.reason}
            )
    states = [r.state for r in receipts]
    if not states:
        overall = None
    elif "slashed" in states:
        overall = "slashed"
    elif "verifying" in states:
        overall = "verifying"
    elif all(s == "settled" for s in states):
        overall = "settled"
    else:
        overall = "pending"
    return {
        "id": job.id,
        "object": "job",
        "model": job.model,
        "kind": job.kind,
        "status": job.status,
        "created_at": _iso(job.created_at),
        "finished_at": _iso(job.finished_at),
        "finish_reason": job.finish_reason,
        "usage": job.usage,
        "charged": job.charged_amount,
        "fee": job.fee_amount,
        "verification_state": overall,
        "receipts": [
            {
                "id": r.id,
                "seq": r.seq,
                "node_id": r.node_id,
                "receipt_hash": r.receipt_hash,
                "cost": r.cost,
                "state": r.state,
                "state_reason": r.state_reason,
                "state_changed_at": _iso(r.state_changed_at),
                "window_closes_at": _iso(r.window_closes_at),
                "challenged": r.challenged,
                "verification": r.verification,
                "events": events[r.id],
            }
            for r in receipts
        ],
    }


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request, buyer: Buyer = Depends(authenticate)) -> Any:
    state = market_state(request)

    def read(session: Session) -> dict[str, Any]:
        return job_view(session, _own_job(session, job_id, buyer.account_id))

    async with state.db.async_sessions() as session:
        return await session.run_sync(read)


@router.post("/v1/jobs/{job_id}/challenge", status_code=202)
async def challenge_job(
    job_id: str, request: Request, buyer: Buyer = Depends(authenticate)
) -> Any:
    state = market_state(request)

    def apply(session: Session) -> dict[str, Any]:
        job = _own_job(session, job_id, buyer.account_id)
        now = utcnow()
        receipts = session.execute(
            select(Receipt).where(Receipt.job_id == job.id).order_by(Receipt.seq)
        ).scalars().all()
        if not receipts:
            raise Conflict("This job has no receipt to challenge.", code="nothing_to_challenge")
        challenged = [r.id for r in receipts if window.request_challenge(session, r, now=now)]
        if not challenged:
            already = [r.id for r in receipts if r.challenged and r.state in ("pending", "verifying")]
            if already:
                raise Conflict("This job is already challenged.", code="already_challenged")
            raise Conflict(
                "The challenge window of this job is closed or its receipts are already "
                "verified.",
                code="challenge_window_closed",
            )
        view = job_view(session, job)
        view["challenged_receipts"] = challenged
        return view

    async with state.db.async_sessions() as session:
        async with session.begin():
            body = await session.run_sync(apply)
    return JSONResponse(body, status_code=202)
