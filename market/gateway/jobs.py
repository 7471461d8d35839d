"""Run one job on the network: send it to a node, relay its chunks, fail over.

:class:`JobRunner.events` yields text deltas (``None`` = nothing yet, time for an SSE
keep-alive). Behind it:

* a node that errors, refuses, disconnects, goes silent or times out before its first
  token is replaced by another one, invisibly (up to
  ``max_attempts_before_first_token`` nodes); every such miss counts against the node;
* a node that dies mid-stream is replaced by one that continues from the output
  already relayed (``continuation_token_ids``, ``max_tokens`` reduced), so the buyer's
  stream completes with the text one healthy node gives;
* every chunk is checked before it is relayed: its token ids are in the model's
  vocabulary, its text is what those ids decode to (the market replays the node's
  text stream, :class:`protocol.text.ExpectedText`), no more ids than ``max_tokens``
  and nothing after a stop string; under an output constraint every token keeps the
  output inside its grammar (the same mask the node had to apply, ``inference.grammar``)
  and a natural stop leaves a whole document; a chunk that fails is never relayed and
  the node is failed over;
* on ``done`` the receipt is checked against what the market itself sent, counted and
  relayed (``protocol.checks.check_receipt``); a failing receipt counts
  against the node and the job fails over like an error;
* money stays inside the hold: nodes are only chosen at prices the hold covers, and
  each segment earns at most what is left of it (:func:`billing.cap_to_hold`);
* every job has a wall-clock deadline, whatever its nodes send;
* if the consumer goes away (client disconnect) the node gets ``cancel``; a node that
  had produced tokens answers with a receipt for them (finish reason ``cancelled``),
  which :meth:`JobRunner.wind_down` waits for so the node is paid for its work.

The runner does no database work; the API layer finalizes the job with
:meth:`JobRunner.outcome` in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from inference.grammar import GrammarMatcher
from inference.vocab import Vocabulary
from market.errors import APIError, ModelNotFound, NoHealthyNode, UpstreamFailed
from market.gateway.registry import NodeConn
from market.gateway.router import Need, required_features
from market.gateway.state import MarketState
from market.money.billing import Outcome, Segment, cap_to_hold, node_cost, token_cost
from protocol.checks import check_receipt
from protocol.job import JobRequest
from protocol.messages import Cancel, Chunk, Done, Job, JobError, TokenLogprob
from protocol.text import ExpectedText, TextMismatch

log = logging.getLogger("market.gateway.jobs")

# Node error codes the market knows; any other code a node sends is counted as "other"
# (metric labels come from a closed set).
KNOWN_NODE_ERRORS = frozenset({
    "busy", "draining", "duplicate_job", "model_not_found", "bad_request", "cancelled",
    "deadline_exceeded", "internal", "engine_error", "invalid_token",
    "context_length_exceeded", "node_disconnected", "node_unhealthy", "node_reconnected",
    "timeout", "send_failed", "receipt_rejected", "over_max_tokens", "text_mismatch",
    "grammar_violation", "bad_logprobs", "unsupported_parameter", "invalid_constraint",
    "grammar_error", "bad_vectors",
    "flooding",
})


def error_label(code: str) -> str:
    return code if code in KNOWN_NODE_ERRORS else "other"


@dataclass
class JobSpec:
    job_id: str
    request: JobRequest  # what the buyer asked, sampling defaults applied
    vocabulary: Vocabulary
    prompt_tokens: int  # the market's own count of the rendered prompt
    hold: int  # what the buyer's hold covers: no job is charged more
    price_bound: tuple[int, int]  # (input, output) per 1M tokens the hold was computed at
    deadline: float  # event-loop time by which the job is over
    price_cap: int | None = None

    @property
    def model(self) -> str:
        return self.request.model


class SegmentFailed(Exception):
    def __init__(self, reason: str, message: str, *, weight: int = 1) -> None:
        super().__init__(message)
        self.reason = reason
        self.weight = weight  # misses counted against the node (a timeout: a quarantine)


class JobRunner:
    def __init__(self, state: MarketState, spec: JobSpec,
                 grammar: GrammarMatcher | None = None) -> None:
        self.state = state
        self.spec = spec
        self.max_tokens: int = spec.request.sampling.max_tokens
        self.text_parts: list[str] = []
        self.token_ids: list[int] = []
        self.segments: list[Segment] = []
        self.finish_reason: str | None = None
        self.prompt_tokens: int = spec.prompt_tokens
        self.failovers = 0
        self.error: APIError | None = None
        self.cancelled = False
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        # the unreceipted tail: tokens relayed from a segment that has no receipt yet
        self._open_tokens = 0
        self._open_price_out = 0
        self._last_failure = "none"
        # Collecting a cancelled node's receipt (see _collect_cancelled).
        self._closing: asyncio.Task[None] | None = None
        # The job's hold, when it is still being written (see market.gateway.funds): finalizing
        # waits for it, and a hold the database refused stops the job uncharged.
        self.hold_written: asyncio.Future[int] | None = None
        # per relayed token, when the buyer asked for log-probabilities
        self.logprobs: list[TokenLogprob] = []
        self._features = frozenset(required_features(spec.request))
        # the relay's own copy of the job's grammar (market.gateway.session compiles it)
        if spec.request.constraint is not None and grammar is None:
            raise ValueError("a constrained job needs its grammar matcher")
        self._grammar = grammar

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def hold_left(self) -> int:
        return self.spec.hold - sum(s.cost for s in self.segments)

    async def wind_down(self) -> None:
        """Wait for the receipt of a segment the buyer left (bounded by a timeout)."""
        if self._closing is not None:
            await asyncio.shield(self._closing)

    # ---- the loop ----------------------------------------------------------------------

    async def events(self) -> AsyncIterator[str | None]:
        settings = self.state.settings
        tried: list[str] = []
        attempts = 0
        while True:
            remaining = self.max_tokens - len(self.token_ids)
            if remaining <= 0:
                self.finish_reason = "length"
                return
            limit = (1 + max(0, settings.routing.max_failover_attempts) if self.token_ids
                     else max(1, settings.routing.max_attempts_before_first_token))
            if attempts >= limit:
                self._fail(UpstreamFailed(
                    f"the job failed on {attempts} node(s); last: {self._last_failure}"
                ))
                return
            if self._deadline_left() <= 0:
                self._fail(UpstreamFailed("the job ran past its deadline",
                                          code="deadline_exceeded"))
                return
            need = Need(self.spec.price_cap, self.spec.price_bound,
                        self.spec.prompt_tokens + len(self.token_ids) + 1, self._features)
            try:
                conn = await self.state.router.acquire(
                    self.spec.model, self.spec.price_cap, tried,
                    min(settings.routing.job_first_token_timeout, self._deadline_left()), need,
                )
            except (NoHealthyNode, ModelNotFound) as exc:
                error: APIError = exc
                if self.token_ids:
                    error = UpstreamFailed(
                        "the node serving this stream failed and no other node could continue "
                        f"it (last: {self._last_failure})")
                elif attempts:
                    error = UpstreamFailed(
                        f"no other node could take the job after: {self._last_failure}"
                    )
                self._fail(error)
                return
            tried.append(conn.node_id)
            attempts += 1
            if attempts > 1:
                self.failovers += 1
                self.state.metrics.failovers.labels(
                    "mid_stream" if self.token_ids else "before_first_token"
                ).inc()
            try:
                async with contextlib.aclosing(self._segment(conn, remaining)) as segment:
                    async for delta in segment:
                        yield delta
                return  # done with a valid receipt
            except SegmentFailed as exc:
                self._last_failure = f"{exc.reason}: {exc}"
                self.state.metrics.node_errors.labels(error_label(exc.reason)).inc()
                conn.observe_failure(exc.weight)
                log.info("job %s: node %s failed (%s); failing over", self.spec.job_id,
                         conn.node_id, self._last_failure)

    def _deadline_left(self) -> float:
        return self.spec.deadline - asyncio.get_running_loop().time()

    def _fail(self, exc: APIError) -> None:
        if not self.token_ids:
            raise exc
        # Mid-stream with nowhere to continue: end the stream with an error event.
        self.error = exc
        self.finish_reason = None

    def _job_message(self, request: JobRequest, continuation_ids: list[int]) -> Job:
        return Job(
            job_id=self.spec.job_id,
            request=request,
            deadline=time.time() + max(0.0, self._deadline_left()),
            continuation_token_ids=continuation_ids,
        )

    def _check_chunk(self, chunk: Chunk, expected: ExpectedText, seg_ids: list[int],
                     remaining: int) -> str:
        """The text of one chunk, checked (raises :class:`SegmentFailed`)."""
        ids = chunk.token_ids
        vocabulary = self.spec.vocabulary
        if len(seg_ids) + len(ids) > remaining:
            raise SegmentFailed("over_max_tokens", "node sent more than max_tokens")
        bad = next((t for t in ids if not vocabulary.valid(t)), None)
        if bad is not None:
            raise SegmentFailed("invalid_token", f"token id {bad} is not in the vocabulary")
        top = self.spec.request.logprobs
        sent = chunk.logprobs
        if (sent is not None and (top is None or any(
                entry.token_id != token or len(entry.top) > top
                for entry, token in zip(sent, ids, strict=True)))) or (
                top is not None and ids and sent is None):
            raise SegmentFailed("bad_logprobs",
                                "the chunk's logprobs are not one per token of the job's")
        try:
            return expected.chunk(list(ids), chunk.text)
        except TextMismatch as exc:
            raise SegmentFailed("text_mismatch", str(exc)) from None

    def _relay(self, conn: NodeConn, text: str, ids: list[int], seg_ids: list[int],
               logprobs: list[TokenLogprob] | None = None) -> None:
        if self._grammar is not None and ids:
            bad = self._grammar.take(ids)
            if bad is not None:
                raise SegmentFailed("grammar_violation",
                                    f"token {ids[bad]} leaves the job's response_format")
        if logprobs:
            self.logprobs.extend(logprobs)
        seg_ids.extend(ids)
        self.text_parts.append(text)
        self.token_ids.extend(ids)
        self._open_tokens = len(seg_ids)
        self._open_price_out = conn.price_out

    async def _segment(self, conn: NodeConn, remaining: int) -> AsyncIterator[str | None]:
        settings = self.state.settings
        spec = self.spec
        continuation_ids = list(self.token_ids)
        request = spec.request.with_max_tokens(remaining)
        # no more output than the node's own context holds after prompt and continuation
        offer = conn.models.get(spec.model)
        if offer is not None:
            room = offer.context_length - spec.prompt_tokens - len(continuation_ids)
            remaining = max(1, min(remaining, room))
        job = self._job_message(request, continuation_ids)
        expected = ExpectedText(spec.vocabulary.piece, request.sampling.stop, continuation_ids)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        conn.inflight[spec.job_id] = queue
        seg_ids: list[int] = []
        finished = False
        consumer_left = False
        t0 = time.monotonic()
        first_at: float | None = None
        try:
            try:
                await conn.send(job)
            except Exception as exc:
                raise SegmentFailed("send_failed", f"could not send the job: {exc}") from exc
            keepalive = settings.routing.sse_keepalive_s
            timeout = settings.routing.job_first_token_timeout
            pending: Any = None
            silent_since: float | None = None
            while True:
                if pending is not None:
                    message, pending = pending, None
                elif not queue.empty():
                    message = queue.get_nowait()
                else:
                    silent_since = silent_since or time.monotonic()
                    left = min(silent_since + timeout - time.monotonic(), self._deadline_left())
                    if left <= 0:
                        raise SegmentFailed("timeout", f"no message from the node in {timeout}s",
                                            weight=conn.quarantine_after)
                    try:  # asyncio.timeout, not wait_for: no extra task per relayed chunk
                        async with asyncio.timeout(min(left, keepalive)):
                            message = await queue.get()
                    except TimeoutError:
                        yield None  # nothing yet: time for an SSE keep-alive
                        continue
                silent_since = None
                if isinstance(message, Chunk):
                    # Coalesce chunks that are already waiting: one delta, one write.
                    texts = [self._check_chunk(message, expected, seg_ids, remaining)]
                    ids = list(message.token_ids)
                    logprobs = list(message.logprobs or ())
                    refused: SegmentFailed | None = None
                    while not queue.empty():
                        following = queue.get_nowait()
                        if not isinstance(following, Chunk):
                            pending = following
                            break
                        try:
                            texts.append(self._check_chunk(following, expected,
                                                           seg_ids + ids, remaining))
                        except SegmentFailed as exc:
                            # relay the chunks before it, as if it had come later
                            refused = exc
                            break
                        ids.extend(following.token_ids)
                        logprobs.extend(following.logprobs or ())
                    text = "".join(texts)
                    if not ids and not text:
                        if refused is not None:
                            raise refused
                        continue
                    if first_at is None:
                        first_at = time.monotonic()
                        if self.first_token_at is None:
                            self.first_token_at = first_at
                    self._relay(conn, text, ids, seg_ids, logprobs)
                    yield text
                    if refused is not None:
                        raise refused
                elif isinstance(message, Done):
                    finished = True
                    self._accept_done(conn, message, request, continuation_ids, expected, seg_ids)
                    gen_s = time.monotonic() - (first_at or t0)
                    conn.observe_success(
                        (first_at - t0) if first_at is not None else None, len(seg_ids), gen_s
                    )
                    return
                elif isinstance(message, JobError):
                    finished = True
                    raise SegmentFailed(message.code, message.message)
                else:  # an embedding's answer to a generation: nothing it was asked
                    raise SegmentFailed("receipt_rejected",
                                        f"a {message.type!r} frame answered a generation job")
        except (GeneratorExit, asyncio.CancelledError):
            consumer_left = True
            raise
        finally:
            if consumer_left and seg_ids and not finished and not conn.closed:
                # The buyer left mid-stream. No awaiting here (the consumer is being torn
                # down): a task stops the node and collects its receipt for what it
                # produced; finalizing waits for it (wind_down).
                self._closing = self.state.spawn(self._collect_cancelled(
                    conn, queue, request, continuation_ids, expected, seg_ids))
            else:
                self._release(conn, queue)
                if not finished and not conn.closed:
                    # Abandoned (failover, timeout, the buyer left before any token).
                    self.state.spawn(_send_quietly(conn, Cancel(job_id=spec.job_id)))

    def _release(self, conn: NodeConn, queue: asyncio.Queue[Any]) -> None:
        """Stop routing this job's messages here; the node's slot counts as free."""
        if conn.inflight.get(self.spec.job_id) is queue:
            del conn.inflight[self.spec.job_id]
            self.state.registry.notify()

    async def _collect_cancelled(
        self,
        conn: NodeConn,
        queue: asyncio.Queue[Any],
        request: JobRequest,
        continuation_ids: list[int],
        expected: ExpectedText,
        seg_ids: list[int],
    ) -> None:
        """Send ``cancel``, then take the node's last chunks and its receipt for them. A
        node that does not answer in time leaves the relayed tokens unreceipted."""
        job_id = self.spec.job_id
        try:
            await conn.send(Cancel(job_id=job_id))
            async with asyncio.timeout(self.state.settings.routing.cancel_receipt_timeout_s):
                while True:
                    message = await queue.get()
                    if isinstance(message, Chunk):
                        # produced before the node saw the cancel: covered by its receipt
                        text = self._check_chunk(message, expected, seg_ids,
                                                 request.sampling.max_tokens)
                        self._relay(conn, text, list(message.token_ids), seg_ids,
                                    message.logprobs)
                    elif isinstance(message, Done):
                        self._accept_done(conn, message, request, continuation_ids, expected,
                                          seg_ids, cancel_sent=True)
                        return
                    else:  # an error: the node signed nothing
                        return
        except SegmentFailed as exc:
            conn.observe_failure()
            log.warning("job %s: receipt after cancel rejected: %s", job_id, exc)
        except Exception as exc:  # timeout, the link went away: bill unreceipted
            log.info("job %s: no receipt after cancel (%r)", job_id, exc)
        finally:
            self._release(conn, queue)

    def _accept_done(
        self,
        conn: NodeConn,
        done: Done,
        request: JobRequest,
        continuation_ids: list[int],
        expected: ExpectedText,
        seg_ids: list[int],
        *,
        cancel_sent: bool = False,
    ) -> None:
        spec = self.spec
        if done.finish_reason == "cancelled" and not cancel_sent:
            raise SegmentFailed("receipt_rejected", "finish reason 'cancelled' without a cancel")
        if done.finish_reason != "cancelled":
            try:
                expected.finish()
            except TextMismatch as exc:
                raise SegmentFailed("text_mismatch", str(exc)) from None
        if (done.finish_reason == "stop" and self._grammar is not None and not expected.stopped
                and not self._grammar.complete):
            raise SegmentFailed("grammar_violation",
                                "the output stopped before its response_format was complete")
        try:
            failures = self._check_receipt(conn, done, request, continuation_ids, expected,
                                           seg_ids)
        except Exception as exc:  # whatever a node sent, it fails its segment, not the job
            log.exception("job %s: receipt of node %s could not be checked", spec.job_id,
                          conn.node_id)
            raise SegmentFailed("receipt_rejected", f"receipt could not be checked: {exc}") \
                from None
        if failures:
            for failure in failures:
                self.state.metrics.receipts_rejected.labels(failure.code).inc()
            raise SegmentFailed(
                "receipt_rejected", "; ".join(f"{f.code}: {f.message}" for f in failures)
            )
        receipt = done.receipt
        earning = node_cost(receipt.body.prompt_tokens, receipt.body.completion_tokens,
                            conn.price_in, conn.price_out)
        fee_bps = self.state.settings.billing.market_fee_bps
        earning, fee = cap_to_hold(earning, fee_bps, self.hold_left)
        self.segments.append(
            Segment(
                node_id=conn.node_id,
                seq=len(self.segments),
                signed_receipt=receipt.model_dump(mode="json"),
                receipt_hash=receipt.receipt_hash,
                signature=receipt.signature,
                output_text=expected.text,
                prompt_tokens=receipt.body.prompt_tokens,
                completion_tokens=receipt.body.completion_tokens,
                node_earning=earning,
                fee=fee,
                continuation_token_ids=continuation_ids,
            )
        )
        self._open_tokens = 0
        self.finish_reason = done.finish_reason

    def _check_receipt(self, conn: NodeConn, done: Done, request: JobRequest,
                       continuation_ids: list[int], expected: ExpectedText,
                       seg_ids: list[int]) -> list[Any]:
        spec = self.spec
        offer = conn.models.get(spec.model)
        return check_receipt(
            done.receipt,
            registered_model_sha256=offer.sha256 if offer else "",
            request_sha256=request.digest(continuation_ids),
            relayed_text=expected.text,
            relayed_token_ids=seg_ids,
            node_pubkey=conn.pubkey,
            job_id=spec.job_id,
            model_id=spec.model,
            usage=done.usage,
            finish_reason=done.finish_reason,
            expected_sampling=request.sampling,
            context_length=offer.context_length if offer else None,
            expected_prompt_tokens=spec.prompt_tokens + len(continuation_ids),
            market_id=self.state.settings.market_id,
            require_fingerprint=True,
        )

    # ---- the result ------------------------------------------------------------------------

    def outcome(self) -> Outcome:
        fee_bps = self.state.settings.billing.market_fee_bps
        if self.cancelled:
            status = "cancelled"
        elif self.error is not None or self.finish_reason is None:
            status = "failed"
        else:
            status = "completed"
        unreceipted = fee = 0
        if status == "cancelled" and self._open_tokens:
            # Output the buyer received that no receipt covers (e.g. client disconnect):
            # bill only what was produced, within what is left of the hold.
            unreceipted, fee = cap_to_hold(token_cost(self._open_tokens, self._open_price_out),
                                           fee_bps, self.hold_left)
        return Outcome(
            status=status,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.token_ids),
            finish_reason=self.finish_reason,
            failovers=self.failovers,
            error=str(self.error) if self.error else None,
            segments=list(self.segments),
            unreceipted_charge=unreceipted + fee,
            unreceipted_fee=fee,
        )

    def usage(self) -> dict[str, int]:
        completion = len(self.token_ids)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


async def _send_quietly(conn: NodeConn, message: Any) -> None:
    with contextlib.suppress(Exception):
        await conn.send(message)
