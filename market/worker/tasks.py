"""Celery tasks: the beat tick and the per-receipt verification.

Both are idempotent (state transitions are guarded ``UPDATE … WHERE state = …``),
acknowledged late, and retried with exponential backoff on errors (database
locked, broker hiccup, engine failure).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from market.db import sync_session_factory
from market.settings import get_settings
from market.verify import service
from market.worker.celery_app import TICK_TASK, VERIFY_TASK, celery_app

log = logging.getLogger("market.worker")

_sessions: sessionmaker[Session] | None = None
_sessions_lock = threading.Lock()


def sessions() -> sessionmaker[Session]:
    """One sync session factory per worker process (created lazily, after fork)."""
    global _sessions
    with _sessions_lock:
        if _sessions is None:
            _sessions = sync_session_factory(get_settings().db.url)
        return _sessions


_RETRY: dict[str, Any] = {
    "autoretry_for": (Exception,),
    "retry_backoff": 2,
    "retry_backoff_max": 120,
    "retry_jitter": True,
    "max_retries": 8,
    "acks_late": True,
}


@celery_app.task(name=TICK_TASK, **{**_RETRY, "max_retries": 2})
def tick() -> dict[str, Any]:
    """Decide sampling, dispatch due verifications, settle expired windows."""
    settings = get_settings()
    result = service.tick(sessions(), settings)
    for receipt_id in result.dispatched:
        verify_receipt.delay(receipt_id)
    if result.decided or result.dispatched or result.settled:
        log.info("tick: decided %d, dispatched %d, settled %d", result.decided,
                 len(result.dispatched), len(result.settled))
    return {"decided": result.decided, "dispatched": len(result.dispatched),
            "settled": len(result.settled)}


@celery_app.task(name=VERIFY_TASK, **_RETRY)
def verify_receipt(receipt_id: str) -> str:
    """Re-execute one receipt and settle or slash it."""
    return service.verify(sessions(), receipt_id, get_settings())
