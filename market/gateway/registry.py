"""Connected nodes: one :class:`NodeConn` per live link, and the registry of them.

A connection holds the websocket, the node's offer (models, price, concurrency), its
last heartbeat, its in-flight jobs (job id → ``asyncio.Queue`` that the link's reader
task fills with ``chunk``/``done``/``error``), and what the market observed about it
(TTFT, tokens/s, failure rate; EWMAs). The router reads these; a health monitor marks
silent nodes unhealthy and fails their in-flight jobs over.

Capacity a node advertises is a claim, not a fact: a node that refuses work it
advertised (``busy``, ``draining``) or lets a job time out pays like a failure, and
after ``quarantine_after`` such misses in a row (a timeout counts as that many at once)
it sits out of routing for a while, twice as long on each repeat. Its advertised
``max_concurrency`` counts only up to the market's cap.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from protocol.messages import Hello, JobError, ModelOffer, Status, encode

EWMA_ALPHA = 0.2
# frames a job may have waiting for its consumer (a buyer reading slowly); past this the
# node is flooding it and the job fails over
MAX_QUEUED_PER_JOB = 4096


def ewma(previous: float | None, value: float, alpha: float = EWMA_ALPHA) -> float:
    return value if previous is None else previous + alpha * (value - previous)


@dataclass
class NodeConn:
    node_id: str
    pubkey: str
    hello: Hello
    ws: Any  # starlette WebSocket
    reputation: float = 0.5
    suspended: bool = False
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    failure_rate: float = 0.0
    jobs_total: int = 0
    jobs_failed: int = 0
    status: Status | None = None
    last_heartbeat: float = field(default_factory=time.monotonic)
    connected_at: int = field(default_factory=lambda: int(time.time()))  # unix seconds
    healthy: bool = True
    closed: bool = False
    inflight: dict[str, asyncio.Queue[Any]] = field(default_factory=dict)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    concurrency_cap: int = 64
    quarantine_after: int = 3
    quarantine_s: float = 30.0
    misses_in_a_row: int = 0  # refusals, failures and timeouts since the last success
    quarantines: int = 0
    quarantined_until: float = 0.0
    models: dict[str, ModelOffer] = field(init=False)

    def __post_init__(self) -> None:
        self.models = {m.id: m for m in self.hello.models}

    @property
    def price_in(self) -> int:
        return self.hello.price.input

    @property
    def price_out(self) -> int:
        return self.hello.price.output

    @property
    def max_concurrency(self) -> int:
        return max(1, min(self.hello.max_concurrency, self.concurrency_cap))

    @property
    def load(self) -> float:
        """Busy share of the node's capacity (0 idle … 1 full), from the market's view
        (jobs it has in flight there) and the node's own last report."""
        reported = (self.status.running + self.status.queued) if self.status else 0
        return max(len(self.inflight), reported) / self.max_concurrency

    @property
    def quarantined(self) -> bool:
        return self.quarantined_until > time.monotonic()

    @property
    def available(self) -> bool:
        return self.healthy and not self.closed and not self.suspended and not self.quarantined

    @property
    def has_capacity(self) -> bool:
        return len(self.inflight) < self.max_concurrency

    async def send(self, message: Any) -> None:
        data = encode(message)
        async with self.send_lock:
            await self.ws.send_text(data)

    def route(self, job_id: str, message: Any) -> None:
        queue = self.inflight.get(job_id)
        if queue is None:
            return
        if queue.qsize() < MAX_QUEUED_PER_JOB:
            queue.put_nowait(message)
        elif queue.qsize() == MAX_QUEUED_PER_JOB:  # once: the rest is dropped
            queue.put_nowait(JobError(job_id=job_id, code="flooding",
                                      message=f"more than {MAX_QUEUED_PER_JOB} frames waiting"))

    def fail_inflight(self, code: str, message: str) -> None:
        """Push a synthetic error into every in-flight job (link lost / node silent)."""
        for job_id, queue in list(self.inflight.items()):
            queue.put_nowait(JobError(job_id=job_id, code=code, message=message))

    def observe_success(self, ttft_s: float | None, tokens: int, gen_s: float) -> None:
        if ttft_s is not None:
            self.ttft_ms = ewma(self.ttft_ms, ttft_s * 1000.0)
        if tokens > 1 and gen_s > 0:
            self.tokens_per_s = ewma(self.tokens_per_s, tokens / gen_s)
        self.failure_rate = ewma(self.failure_rate, 0.0)
        self.jobs_total += 1
        self.misses_in_a_row = 0

    def observe_failure(self, weight: int = 1) -> None:
        """A job the node failed, refused or let time out (``weight`` misses at once)."""
        self.failure_rate = ewma(self.failure_rate, 1.0)
        self.jobs_failed += 1
        self.misses_in_a_row += weight
        if self.misses_in_a_row >= self.quarantine_after:
            self.misses_in_a_row = 0
            factor = min(20.0, 2.0 ** self.quarantines)
            self.quarantines += 1
            self.quarantined_until = time.monotonic() + self.quarantine_s * factor


def _standing_of(conn: NodeConn) -> tuple[int, int, float]:
    return conn.misses_in_a_row, conn.quarantines, conn.quarantined_until


class NodeRegistry:
    def __init__(self) -> None:
        self.links: dict[str, NodeConn] = {}
        self.known_models: set[str] = set()
        self._changed = asyncio.Event()
        # a node's misses and sit-outs outlive its link: reconnecting does not wipe them
        self._standing: dict[str, tuple[int, int, float]] = {}

    def notify(self) -> None:
        """Capacity or membership changed: wake jobs waiting for a free node."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    def add(self, conn: NodeConn) -> NodeConn | None:
        """Register a link; returns the older link of the same node, if any (to close)."""
        previous = self.links.get(conn.node_id)
        standing = (self._standing.pop(conn.node_id, None) if previous is None
                    else _standing_of(previous))
        if standing is not None:
            conn.misses_in_a_row, conn.quarantines, conn.quarantined_until = standing
        self.links[conn.node_id] = conn
        self.known_models.update(conn.models)
        self.notify()
        return previous

    def remove(self, conn: NodeConn) -> None:
        conn.closed = True
        if self.links.get(conn.node_id) is conn:
            del self.links[conn.node_id]
            if conn.misses_in_a_row or conn.quarantines:
                self._standing[conn.node_id] = _standing_of(conn)
        self.notify()

    def serving(self, model: str) -> list[NodeConn]:
        return [c for c in self.links.values() if model in c.models]

    def available_models(self) -> dict[str, list[NodeConn]]:
        out: dict[str, list[NodeConn]] = {}
        for conn in self.links.values():
            if conn.available:
                for model_id in conn.models:
                    out.setdefault(model_id, []).append(conn)
        return out

    def counts(self) -> tuple[int, int]:
        healthy = sum(1 for c in self.links.values() if c.available)
        return healthy, len(self.links) - healthy

    def check_health(self, heartbeat_interval: float, unhealthy_after: float) -> list[NodeConn]:
        """Mark nodes silent for ``unhealthy_after`` intervals unhealthy (and fail their
        jobs over); mark ones heard from again healthy. Returns nodes newly unhealthy."""
        now = time.monotonic()
        limit = heartbeat_interval * unhealthy_after
        newly: list[NodeConn] = []
        for conn in list(self.links.values()):
            silent = now - conn.last_heartbeat > limit
            if silent and conn.healthy:
                conn.healthy = False
                newly.append(conn)
                conn.fail_inflight("node_unhealthy", "node stopped sending heartbeats")
            elif not silent and not conn.healthy:
                conn.healthy = True
        return newly
