"""Celery beat entries of the chain tasks (kept free of Celery imports so the app's
``configure`` can merge them without an import cycle)."""

from __future__ import annotations

from typing import Any

from market.settings import MarketSettings

FUNDING_TASK = "market.chain.funding"
SETTLE_TASK = "market.chain.settle"
ANCHOR_TASK = "market.chain.anchor"
TASKS_MODULE = "market.worker.chain_tasks"


def beat_schedule(settings: MarketSettings) -> dict[str, dict[str, Any]]:
    def entry(task: str, every: float) -> dict[str, Any]:
        return {"task": task, "schedule": every, "options": {"expires": max(1.0, every * 2)}}

    return {
        "chain-funding": entry(FUNDING_TASK, settings.chain.deposit_interval_s),
        "chain-settle": entry(SETTLE_TASK, settings.chain.settle_interval_s),
        "chain-anchor": entry(ANCHOR_TASK, settings.chain.anchor_interval_s),
    }
