"""The jobs a node serves, one engine run each, apart from the link that carries them.

A job's life is not the connection's: it starts when a ``job`` frame is accepted and
ends with ``done`` (a signed receipt for exactly the tokens it streamed) or ``error``,
whatever the socket does meanwhile. :class:`JobWorker` owns that life: it runs the
engine, relays each token delta as a ``chunk``, signs the receipt and says how the job
ended. It knows nothing of WebSockets or the handshake; the link hands it a ``send``
callable and the node's identity, and tells it which jobs to start or cancel.

A job the market cancels after it produced tokens still ends with ``done`` (finish
reason ``cancelled``): those tokens are this node's work and the receipt covers them.
A job cancelled any other way (stop, kill, lost link) ends silently; the market fails
it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import websockets
from solders.keypair import Keypair

from inference.base import Engine, EngineError, GenerationEnd, GenerationRequest, TokenDelta
from inference.convert import engine_request
from inference.embedding import SentenceEmbedder
from node_agent.gpu import GpuMonitor
from node_agent.receipts import build_embedding_receipt, build_receipt
from protocol.embedding import encode_vectors
from protocol.messages import Chunk, Done, Embedded, EmbedJob, Job, JobError, Usage
from protocol.receipt import GpuMetrics, SignedReceipt

log = logging.getLogger("aidp.node.worker")

# how a frame reaches the market; raises ``websockets.exceptions.ConnectionClosed``
Send = Callable[[Any], Awaitable[None]]

MAX_ERROR_MESSAGE = 2000


class JobMetrics(Protocol):
    """What the worker reports to (``node_agent.metrics.NodeMetrics`` fits)."""

    running: Any  # a gauge: ``running.set(n)``

    def job_done(self, *, model: str, tokens: int, seconds: float, ttft: float | None) -> None:
        ...


@dataclass
class JobCounters:
    """Counts of the jobs this node took, and the tokens it produced lately."""

    jobs_accepted: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    tokens: int = 0
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=4096))

    def tokens_per_s(self, window: float = 10.0) -> float:
        now = time.monotonic()
        total = sum(n for t, n in self.recent if now - t <= window)
        return round(total / window, 3)


@dataclass
class _RunningJob:
    job: Job | EmbedJob
    task: asyncio.Task[None] | None = None
    cancelled_by_market: bool = False
    tokens_sent: int = 0


@dataclass
class _Output:
    """What one engine run produced so far."""

    t0: float = field(default_factory=time.perf_counter)
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    fingerprint: bytearray = field(default_factory=bytearray)
    end: GenerationEnd | None = None
    first_token_at: float | None = None

    def add(self, delta: TokenDelta) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.text_parts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        self.fingerprint += delta.fingerprint

    @property
    def ttft(self) -> float | None:
        return (self.first_token_at - self.t0) if self.first_token_at is not None else None


async def send_error(send: Send, job_id: str, code: str, message: str) -> None:
    """Tell the market ``job_id`` failed; a closed link has nobody to tell."""
    with contextlib.suppress(websockets.exceptions.ConnectionClosed):
        await send(JobError(job_id=job_id, code=code, message=message[:MAX_ERROR_MESSAGE]))


def _loop_deadline(deadline: float) -> float | None:
    """A job's wall-clock deadline (0: none) on the event loop's clock."""
    if deadline <= 0:
        return None
    return asyncio.get_running_loop().time() + (deadline - time.time())


def _ending(end: GenerationEnd | None, cancelled_prompt_tokens: int | None) -> tuple[str, int]:
    """``(finish_reason, prompt_tokens)`` of a run that ended or was cancelled."""
    if end is not None:
        return end.finish_reason, end.prompt_tokens
    if cancelled_prompt_tokens is not None:
        return "cancelled", cancelled_prompt_tokens
    raise EngineError("engine_error", "the engine ended without a GenerationEnd")


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class JobWorker:
    """Runs the jobs the link accepted, each in its own task. See the module docstring."""

    def __init__(
        self,
        *,
        engines: Mapping[str, Engine],
        keypair: Keypair,
        market_id: str,
        send: Send,
        stats: JobCounters,
        gpu_monitor: GpuMonitor | None = None,
        metrics: JobMetrics | None = None,
        embedders: Mapping[str, SentenceEmbedder] | None = None,
    ) -> None:
        self._engines = engines
        self._embedders = embedders or {}
        self._keypair = keypair
        self._market_id = market_id  # signed into every receipt
        self._send = send
        self._stats = stats
        self._gpu_monitor = gpu_monitor
        self._metrics = metrics
        self._jobs: dict[str, _RunningJob] = {}

    # ---- what the link asks --------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._jobs)

    def is_running(self, job_id: str) -> bool:
        return job_id in self._jobs

    def tasks(self) -> list[asyncio.Task[None]]:
        return [j.task for j in self._jobs.values() if j.task is not None]

    def start(self, job: Job | EmbedJob) -> None:
        """Take ``job`` (the link already decided it fits) and serve it in a task."""
        self._stats.jobs_accepted += 1
        running = _RunningJob(job=job)
        self._jobs[job.job_id] = running
        running.task = asyncio.create_task(self._serve(running), name=f"job-{job.job_id}")

    def cancel(self, job_id: str) -> None:
        """The market's ``cancel``: stop the job, answering for what it produced."""
        running = self._jobs.get(job_id)
        if running is not None and running.task is not None:
            running.cancelled_by_market = True
            running.task.cancel()

    def cancel_all(self) -> None:
        """Cancel every job now, without waiting for any to end."""
        for running in list(self._jobs.values()):
            if running.task is not None:
                running.task.cancel()

    async def abandon(self) -> None:
        """Cancel every job still running and wait until they all ended."""
        tasks = []
        for running in list(self._jobs.values()):
            if running.task is not None and not running.task.done():
                running.task.cancel()
                tasks.append(running.task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- one job -------------------------------------------------------------------

    def _report_running(self) -> None:
        if self._metrics is not None:
            self._metrics.running.set(len(self._jobs))

    async def _serve(self, running: _RunningJob) -> None:
        job = running.job
        try:
            if isinstance(job, EmbedJob):
                await self._embed(job)
                return
            model = job.request.model
            engine = self._engines.get(model)
            if engine is None:
                raise EngineError("model_not_found", f"this node does not serve {model!r}")
            request = engine_request(job.request, job.continuation_token_ids)
            await self._generate(running, engine, request)
        except asyncio.CancelledError:
            if running.cancelled_by_market:
                await send_error(self._send, job.job_id, "cancelled", "cancelled by the market")
            # otherwise: stop()/kill()/lost connection — say nothing.
        except EngineError as exc:
            self._stats.jobs_failed += 1
            await send_error(self._send, job.job_id, exc.code, str(exc))
        except Exception as exc:
            self._stats.jobs_failed += 1
            log.exception("job %s failed", job.job_id)
            await send_error(
                self._send, job.job_id, "internal", f"{exc.__class__.__name__}: {exc}"
            )
        finally:
            self._jobs.pop(job.job_id, None)
            self._report_running()

    async def _embed(self, job: EmbedJob) -> None:
        """One embedding job: tokenize as the market counted, embed, sign, answer."""
        embedder = self._embedders.get(job.request.model)
        if embedder is None:
            raise EngineError("model_not_found",
                              f"this node embeds no {job.request.model!r}")
        monitor = self._gpu_monitor
        started_at = monitor.job_started() if monitor is not None else time.time()
        gpu = None
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout_at(_loop_deadline(job.deadline)):
                # up to a frame of text: tokenized off the link's event loop
                token_ids = await asyncio.to_thread(embedder.tokenizer.encode,
                                                    job.request.inputs)
                output = encode_vectors(await embedder.embed(token_ids))
        except TimeoutError as exc:
            raise EngineError("deadline_exceeded", "the job's deadline passed") from exc
        finally:
            finished_at = time.time()
            if monitor is not None:
                gpu = monitor.job_finished(started_at)
        prompt_tokens = sum(len(ids) for ids in token_ids)
        receipt = build_embedding_receipt(
            keypair=self._keypair, job_id=job.job_id, market_id=self._market_id,
            embedder=embedder, request=job.request, output=output,
            prompt_tokens=prompt_tokens, started_at=started_at, finished_at=finished_at,
            gpu=gpu)
        await self._send(Embedded(job_id=job.job_id, output=output,
                                  usage=_usage(prompt_tokens, 0), receipt=receipt))
        self._stats.jobs_done += 1
        if self._metrics is not None:
            self._metrics.job_done(model=embedder.model.id, tokens=0,
                                   seconds=time.perf_counter() - t0, ttft=None)

    async def _generate(
        self, running: _RunningJob, engine: Engine, request: GenerationRequest
    ) -> None:
        self._report_running()
        monitor = self._gpu_monitor
        started_at = monitor.job_started() if monitor is not None else time.time()
        gpu = None
        out = _Output()
        cancelled_prompt_tokens: int | None = None  # set when the market cancelled
        try:
            await self._stream(running, engine, request, out)
        except asyncio.CancelledError:
            if not (running.cancelled_by_market and out.token_ids):
                raise
            # The market's buyer left: the tokens produced so far are still this node's
            # work, so it signs for them and the market pays for them.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            cancelled_prompt_tokens = await engine.prompt_token_count(request)
        finally:
            finished_at = time.time()
            if monitor is not None:
                gpu = monitor.job_finished(started_at)
        finish_reason, prompt_tokens = _ending(out.end, cancelled_prompt_tokens)
        receipt = self._sign(
            running.job, engine, request, out, prompt_tokens, (started_at, finished_at), gpu
        )
        await self._send(
            Done(
                job_id=running.job.job_id,
                usage=_usage(prompt_tokens, len(out.token_ids)),
                finish_reason=finish_reason,
                receipt=receipt,
            )
        )
        self._record_done(engine, out)

    async def _stream(
        self, running: _RunningJob, engine: Engine, request: GenerationRequest, out: _Output
    ) -> None:
        """Relay the engine's deltas as chunks until it ends or the deadline passes."""
        job = running.job
        try:
            # closed on the way out (deadline, cancel, lost link), so the engine stops
            # generating now rather than whenever the generator is collected
            async with asyncio.timeout_at(_loop_deadline(job.deadline)), contextlib.aclosing(
                engine.generate(request)
            ) as events:
                async for event in events:
                    if isinstance(event, TokenDelta):
                        await self._relay(running, event, out)
                    else:
                        out.end = event
        except TimeoutError as exc:
            raise EngineError("deadline_exceeded", "the job's deadline passed") from exc

    async def _relay(self, running: _RunningJob, delta: TokenDelta, out: _Output) -> None:
        out.add(delta)
        running.tokens_sent += len(delta.token_ids)
        self._stats.recent.append((time.monotonic(), len(delta.token_ids)))
        await self._send(
            Chunk(job_id=running.job.job_id, text=delta.text, token_ids=delta.token_ids,
                  logprobs=delta.logprobs)
        )

    def _sign(
        self,
        job: Job,
        engine: Engine,
        request: GenerationRequest,
        out: _Output,
        prompt_tokens: int,
        window: tuple[float, float],
        gpu: GpuMetrics | None,
    ) -> SignedReceipt:
        started_at, finished_at = window
        return build_receipt(
            keypair=self._keypair,
            job_id=job.job_id,
            market_id=self._market_id,
            engine=engine,
            request=request,
            output_text="".join(out.text_parts),
            output_token_ids=out.token_ids,
            fingerprint=bytes(out.fingerprint),
            prompt_tokens=prompt_tokens,
            started_at=started_at,
            finished_at=finished_at,
            gpu=gpu,
        )

    def _record_done(self, engine: Engine, out: _Output) -> None:
        self._stats.jobs_done += 1
        self._stats.tokens += len(out.token_ids)
        if self._metrics is not None:
            self._metrics.job_done(
                model=engine.model.id,
                tokens=len(out.token_ids),
                seconds=time.perf_counter() - out.t0,
                ttft=out.ttft,
            )
