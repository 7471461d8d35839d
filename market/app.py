"""The market's ASGI app: ``create_app(settings)``.

Start-up (lifespan): ``alembic upgrade head``, open the database, write and read the
model listings, fail jobs a crashed process left running past their deadline
(releasing their holds), learn the models nodes have offered, start the monitor: node
health, stats, listings and the hold sweeper, all periodic. Every router the app
serves is listed once in :data:`ROUTERS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from market import secret_store
from market.api import admin as admin_api
from market.api import chain as chain_api
from market.api import openai as openai_api
from market.api import responses as responses_api
from market.api import verification as verification_api
from market.api.gate import Gate
from market.api.request_id import RequestId
from market.db import Database
from market.errors import install_handlers
from market.explorer import routes as explorer_routes
from market.gateway.node_link import node_link
from market.gateway.ratelimit import RateLimiter
from market.gateway.registry import NodeRegistry
from market.gateway.router import Router
from market.gateway.state import MarketState
from market.listing import Catalog, open_catalog
from market.listing import refresh as refresh_listings
from market.metrics import Metrics
from market.models import Node, NodeModel, utcnow
from market.money import billing
from market.settings import MarketSettings, exposure_problem, get_settings
from market.writer import BatchWriter
from protocol.runtime import tune_for_latency

log = logging.getLogger("market.app")

# Every APIRouter the app serves, in order.
ROUTERS: list[APIRouter] = [
    openai_api.router,
    responses_api.router,
    admin_api.router,
    verification_api.router,
    chain_api.router,
    explorer_routes.router,
]

FLUSH_EVERY_S = 5.0


def _include_routers(app: FastAPI) -> None:
    for router in ROUTERS:
        app.include_router(router)


def sweep_holds(session: Session, settings: MarketSettings,
                skip: frozenset[str] = frozenset()) -> int:
    """Finalize jobs past their deadline (but ``skip``, whose finalize this process is
    still retrying); returns how many holds were released."""
    now = utcnow()
    grace = settings.routing.cancel_receipt_timeout_s + settings.routing.hold_sweep_grace_s
    released = billing.release_expired_jobs(
        session, now, grace_s=grace,
        legacy_before=now - timedelta(seconds=settings.routing.job_stale_after_s), skip=skip)
    if released:
        log.warning("released the holds of %d job(s) that ended without finalizing", released)
    return released


def _recover(db: Database, settings: MarketSettings) -> set[str]:
    with db.session() as session:
        secret_store.get_or_create(session, secret_store.SAMPLING_KEY)  # made at first start
    with db.session() as session:
        sweep_holds(session, settings)
        return set(session.execute(select(NodeModel.model_id).distinct()).scalars())


async def _monitor(state: MarketState) -> None:
    """Mark silent nodes unhealthy; persist observed stats every few seconds."""
    settings = state.settings
    interval = max(0.05, min(1.0, settings.routing.heartbeat_interval / 4))
    loop = asyncio.get_running_loop()
    last_flush = last_sweep = loop.time()
    while True:
        await asyncio.sleep(interval)
        try:
            for conn in state.registry.check_health(
                settings.routing.heartbeat_interval, settings.routing.node_unhealthy_after_intervals
            ):
                log.warning("node %s is silent; marked unhealthy", conn.node_id)
            healthy, unhealthy = state.registry.counts()
            state.metrics.nodes.labels("healthy").set(healthy)
            state.metrics.nodes.labels("unhealthy").set(unhealthy)
            if loop.time() - last_flush >= FLUSH_EVERY_S:
                last_flush = loop.time()
                await _flush(state)
                await refresh_listings(state.catalog, state.db)
            if loop.time() - last_sweep >= settings.routing.hold_sweep_interval_s:
                last_sweep = loop.time()
                skip = frozenset(state.finalizing)
                await state.writer.submit(lambda session: sweep_holds(session, settings, skip))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("node monitor iteration failed")


async def _flush(state: MarketState) -> None:
    conns = list(state.registry.links.values())
    if not conns:
        return
    now, mono = utcnow(), time.monotonic()
    rows = [
        {
            "id": c.node_id,
            "last_seen_at": now - timedelta(seconds=mono - c.last_heartbeat),
            "ttft_ms": c.ttft_ms,
            "tokens_per_s": c.tokens_per_s,
            "failure_rate": c.failure_rate,
            "jobs_failed": c.jobs_failed,
        }
        for c in conns
    ]
    fresh = await state.writer.submit(lambda session: _flush_nodes(session, rows))
    for conn in conns:
        if conn.node_id in fresh:
            conn.reputation, conn.suspended = fresh[conn.node_id]


async def _preload_vocabulary(catalog: Catalog, model_id: str) -> None:
    with contextlib.suppress(Exception):  # logged by the catalog; requests see 503
        await catalog.vocabulary(model_id)


def _flush_nodes(session: Session, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Write observed node stats; read back reputation and suspension (verification's)."""
    for row in rows:
        values = {k: v for k, v in row.items() if k != "id"}
        session.execute(update(Node).where(Node.id == row["id"]).values(**values))
    result = session.execute(
        select(Node.id, Node.reputation, Node.suspended).where(
            Node.id.in_([row["id"] for row in rows])
        )
    ).all()
    return {r[0]: (float(r[1]), bool(r[2])) for r in result}


def create_app(settings: MarketSettings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.migrate_on_start:
            from market.migrate import upgrade

            await asyncio.to_thread(upgrade, settings.db.url)
        db = Database(settings.db.url)
        catalog = await open_catalog(db, settings)
        registry = NodeRegistry()
        registry.known_models.update(await asyncio.to_thread(_recover, db, settings))
        state = MarketState(
            catalog=catalog,
            settings=settings,
            db=db,
            registry=registry,
            router=Router(registry),
            metrics=Metrics(),
            ratelimiter=RateLimiter(settings.limits.rate_limit_rpm),
            writer=BatchWriter(db),
        )
        state.writer.start()
        app.state.market = state
        for model_id in list(catalog.listings):  # read vocabularies before the first request
            state.spawn(_preload_vocabulary(catalog, model_id))
        monitor = asyncio.create_task(_monitor(state), name="node-monitor")
        try:
            yield
        finally:
            monitor.cancel()
            with contextlib.suppress(Exception):
                await _flush(state)
            for conn in list(registry.links.values()):
                with contextlib.suppress(Exception):
                    await conn.ws.close(code=1001)
            if state.background:
                await asyncio.wait(list(state.background), timeout=5)
            await state.writer.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
            await db.dispose()

    app = FastAPI(
        title="Neural Cloud market",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible inference marketplace gateway",
    )
    install_handlers(app)
    app.add_middleware(Gate)
    app.add_middleware(RequestId)  # added last: outermost, so every response has one
    _include_routers(app)
    app.add_api_websocket_route("/v1/node/link", node_link)

    @app.get("/healthz", include_in_schema=False)
    async def healthz(request: Request) -> dict[str, Any]:
        state: MarketState = request.app.state.market
        healthy, unhealthy = state.registry.counts()
        return {"status": "ok", "nodes": {"healthy": healthy, "unhealthy": unhealthy}}

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> PlainTextResponse:
        state: MarketState = request.app.state.market
        return PlainTextResponse(
            generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    return app


def serving_app(settings: MarketSettings | None = None) -> FastAPI:
    """The app for a process that is the market's own (``aidp-market serve``, uvicorn's
    ``--factory``): built, then the process tuned for latency (``protocol.runtime``)
    unless ``latency_tuning`` is off. In-process servers (tests) use :func:`create_app`."""
    settings = settings or get_settings()
    if (problem := exposure_problem(settings, settings.host)) is not None:
        raise RuntimeError(problem)
    app = create_app(settings)
    if settings.latency_tuning:
        log.info("tuned for latency; start-up heap frozen: %d objects", tune_for_latency())
    return app


def app_factory() -> FastAPI:
    """For ``uvicorn --factory market.app:app_factory``."""
    return serving_app()
