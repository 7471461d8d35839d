"""Celery tasks of on-chain settlement, on the verification worker's app.

``market.chain.funding`` (deposits, allowances), ``market.chain.settle`` (slashes,
stakes, pulls, payout rounds) and ``market.chain.anchor`` (Merkle roots of receipts) are
scheduled by ``market.worker.chain_schedule.beat_schedule``. Like the verification tasks
they are acknowledged late and retried with backoff; every step is idempotent (see
``market.onchain.service``).
Before ``aidp-market chain init`` they do nothing (and say so once).
"""

from __future__ import annotations

import logging
from typing import Any

from market.onchain import service
from market.onchain.runtime import ChainNotInitialized
from market.settings import get_settings
from market.worker.celery_app import celery_app
from market.worker.chain_schedule import ANCHOR_TASK, FUNDING_TASK, SETTLE_TASK
from market.worker.tasks import _RETRY, sessions

log = logging.getLogger("market.onchain")

_warned = False


def _run(step: str) -> dict[str, Any]:
    global _warned
    try:
        result = service.run_sync(service.run_steps(get_settings(), sessions(), [step]))
    except ChainNotInitialized as exc:
        if not _warned:
            log.warning("chain settlement idle: %s", exc)
            _warned = True
        return {"idle": str(exc)}
    log.info("chain %s: %s", step, result[step])
    return result[step]


@celery_app.task(name=FUNDING_TASK, **{**_RETRY, "max_retries": 2})
def funding() -> dict[str, Any]:
    return _run("funding")


@celery_app.task(name=SETTLE_TASK, **_RETRY)
def settle() -> dict[str, Any]:
    return _run("settle")


@celery_app.task(name=ANCHOR_TASK, **_RETRY)
def anchor() -> dict[str, Any]:
    return _run("anchor")

