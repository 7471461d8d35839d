"""Fixtures for node-agent tests: keypairs, a protocol-conformant market peer, shared engines."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair
from websockets.asyncio.server import ServerConnection, serve

from protocol.job import InvalidJobRequest, JobRequest
from protocol.keys import LINK_AUTH_DOMAIN, link_auth_message, verify
from protocol.messages import (
    Challenge,
    Hello,
    Reject,
    Welcome,
    encode,
    parse_node_message,
)


@pytest.fixture(autouse=True)
def _aidp_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep weights-hash caches out of the developer's home directory."""
    monkeypatch.setenv("AIDP_NODE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "aidp-cache"))


@pytest.fixture
def keypair() -> Keypair:
    return Keypair()


class MarketPeer:
    """The market's side of ``/v1/node/link``, just enough to exercise a real NodeLink.

    It checks the handshake like the market must (signature over the nonce), records
    every frame a node sends, and lets a test send jobs and cancels.
    """

    def __init__(self, heartbeat_interval: float = 0.1, reject_reason: str | None = None,
                 welcome_market_id: str | None = None) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.reject_reason = reject_reason
        self.welcome_market_id = welcome_market_id  # a market that names itself otherwise
        self.hellos: list[Hello] = []
        self.auth_ok: list[bool] = []
        self.frames: dict[str, list[Any]] = defaultdict(list)  # job_id -> frames
        self.statuses: list[Any] = []
        self.connections: list[ServerConnection] = []
        self.connected = asyncio.Event()
        self.job_events: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.port = 0
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> MarketPeer:
        self._server = await serve(self._handle, "127.0.0.1", 0, compression=None)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, ws: ServerConnection) -> None:
        hello = parse_node_message(await ws.recv())
        assert isinstance(hello, Hello)
        self.hellos.append(hello)
        if self.reject_reason:
            await ws.send(encode(Reject(reason=self.reject_reason)))
            return
        nonce = secrets.token_bytes(32)
        await ws.send(encode(Challenge(nonce=nonce.hex())))
        auth = parse_node_message(await ws.recv())
        market_id = f"127.0.0.1:{ws.local_address[1]}"  # the market identity it was dialed at
        signed = link_auth_message(market_id, nonce)
        ok = verify(hello.pubkey, LINK_AUTH_DOMAIN, signed, getattr(auth, "signature", ""))
        self.auth_ok.append(ok)
        if not ok:
            await ws.send(encode(Reject(reason="bad signature")))
            return
        await ws.send(
            encode(
                Welcome(
                    node_id=f"node-{len(self.hellos)}", heartbeat_interval=self.heartbeat_interval,
                    market_id=self.welcome_market_id or market_id, max_frame_bytes=1 << 22,
                )
            )
        )
        self.connections.append(ws)
        self.connected.set()
        async for raw in ws:
            frame = parse_node_message(raw)
            if frame.type == "status":
                self.statuses.append(frame)
                continue
            self.frames[frame.job_id].append(frame)
            if frame.type in ("done", "error"):
                self.job_events[frame.job_id].set()
            else:
                self.job_events[frame.job_id + ":chunk"].set()

    async def send(self, message: Any, connection: int = -1) -> None:
        await self.connections[connection].send(encode(message))

    async def job(
        self,
        job_id: str,
        body: dict[str, Any],
        *,
        kind: str = "chat",
        model: str = "test-model",
        deadline: float = 0.0,
        **extra: Any,
    ) -> None:
        """Send a job built from an OpenAI ``body``; a body no job can be built from is
        sent as it is (the node must refuse it)."""
        try:
            request = JobRequest.from_openai(kind, {**body, "model": model}).model_dump()
        except InvalidJobRequest:
            request = {"kind": kind, "model": model, **body}
        frame = {"type": "job", "job_id": job_id, "request": request, "deadline": deadline,
                 **extra}
        await self.connections[-1].send(json.dumps(frame))

    async def wait_end(self, job_id: str, timeout: float = 30.0) -> Any:
        await asyncio.wait_for(self.job_events[job_id].wait(), timeout)
        return self.frames[job_id][-1]

    def text(self, job_id: str) -> str:
        return "".join(f.text for f in self.frames[job_id] if f.type == "chunk")

    def token_ids(self, job_id: str) -> list[int]:
        return [t for f in self.frames[job_id] if f.type == "chunk" for t in f.token_ids]


@pytest.fixture
async def market_peer() -> Any:
    async with MarketPeer() as peer:
        yield peer


def cpu_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


# ---- the real market (market.app.create_app) in a uvicorn thread ------------------------

ADMIN_TOKEN = "node-test-admin"


class RealMarket:
    def __init__(self, db_path: str, **overrides: Any) -> None:
        import threading

        import uvicorn

        from market.app import create_app
        from market.settings import MarketSettings, nested
        from tests.support.net import free_port

        self.port = free_port()
        from inference.fake import fake_sha256

        values: dict[str, Any] = {
            "db__url": f"sqlite:///{db_path}",
            "data_dir": str(Path(db_path).parent),
            # the deterministic engine's test model; SmolLM2 is listed by default
            "models": {"node-it-model": {"sha256": [fake_sha256("node-it-model")],
                                         "vocabulary": "fake"}},
            "host": "127.0.0.1",
            "port": self.port,
            "admin_token": ADMIN_TOKEN,
            "routing__heartbeat_interval": 0.5,
            "routing__job_first_token_timeout": 30.0,
            "limits__rate_limit_rpm": 1_000_000,
            "verify__challenge_window_s": 3600.0,
        }
        values.update(overrides)
        self.settings = MarketSettings(**nested(values))
        self.app = create_app(self.settings)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            ws_ping_interval=None,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RealMarket:
        import time

        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("market server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def buyer_key(self, credit: int = 10**12) -> str:
        import httpx

        with httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        ) as client:
            account = (
                client.post("/admin/accounts", json={"name": "node-tests"})
                .raise_for_status()
                .json()
            )
            client.post(
                f"/admin/accounts/{account['id']}/credit", json={"amount": credit}
            ).raise_for_status()
            key = client.post(f"/admin/accounts/{account['id']}/keys", json={"name": "t"})
            return str(key.raise_for_status().json()["key"])

    def receipts(self) -> list[Any]:
        from sqlalchemy import select

        from market.models import Receipt

        with self.app.state.market.db.session() as session:
            return list(session.execute(select(Receipt)).scalars())


@pytest.fixture(scope="module")
def real_market(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("market.app")
    market = RealMarket(str(tmp_path_factory.mktemp("market") / "market.db")).start()
    try:
        yield market
    finally:
        market.stop()
