"""A real market for tests: uvicorn in a thread on SQLite or PostgreSQL, buyers created
through the admin API, real node links. Test packages re-export the fixtures from
their conftest.

Every test module runs once per database (``db_url`` is parametrized): SQLite in a
temporary file, PostgreSQL in a fresh schema dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from solders.keypair import Keypair

from market.app import create_app
from market.settings import MarketSettings, nested
from node_agent.link import NodeLink
from tests.support.db import postgres_schema
from tests.support.engines import DeterministicEngine, collect
from tests.support.net import free_port

ADMIN_TOKEN = "test-admin-token"
_OPEN_CLIENTS: list[openai.AsyncOpenAI] = []
HEARTBEAT = 0.2


# ---- databases --------------------------------------------------------------------------


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("market-db") / "market.db"
        yield f"sqlite:///{path}"
        return
    with postgres_schema(request.getfixturevalue("postgres_url")) as url:
        yield url


# ---- the server --------------------------------------------------------------------------


@dataclass
class Market:
    url: str
    app: Any
    settings: MarketSettings
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    @property
    def state(self) -> Any:
        return self.app.state.market

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        )

    def buyer(self, credit: int = 10**12, name: str = "buyer") -> Buyer:
        with self.admin() as client:
            account = client.post("/admin/accounts", json={"name": name}).raise_for_status().json()
            if credit:
                client.post(f"/admin/accounts/{account['id']}/credit",
                            json={"amount": credit}).raise_for_status()
            key = client.post(f"/admin/accounts/{account['id']}/keys", json={"name": "t"})
            return Buyer(account_id=account["id"], key=key.raise_for_status().json()["key"],
                         market=self)

    def list_model(self, model_id: str, sha256: str, vocabulary: str = "fake",
                   context_length: int = 8192) -> None:
        """List a model on this market (as its operator does) so nodes may offer it."""
        with self.admin() as client:
            client.put(f"/admin/models/{model_id}", json={
                "sha256": [sha256], "vocabulary": vocabulary,
                "context_length": context_length}).raise_for_status()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@dataclass
class Buyer:
    account_id: str
    key: str
    market: Market

    def client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        """An async SDK client, closed by the ``_close_clients`` fixture after the test."""
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60)
        client = openai.AsyncOpenAI(base_url=self.market.api, api_key=self.key, **kwargs)
        _OPEN_CLIENTS.append(client)
        return client

    def sync_client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60)
        return openai.OpenAI(base_url=self.market.api, api_key=self.key, **kwargs)

    def get(self, path: str) -> dict[str, Any]:
        response = httpx.get(f"{self.market.url}{path}",
                             headers={"Authorization": f"Bearer {self.key}"}, timeout=30)
        return response.raise_for_status().json()


def start_market(db_url: str, **overrides: Any) -> Market:
    port = free_port()
    values: dict[str, Any] = {
        "db__url": db_url,
        "data_dir": tempfile.mkdtemp(prefix="aidp-market-"),
        "host": "127.0.0.1",
        "port": port,
        "admin_token": ADMIN_TOKEN,
        "routing__heartbeat_interval": HEARTBEAT,
        "routing__job_first_token_timeout": 10.0,
        "limits__rate_limit_rpm": 100_000,
        "routing__sse_keepalive_s": 1.0,
        "verify__challenge_window_s": 3600.0,
    }
    values.update(overrides)
    settings = MarketSettings(**nested(values))
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            ws_ping_interval=None, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"market-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("market server did not start")
        time.sleep(0.02)
    _wait_preloaded(app)
    return Market(url=f"http://127.0.0.1:{port}", app=app, settings=settings, server=server,
                  thread=thread)


def _wait_preloaded(app: Any, timeout: float = 60.0) -> None:
    """Let the market finish reading its listed vocabularies (it does at start, in
    threads) before a test times node heartbeats against it at test speed (0.2 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = getattr(app.state, "market", None)
        catalog = getattr(state, "catalog", None)
        if catalog is not None and not catalog._loading and all(
                model in catalog._vocabularies for model in catalog.listings):
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def market(db_url: str) -> Iterator[Market]:
    m = start_market(db_url)
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def buyer(market: Market) -> Buyer:
    return market.buyer()


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _OPEN_CLIENTS:
        await _OPEN_CLIENTS.pop().close()


# ---- nodes ---------------------------------------------------------------------------------


async def stop_link(link: NodeLink, task: asyncio.Task[None]) -> None:
    """Take down a link a test started by hand: stop it, then cancel its run task and
    wait for it, whatever it ends with, so no task outlives the test."""
    await link.stop()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


@dataclass
class Nodes:
    market: Market
    links: list[tuple[NodeLink, asyncio.Task[None]]] = field(default_factory=list)

    async def start(
        self,
        model: str,
        *,
        engine: Any = None,
        price: tuple[int, int] = (100, 200),
        max_concurrency: int = 8,
        token_delay: float = 0.0,
        keypair: Keypair | None = None,
        listed: bool = True,
    ) -> NodeLink:
        engine = engine or DeterministicEngine(model_id=model, token_delay=token_delay)
        if listed and isinstance(engine, DeterministicEngine):
            self.market.list_model(model, engine.model.sha256)
        link = NodeLink(self.market.url, keypair or Keypair(), engine, price=price,
                        max_concurrency=max_concurrency, backoff_initial=0.05, backoff_max=0.5)
        task = asyncio.create_task(link.run())
        self.links.append((link, task))
        await link.wait_ready(timeout=15)
        # the market registers the link before it sends welcome; wait until routable
        await wait_for(lambda: link.node_id in self.market.state.registry.links)
        return link

    async def start_embedder(self, embedder: Any, *, price: tuple[int, int] = (100, 200),
                             keypair: Keypair | None = None) -> NodeLink:
        """A node serving only ``embedder`` (a started ``SentenceEmbedder``)."""
        link = NodeLink(self.market.url, keypair or Keypair(), [], price=price,
                        max_concurrency=4, backoff_initial=0.05, backoff_max=0.5,
                        embedders=[embedder])
        task = asyncio.create_task(link.run())
        self.links.append((link, task))
        await link.wait_ready(timeout=15)
        await wait_for(lambda: link.node_id in self.market.state.registry.links)
        return link

    async def close(self) -> None:
        for link, task in self.links:
            with contextlib.suppress(Exception):
                await link.stop()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self.links.clear()


@pytest.fixture
async def nodes(market: Market) -> AsyncIterator[Nodes]:
    group = Nodes(market)
    try:
        yield group
    finally:
        await group.close()


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval)


def unique_model(prefix: str = "m") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


async def serve_smol(market: Market, nodes: Nodes, n_ctx: int = 2048) -> str:
    """A real llama.cpp node on a freshly listed copy of SmolLM2 (its GGUF vocabulary)."""
    from inference.llamacpp import LlamaCppEngine, default_gguf

    model = unique_model("smol")
    engine = LlamaCppEngine(model_id=model, n_ctx=n_ctx, n_threads=2)
    await engine.start()
    market.list_model(model, engine.model.sha256, vocabulary=f"gguf:{default_gguf()}",
                      context_length=n_ctx)
    await nodes.start(model, engine=engine)
    return model


async def expected_output(kind: str, model: str, max_tokens: int, *, messages: Any = None,
                          prompt: str | None = None) -> tuple[str, list[int]]:
    """What one healthy node produces for this request (the deterministic reference)."""
    from inference.convert import generation_request

    engine = DeterministicEngine(model_id=model)
    body = {"messages": messages} if kind == "chat" else {"prompt": prompt}
    request = generation_request(kind, {**body, "max_tokens": max_tokens})
    text, ids, _ = await collect(engine, request)
    return text, ids
