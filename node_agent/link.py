"""The node's outbound WebSocket link to the market (``/v1/node/link``).

The node dials out, so operators open no port. One :class:`NodeLink` keeps one
connection alive: ``hello`` → ``challenge`` → ``auth`` (the nonce signed with the
node's Solana keypair, domain-separated) → ``welcome``; then ``status`` heartbeats at
the interval the market asked for, ``job``s served concurrently up to
``max_concurrency`` (``chunk``… then ``done`` with a signed receipt, or ``error``),
``cancel`` honoured (a job that already produced tokens ends with ``done``, finish
reason ``cancelled`` and a receipt for what was produced). A dropped connection is
redialled with exponential backoff and jitter; jobs in flight on a dropped connection
are abandoned (the market fails them over to another node).

This module keeps the connection and decides which jobs to take; running a job (the
engine, its chunks, its signed receipt) is :mod:`node_agent.worker`'s, which never sees
the socket, so a change to one cannot quietly break the other.

Usable in-process::

    link = NodeLink("http://127.0.0.1:8000", keypair, engine, price=(10, 20))
    task = asyncio.create_task(link.run())
    await link.wait_ready()
    ...
    await link.drain()   # graceful: stop taking jobs, finish in-flight ones, close
    await link.stop()    # now: cancel in-flight jobs, close
    await link.kill()    # crash: drop the socket without a closing frame

Error codes a node sends in ``error``: ``model_not_found``, ``bad_request``,
``busy`` (over ``max_concurrency``), ``draining`` (shutting down; the job was not
started), ``deadline_exceeded``, ``cancelled`` (after the market's ``cancel``, before
any token),
an engine's own code, ``internal``. Jobs failing with ``busy``/``draining`` never
produced a token, so the market can retry them elsewhere invisibly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import websockets
from pydantic import ValidationError
from solders.keypair import Keypair
from websockets.asyncio.client import ClientConnection, connect

from inference.base import Engine
from inference.embedding import SentenceEmbedder
from node_agent import __version__
from node_agent.gpu import GpuMonitor
from node_agent.worker import JobCounters, JobWorker, send_error
from protocol.keys import LINK_AUTH_DOMAIN, canonical_host, link_auth_message, sign
from protocol.messages import (
    Auth,
    Cancel,
    Challenge,
    EmbedJob,
    GpuInfo,
    Hello,
    Job,
    ModelOffer,
    Price,
    Reject,
    Status,
    Welcome,
    encode,
    parse_market_message,
)

log = logging.getLogger("aidp.node.link")

LINK_PATH = "/v1/node/link"
HANDSHAKE_TIMEOUT = 15.0
# the largest frame this node accepts from a market (a market refuses any request whose
# job frame would not fit its own, smaller, limit)
MAX_FRAME_BYTES = 16 << 20

StatusProvider = Callable[[], Mapping[str, Any]]


class LinkRejected(Exception):
    """The market refused this node (``reject``); the reason is the message."""


class LinkProtocolError(Exception):
    """The market sent something out of sequence during the handshake."""


def link_url(market_url: str) -> str:
    """``http://host:port`` (or ws://…) → ``ws://host:port/v1/node/link``."""
    parts = urlsplit(market_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"market URL must be http(s):// or ws(s)://, got {market_url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(LINK_PATH):
        path += LINK_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def _price(price: Price | tuple[int, int] | Mapping[str, int]) -> Price:
    if isinstance(price, Price):
        return price
    if isinstance(price, Mapping):
        return Price(**price)
    return Price(input=price[0], output=price[1])


@dataclass
class LinkStats(JobCounters):
    """The worker's job counts, plus how the connection fared."""

    connections: int = 0
    last_reject: str | None = None
    last_error: str | None = None


class NodeLink:
    """One node's link to one market. See the module docstring."""

    def __init__(
        self,
        market_url: str,
        keypair: Keypair,
        engines: Engine | Iterable[Engine],
        *,
        price: Price | tuple[int, int] | Mapping[str, int] = (0, 0),
        max_concurrency: int = 1,
        region: str = "local",
        status_provider: StatusProvider | None = None,
        gpu_monitor: GpuMonitor | None = None,
        gpus: list[GpuInfo] | None = None,
        agent_version: str = __version__,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        metrics: Any | None = None,
        ssl_context: ssl.SSLContext | None = None,
        embedders: Iterable[SentenceEmbedder] = (),
    ) -> None:
        engine_list = [engines] if isinstance(engines, Engine) else list(engines)
        self.embedders: dict[str, SentenceEmbedder] = {e.model.id: e for e in embedders}
        if not engine_list and not self.embedders:
            raise ValueError("a node needs at least one engine")
        if set(self.embedders) & {e.model.id for e in engine_list}:
            raise ValueError("a model id is offered once: for generation or for embeddings")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.url = link_url(market_url)
        # whom this node works for: the host it dialed, signed at auth and in receipts
        self.market_id = canonical_host(urlsplit(self.url).netloc)
        self.keypair = keypair
        self.pubkey = str(keypair.pubkey())
        self.engines: dict[str, Engine] = {e.model.id: e for e in engine_list}
        self.price = _price(price)
        self.max_concurrency = max_concurrency
        self.region = region
        self.status_provider = status_provider
        self.gpu_monitor = gpu_monitor
        self._gpus = gpus
        self.agent_version = agent_version
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.metrics = metrics
        # wss:// only: whom to trust (None: the system's CAs); ws:// needs none
        self.ssl_context = ssl_context if self.url.startswith("wss://") else None

        self.node_id: str | None = None
        self.heartbeat_interval: float | None = None
        self.stats = LinkStats()
        self.ready = asyncio.Event()  # set while welcomed on a live connection

        self._ws: ClientConnection | None = None
        self._send_lock = asyncio.Lock()
        self._worker = JobWorker(
            engines=self.engines,
            keypair=keypair,
            market_id=self.market_id,
            send=self._send,
            stats=self.stats,
            gpu_monitor=gpu_monitor,
            metrics=metrics,
            embedders=self.embedders,
        )
        self._replies: set[asyncio.Task[None]] = set()  # refusals being sent (kept referenced)
        self._stopping = False
        self._draining = False
        self._wakeup = asyncio.Event()  # interrupts a reconnect backoff
        self._finished = asyncio.Event()  # set when run() returned

    # ---- public control -------------------------------------------------------------

    @property
    def running_jobs(self) -> int:
        return self._worker.running

    @property
    def draining(self) -> bool:
        return self._draining

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the market has welcomed this node."""
        async with asyncio.timeout(timeout):
            await self.ready.wait()

    async def run(self) -> None:
        """Stay connected until ``stop()``, ``drain()`` or ``kill()``."""
        attempt = 0
        self._finished.clear()
        try:
            while not self._stopping:
                welcomed_before = self.stats.connections
                try:
                    await self._session()
                except LinkRejected as exc:
                    self.stats.last_reject = str(exc)
                    log.error("market rejected this node: %s", exc)
                except asyncio.CancelledError:
                    raise
                except (
                    OSError,
                    TimeoutError,
                    websockets.exceptions.WebSocketException,
                    LinkProtocolError,
                    ValidationError,
                ) as exc:
                    self.stats.last_error = f"{exc.__class__.__name__}: {exc}"
                    if not self._stopping:
                        log.warning("link to %s: %s", self.url, self.stats.last_error)
                if self._stopping:
                    break
                attempt = 0 if self.stats.connections > welcomed_before else attempt + 1
                delay = self._backoff(attempt)
                log.info("reconnecting in %.2fs", delay)
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), delay)
        finally:
            self.ready.clear()
            await self._abandon_jobs()
            self._finished.set()

    async def stop(self) -> None:
        """Close now: cancel jobs in flight (the market fails them over), close cleanly."""
        self._stopping = True
        self._wakeup.set()
        await self._abandon_jobs()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting jobs, let the running ones finish (up to ``timeout``), close."""
        self._draining = True
        log.info("draining: %d job(s) in flight", self._worker.running)
        tasks = self._worker.tasks()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        await self.stop()

    async def kill(self) -> None:
        """Simulate a crash: drop the TCP connection without a closing frame or a word."""
        self._stopping = True
        self._wakeup.set()
        ws = self._ws
        self._worker.cancel_all()
        if ws is not None:
            ws.transport.abort()
        await self._abandon_jobs()

    async def wait_closed(self) -> None:
        await self._finished.wait()

    # ---- one connection ------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.backoff_max, self.backoff_initial * (2 ** max(0, attempt - 1)))
        return ceiling * random.uniform(0.5, 1.0)

    def _hello(self) -> Hello:
        gpus = self._gpus
        if gpus is None:
            gpus = self.gpu_monitor.gpu_infos() if self.gpu_monitor is not None else []
        return Hello(
            pubkey=self.pubkey,
            agent_version=self.agent_version,
            models=[
                ModelOffer(
                    id=e.model.id,
                    sha256=e.model.sha256,
                    engine=e.name,
                    quantization=e.model.quantization,
                    context_length=e.model.context_length,
                    capabilities=e.capabilities(),
                )
                for e in self.engines.values()
            ] + [
                ModelOffer(id=e.model.id, sha256=e.model.sha256, engine=e.name,
                           context_length=e.model.context_length, task="embedding",
                           dimensions=e.dimensions)
                for e in self.embedders.values()
            ],
            gpus=gpus,
            price=self.price,
            max_concurrency=self.max_concurrency,
            region=self.region,
        )

    async def _session(self) -> None:
        async with connect(
            self.url,
            open_timeout=HANDSHAKE_TIMEOUT,
            ping_interval=20,
            ping_timeout=20,
            close_timeout=5,
            compression=None,
            max_size=MAX_FRAME_BYTES,
            **({"ssl": self.ssl_context} if self.ssl_context is not None else {}),
        ) as ws:
            self._ws = ws
            try:
                await self._handshake(ws)
                heartbeat = asyncio.create_task(self._heartbeat_loop(), name="node-heartbeat")
                try:
                    async for raw in ws:
                        self._dispatch(raw)
                finally:
                    heartbeat.cancel()
                    self.ready.clear()
                    # A closed connection cannot carry their chunks: the market fails them over.
                    await self._abandon_jobs()
            finally:
                self._ws = None

    async def _handshake(self, ws: ClientConnection) -> None:
        await self._send(self._hello())
        first = parse_market_message(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT))
        if isinstance(first, Reject):
            raise LinkRejected(first.reason)
        if not isinstance(first, Challenge):
            raise LinkProtocolError(f"expected challenge, got {first.type}")
        try:
            nonce = bytes.fromhex(first.nonce)
        except ValueError:
            raise LinkProtocolError("challenge nonce is not hex") from None
        if len(nonce) < 16:  # a short nonce would make the signature replayable
            raise LinkProtocolError(f"challenge nonce of {len(nonce)} bytes is too short")
        signature = sign(self.keypair, LINK_AUTH_DOMAIN, link_auth_message(self.market_id, nonce))
        await self._send(Auth(signature=signature))
        second = parse_market_message(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT))
        if isinstance(second, Reject):
            raise LinkRejected(second.reason)
        if not isinstance(second, Welcome):
            raise LinkProtocolError(f"expected welcome, got {second.type}")
        if second.market_id != self.market_id:
            raise LinkProtocolError(
                f"the market calls itself {second.market_id!r}, this node dialed "
                f"{self.market_id!r}")
        self.node_id = second.node_id
        self.heartbeat_interval = second.heartbeat_interval
        self.stats.connections += 1
        self.ready.set()
        log.info(
            "linked to %s as node %s (heartbeat %.1fs)",
            self.url,
            self.node_id,
            self.heartbeat_interval,
        )

    async def _send(self, message: Any) -> None:
        ws = self._ws
        if ws is None:
            raise websockets.exceptions.ConnectionClosedError(None, None)
        data = encode(message)
        async with self._send_lock:
            await ws.send(data)

    async def _status(self) -> Status:
        extra: dict[str, Any] = {}
        if self.status_provider is not None:
            extra = dict(self.status_provider())
        elif self.gpu_monitor is not None and self.gpu_monitor.available:
            extra["gpus"] = await asyncio.to_thread(self.gpu_monitor.samples)
        return Status(
            running=self._worker.running,
            queued=0,
            tokens_per_s=self.stats.tokens_per_s(),
            **extra,
        )

    async def _heartbeat_loop(self) -> None:
        interval = max(0.05, self.heartbeat_interval or 5.0)
        while True:
            try:
                await self._send(await self._status())
            except websockets.exceptions.ConnectionClosed:
                return
            except Exception:  # a broken status provider must not kill the link
                log.exception("status heartbeat failed")
            await asyncio.sleep(interval)

    def _dispatch(self, raw: str | bytes) -> None:
        try:
            message = parse_market_message(raw)
        except ValidationError as exc:
            log.warning("ignoring a malformed frame from the market: %s", exc.errors()[:1])
            self._refuse_malformed_job(raw)
            return
        if isinstance(message, Job | EmbedJob):
            self._accept(message)
        elif isinstance(message, Cancel):
            self._worker.cancel(message.job_id)
        else:
            log.warning("ignoring an unexpected %s frame", message.type)

    # ---- refusing jobs ---------------------------------------------------------------

    def _refuse_malformed_job(self, raw: str | bytes) -> None:
        """A job frame that names its job but asks for something no engine can serve is
        answered ``bad_request`` at once, so the market fails over instead of waiting."""
        try:
            frame = json.loads(raw)
        except ValueError:
            return
        job_id = frame.get("job_id") if isinstance(frame, dict) else None
        if (
            frame.get("type") in ("job", "embed")
            and isinstance(job_id, str)
            and not self._worker.is_running(job_id)
        ):
            self.stats.jobs_failed += 1
            self._reply_error(job_id, "bad_request", "the job request is not valid")

    def _reply_error(self, job_id: str, code: str, message: str) -> None:
        reply = asyncio.create_task(self._send_error(job_id, code, message))
        self._replies.add(reply)
        reply.add_done_callback(self._replies.discard)

    def _accept(self, job: Job | EmbedJob) -> None:
        refusal = self._refusal(job)
        if refusal is not None:
            self.stats.jobs_failed += 1
            self._reply_error(job.job_id, *refusal)
            return
        self._worker.start(job)

    def _refusal(self, job: Job | EmbedJob) -> tuple[str, str] | None:
        """``(code, message)`` when this node will not start ``job`` now."""
        if self._worker.is_running(job.job_id):
            return ("duplicate_job", f"job {job.job_id} is already running here")
        if self._draining or self._stopping:
            return ("draining", "node is shutting down")
        if self._worker.running >= self.max_concurrency:
            return ("busy", f"node is at max_concurrency={self.max_concurrency}")
        return None

    async def _send_error(self, job_id: str, code: str, message: str) -> None:
        await send_error(self._send, job_id, code, message)

    async def _abandon_jobs(self) -> None:
        await self._worker.abandon()
