"""The market's process-wide state, built by the app's lifespan (``app.state.market``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from market.db import Database
from market.gateway.funds import FundsCache
from market.gateway.ratelimit import RateLimiter
from market.gateway.registry import NodeRegistry
from market.gateway.router import Router
from market.listing import Catalog
from market.metrics import Metrics
from market.settings import MarketSettings
from market.writer import BatchWriter


@dataclass
class MarketState:
    settings: MarketSettings
    db: Database
    registry: NodeRegistry
    router: Router
    metrics: Metrics
    ratelimiter: RateLimiter
    writer: BatchWriter
    catalog: Catalog = field(default_factory=Catalog)
    funds: FundsCache = field(default_factory=FundsCache)
    pending_handshakes: int = 0  # node links not authenticated yet
    pending_by_peer: dict[str, int] = field(default_factory=dict)  # ... by client address
    # jobs whose finalize is being retried (the hold sweeper leaves them alone)
    finalizing: set[str] = field(default_factory=set)
    # key sha256 -> (key id, account id, expires at monotonic)
    key_cache: dict[str, tuple[str, str, float]] = field(default_factory=dict)
    # key sha256 -> the lookup in flight for it (concurrent misses share one query)
    key_lookups: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, coro: Any, name: str | None = None) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coro, name=name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task
