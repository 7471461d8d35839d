"""Run one embedding job on the network: send it to a node, check what comes back.

An embedding job is one frame each way (``embed`` → ``embedded``), so there is no
stream to relay and no mid-stream failover: a node that errors, refuses, goes silent
or answers with anything the market cannot accept is replaced by another one (up to
``max_attempts_before_first_token`` nodes) and counted against. What is accepted:

* the vectors are exactly one per input, of the listed model's width, finite
  (``protocol.embedding.decode_vectors``), and of unit length where the model's are;
* the receipt passes the cheap checks (``protocol.checks.check_receipt``) against what
  the market knows: its own token count of the inputs (the only number billed), the
  request it sent, the vectors it relays, the node's identity and registered weights;
* the node earns at most what is left of the hold (:func:`billing.cap_to_hold`).

The runner has the same face as :class:`market.gateway.jobs.JobRunner` towards
:class:`market.gateway.session.JobSession` (``events``, ``outcome``, ``wind_down``),
so holding, finalizing and retrying a finalize are the generation path's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from inference.embedding import UNIT_NORM_TOL
from market.errors import APIError, ModelNotFound, NoHealthyNode, UpstreamFailed
from market.gateway.jobs import SegmentFailed, error_label
from market.gateway.registry import NodeConn
from market.gateway.router import Need
from market.gateway.state import MarketState
from market.money.billing import Outcome, Segment, cap_to_hold, node_cost
from protocol.checks import check_receipt
from protocol.embedding import (
    EMBEDDING_SAMPLING,
    EmbeddingRequest,
    MalformedVectors,
    decode_vectors,
)
from protocol.messages import Cancel, Embedded, EmbedJob, JobError

log = logging.getLogger("market.gateway.embeddings")


@dataclass
class EmbeddingSpec:
    job_id: str
    request: EmbeddingRequest
    prompt_tokens: int  # the market's own count of every input's tokens
    longest_input: int  # tokens of the longest input: a node's context must hold it
    hold: int
    price_bound: tuple[int, int]  # (input, output) per 1M tokens the hold was computed at
    deadline: float  # event-loop time by which the job is over
    dimensions: int  # the listed model's width (its config.json), never a node's word
    normalized: bool  # the listed model returns unit vectors
    price_cap: int | None = None

    @property
    def model(self) -> str:
        return self.request.model


class EmbeddingRunner:
    """Serves one embedding job: the first node whose answer passes every check."""

    def __init__(self, state: MarketState, spec: EmbeddingSpec) -> None:
        self.state = state
        self.spec = spec
        self.segments: list[Segment] = []
        self.vectors: list[array[float]] = []
        self.error: APIError | None = None
        self.cancelled = False
        self.failovers = 0
        self.started = time.monotonic()
        self.first_token_at: float | None = None  # none: TTFT is generation's metric
        self.hold_written: asyncio.Future[int] | None = None
        self._last_failure = "none"

    @property
    def prompt_tokens(self) -> int:
        return self.spec.prompt_tokens

    async def wind_down(self) -> None:
        """Nothing to collect: a node's vectors are only paid once relayed."""

    async def events(self) -> AsyncIterator[None]:
        """Run the job (yields ``None`` while waiting, as keep-alive ticks)."""
        settings = self.state.settings
        tried: list[str] = []
        limit = max(1, settings.routing.max_attempts_before_first_token)
        for attempt in range(limit):
            left = self._deadline_left()
            if left <= 0:
                raise UpstreamFailed("the job ran past its deadline", code="deadline_exceeded")
            need = Need(self.spec.price_cap, self.spec.price_bound, self.spec.longest_input)
            try:
                conn = await self.state.router.acquire(
                    self.spec.model, self.spec.price_cap, tried,
                    min(settings.routing.job_first_token_timeout, left), need)
            except (NoHealthyNode, ModelNotFound):
                if attempt:
                    raise UpstreamFailed(f"no other node could take the job after: "
                                         f"{self._last_failure}") from None
                raise
            tried.append(conn.node_id)
            if attempt:
                self.failovers += 1
                self.state.metrics.failovers.labels("before_first_token").inc()
            try:
                async for tick in self._attempt(conn):
                    yield tick
                return
            except SegmentFailed as exc:
                self._last_failure = f"{exc.reason}: {exc}"
                self.state.metrics.node_errors.labels(error_label(exc.reason)).inc()
                conn.observe_failure(exc.weight)
                log.info("embedding job %s: node %s failed (%s); failing over",
                         self.spec.job_id, conn.node_id, self._last_failure)
        raise UpstreamFailed(f"the job failed on {limit} node(s); last: {self._last_failure}")

    def _deadline_left(self) -> float:
        return self.spec.deadline - asyncio.get_running_loop().time()

    async def _attempt(self, conn: NodeConn) -> AsyncIterator[None]:
        settings = self.state.settings
        spec = self.spec
        queue: asyncio.Queue[Any] = asyncio.Queue()
        conn.inflight[spec.job_id] = queue
        answered = False
        try:
            job = EmbedJob(job_id=spec.job_id, request=spec.request,
                           deadline=time.time() + max(0.0, self._deadline_left()))
            try:
                await conn.send(job)
            except Exception as exc:
                raise SegmentFailed("send_failed", f"could not send the job: {exc}") from exc
            # the node answers once, after embedding everything: it has the first-token
            # timeout plus the inputs' tokens at a floor throughput, and the rest of the
            # job's deadline stays for failing over
            attempt_end = asyncio.get_running_loop().time() + (
                settings.routing.job_first_token_timeout
                + spec.prompt_tokens / settings.routing.embedding_min_tokens_per_s)
            while True:
                left = min(self._deadline_left(),
                           attempt_end - asyncio.get_running_loop().time())
                if left <= 0:
                    raise SegmentFailed("timeout", "no answer from the node in time",
                                        weight=conn.quarantine_after)
                try:
                    async with asyncio.timeout(min(left, settings.routing.sse_keepalive_s)):
                        message = await queue.get()
                except TimeoutError:
                    yield None
                    continue
                answered = True
                if isinstance(message, Embedded):
                    self._accept(conn, message)
                    conn.observe_success(None, 0, 0.0)  # not a first token: TTFT is generation's
                    return
                if isinstance(message, JobError):
                    raise SegmentFailed(message.code, message.message)
                raise SegmentFailed("receipt_rejected",
                                    f"a {message.type!r} frame answered an embedding job")
        finally:
            if conn.inflight.get(spec.job_id) is queue:
                del conn.inflight[spec.job_id]
                self.state.registry.notify()
            if not answered and not conn.closed:
                self.state.spawn(_send_quietly(conn, Cancel(job_id=spec.job_id)))

    def _accept(self, conn: NodeConn, message: Embedded) -> None:
        spec = self.spec
        offer = conn.models.get(spec.model)
        if offer is None:
            raise SegmentFailed("receipt_rejected", "the node offers no embedding model")
        try:
            vectors = decode_vectors(message.output, len(spec.request.inputs), spec.dimensions)
        except MalformedVectors as exc:
            raise SegmentFailed("bad_vectors", str(exc)) from None
        if spec.normalized:
            off = next((i for i, v in enumerate(vectors)
                        if abs(math.sqrt(sum(x * x for x in v)) - 1.0) > UNIT_NORM_TOL), None)
            if off is not None:
                raise SegmentFailed("bad_vectors", f"vector {off} is not of unit length, as "
                                    "this model's are")
        receipt = message.receipt
        failures = check_receipt(
            receipt,
            registered_model_sha256=offer.sha256,
            request_sha256=spec.request.digest(),
            relayed_text=message.output,
            relayed_token_ids=[],
            node_pubkey=conn.pubkey,
            job_id=spec.job_id,
            model_id=spec.model,
            usage=message.usage,
            finish_reason="stop",
            expected_sampling=EMBEDDING_SAMPLING,
            expected_prompt_tokens=spec.prompt_tokens,
            market_id=self.state.settings.market_id,
        )
        if receipt.fingerprint is not None or receipt.body.fingerprint_sha256 is not None:
            raise SegmentFailed("receipt_rejected", "an embedding receipt carries no fingerprint")
        if failures:
            for failure in failures:
                self.state.metrics.receipts_rejected.labels(failure.code).inc()
            raise SegmentFailed("receipt_rejected",
                                "; ".join(f"{f.code}: {f.message}" for f in failures))
        earning = node_cost(receipt.body.prompt_tokens, 0, conn.price_in, conn.price_out)
        earning, fee = cap_to_hold(earning, self.state.settings.billing.market_fee_bps,
                                   spec.hold)
        self.segments.append(Segment(
            node_id=conn.node_id, seq=0, signed_receipt=receipt.model_dump(mode="json"),
            receipt_hash=receipt.receipt_hash, signature=receipt.signature,
            output_text=message.output, prompt_tokens=receipt.body.prompt_tokens,
            completion_tokens=0, node_earning=earning, fee=fee, continuation_token_ids=[]))
        self.vectors = vectors

    def outcome(self) -> Outcome:
        if self.cancelled:
            status = "cancelled"
        elif self.error is not None or not self.segments:
            status = "failed"
        else:
            status = "completed"
        return Outcome(status=status, prompt_tokens=self.spec.prompt_tokens,
                       completion_tokens=0,
                       finish_reason="stop" if status == "completed" else None,
                       failovers=self.failovers,
                       error=str(self.error) if self.error else None,
                       segments=list(self.segments))


async def _send_quietly(conn: NodeConn, message: Any) -> None:
    with contextlib.suppress(Exception):
        await conn.send(message)
