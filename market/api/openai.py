"""The buyer's OpenAI-compatible API: models, chat/completions (streamed or not), batch,
account and usage."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from inference.base import EngineError
from inference.convert import engine_request
from inference.vocab import Vocabulary
from market.api.schemas import (
    BatchRequest,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequestBody,
    completion_response,
    stream_chunk,
    usage_dict,
)
from market.api.sse import EventStreamResponse
from market.errors import APIError, BadRequest, PayloadTooLarge, UpstreamFailed
from market.gateway.auth import Buyer, authenticate, market_state
from market.gateway.jobs import JobRunner, JobSpec
from market.gateway.state import MarketState
from market.metrics import endpoint_label
from market.models import Job, new_id, utcnow
from market.money import accounts, billing
from market.settings import MarketSettings
from protocol.job import InvalidJobRequest, JobRequest
from protocol.messages import Job as JobMessage
from protocol.messages import encode

router = APIRouter()

_END = object()
BATCH_CONCURRENCY = 16
# prompts longer than this are tokenized in a worker thread, not on the event loop
TOKENIZE_INLINE_CHARS = 16_384
# JSON bytes one continuation token id may add to a job frame ("262143," is 7)
CONTINUATION_ID_BYTES = 8
# a job frame's bytes beyond its prompt text and continuation (ids, sampling, stop strings)
FRAME_OVERHEAD_BYTES = 16_384
MESSAGE_OVERHEAD_CHARS = 64  # a message's role, name and JSON punctuation
# a finalize the database refused is retried after these pauses (doubling)
FINALIZE_RETRY_FIRST_S = 0.5
FINALIZE_RETRY_MAX_S = 30.0

log = logging.getLogger("market.api")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# ---- the job lifecycle ------------------------------------------------------------------


def _count_prompt(vocabulary: Vocabulary, request: JobRequest) -> int:
    """The rendered prompt's tokens, counted as a node must count them."""
    try:
        return len(vocabulary.prompt_token_ids(engine_request(request)))
    except EngineError as exc:
        raise BadRequest(f"the prompt cannot be rendered for this model: {exc}",
                         code=exc.code) from None


def _check_frame(spec: JobSpec, settings: MarketSettings, prompt_chars: int) -> None:
    """413 unless the job frame fits the node link however far it fails over (the
    continuation ids it may carry included). Encoded only when a cheap bound does not
    already show it fits (a character is at most 6 bytes of JSON)."""
    max_tokens = spec.request.sampling.max_tokens
    if prompt_chars * 6 + FRAME_OVERHEAD_BYTES + max_tokens * CONTINUATION_ID_BYTES \
            <= settings.limits.link_max_frame_bytes:
        return
    message = JobMessage(job_id=spec.job_id, request=spec.request, deadline=0.0)
    frame = len(encode(message).encode())
    worst = frame + max_tokens * CONTINUATION_ID_BYTES
    if worst > settings.limits.link_max_frame_bytes:
        raise PayloadTooLarge(
            f"this request needs up to {worst} bytes on the node link, more than its "
            f"{settings.limits.link_max_frame_bytes}: send a shorter prompt or a smaller max_tokens")


@dataclass(frozen=True)
class _Quote:
    """What a job may cost, from the market's own count of its prompt."""

    prompt_tokens: int
    prices: tuple[int, int]  # (input, output) per 1M tokens the hold covers
    hold: int


async def _quote(state: MarketState, body: GenerationRequestBody, vocabulary: Vocabulary,
                 request: JobRequest) -> _Quote:
    """Count the prompt as a node must, check it fits a node, price the worst case."""
    settings, cap = state.settings, body.max_price_per_mtok
    if body.prompt_chars() > TOKENIZE_INLINE_CHARS:
        prompt_tokens = await asyncio.to_thread(_count_prompt, vocabulary, request)
    else:
        prompt_tokens = _count_prompt(vocabulary, request)
    context = state.router.max_context(body.model, cap)
    if prompt_tokens >= context:
        raise BadRequest(
            f"the prompt is {prompt_tokens} tokens; the longest context any node serving "
            f"'{body.model}' offers is {context}",
            param="messages" if body.kind == "chat" else "prompt",
            code="context_length_exceeded")
    prices = state.router.hold_prices(body.model, cap, prompt_tokens + 1,
                                      settings.routing.hold_price_nodes, settings.routing.hold_price_spread)
    hold = billing.worst_case_hold(prompt_tokens, request.sampling.max_tokens, *prices,
                                   settings.billing.market_fee_bps)
    return _Quote(prompt_tokens, prices, hold)


async def open_job(state: MarketState, buyer: Buyer, body: GenerationRequestBody) -> JobRunner:
    """Check the model and capacity, count the prompt, hold the worst case, store the job."""
    settings = state.settings
    state.catalog.require(body.model)
    state.router.ensure_available(body.model, body.max_price_per_mtok)
    vocabulary = await state.catalog.vocabulary(body.model)
    try:
        request = body.job_request(settings.billing.default_max_tokens)
    except InvalidJobRequest as exc:
        raise BadRequest(str(exc)) from None
    quote = await _quote(state, body, vocabulary, request)
    lifetime = settings.routing.job_first_token_timeout + settings.limits.job_max_duration_s
    spec = JobSpec(
        job_id=new_id("job"),
        request=request,
        vocabulary=vocabulary,
        prompt_tokens=quote.prompt_tokens,
        hold=quote.hold,
        price_bound=quote.prices,
        deadline=asyncio.get_running_loop().time() + lifetime,
        price_cap=body.max_price_per_mtok,
    )
    _check_frame(spec, settings, body.prompt_chars() + MESSAGE_OVERHEAD_CHARS * len(
        getattr(body, "messages", ())))
    job = Job(
        id=spec.job_id,
        account_id=buyer.account_id,
        api_key_id=buyer.key_id,
        model=body.model,
        kind=body.kind,
        request=request.model_dump(mode="json"),
        stream=body.stream,
        status="running",
        hold_amount=quote.hold,
        deadline_at=utcnow() + timedelta(seconds=lifetime),
    )
    runner = JobRunner(state, spec)
    runner.hold_written = await _place_hold(state, buyer, job)
    return runner


async def _place_hold(state: MarketState, buyer: Buyer, job: Job) -> asyncio.Future[int] | None:
    """Write the job and its hold. When the in-memory balance covers it, the write goes
    behind and the job starts now (the returned future; ``market.gateway.funds``); otherwise the
    write is awaited (402 when the database refuses it)."""
    hold = job.hold_amount
    if state.funds.try_reserve(buyer.account_id, hold) or await _reserve_after_refresh(
        state, buyer.account_id, hold
    ):
        hold_written = asyncio.ensure_future(
            state.writer.submit(lambda session: billing.open_job(session, job)))
        hold_written.add_done_callback(
            lambda done: state.funds.committed(
                buyer.account_id, hold,
                None if done.cancelled() or done.exception() else done.result()))
        return hold_written
    try:
        available = await state.writer.submit(lambda session: billing.open_job(session, job))
    except asyncio.CancelledError:
        # The buyer left while the hold was being placed: release it once it is written.
        state.spawn(finalize_unstarted(state, job.id))
        raise
    state.funds.observe(buyer.account_id, available)
    return None


async def _reserve_after_refresh(state: MarketState, account_id: str, hold: int) -> bool:
    """When the cached balance is unknown or stale, read it (one query shared by the
    account's concurrent requests) and try again; too little stays a "no"."""
    if state.funds.is_fresh(account_id):
        return False

    async def read() -> int:
        async with state.db.async_sessions() as session:
            return await session.run_sync(billing.spendable_balance, account_id)

    await state.funds.refresh(account_id, read)
    return state.funds.try_reserve(account_id, hold)


async def finalize(state: MarketState, runner: JobRunner) -> None:
    await runner.wind_down()
    if runner.hold_written is not None:
        try:
            await runner.hold_written
        except APIError as exc:  # the database refused the hold: no job, nothing to bill
            runner.error = exc
            return
    outcome = runner.outcome()
    job_id = runner.spec.job_id
    try:
        await _write_outcome(state, job_id, outcome)
    except billing.HoldExceeded:
        log.error("job %s: finalize refused, it would charge beyond the hold", job_id)
        raise
    except Exception as exc:  # the database is away: the outcome is kept until it lands
        log.warning("job %s: finalize failed (%r); retrying until it lands", job_id, exc)
        state.finalizing.add(job_id)
        state.spawn(_finalize_until_it_lands(state, job_id, outcome))
    metrics = state.metrics
    model = runner.spec.model
    if runner.first_token_at is not None:
        metrics.ttft.labels(model).observe(runner.first_token_at - runner.started)
    metrics.tokens.labels(model, "prompt").inc(outcome.prompt_tokens)
    metrics.tokens.labels(model, "completion").inc(outcome.completion_tokens)
    metrics.charged.inc(sum(s.cost for s in outcome.segments) + outcome.unreceipted_charge)


async def _write_outcome(state: MarketState, job_id: str, outcome: billing.Outcome) -> bool:
    window = state.settings.verify.challenge_window_s
    return bool(await state.writer.submit(
        lambda session: billing.finalize_job(session, job_id, outcome, challenge_window_s=window)
    ))


async def _finalize_until_it_lands(state: MarketState, job_id: str,
                                   outcome: billing.Outcome) -> None:
    """Retry a finalize (receipts, charge, hold release) with a growing pause until the
    database takes it; the hold sweeper leaves the job alone meanwhile."""
    delay = FINALIZE_RETRY_FIRST_S
    try:
        while True:
            await asyncio.sleep(delay)
            try:
                await _write_outcome(state, job_id, outcome)
                log.info("job %s: finalized after a retry", job_id)
                return
            except billing.HoldExceeded:
                log.error("job %s: finalize refused, it would charge beyond the hold", job_id)
                return
            except Exception as exc:
                log.warning("job %s: finalize retry failed (%r)", job_id, exc)
                delay = min(delay * 2, FINALIZE_RETRY_MAX_S)
    finally:
        state.finalizing.discard(job_id)


async def finalize_unstarted(state: MarketState, job_id: str) -> None:
    outcome = billing.Outcome(status="cancelled", error="client disconnected")
    await state.writer.submit(
        lambda session: billing.finalize_job(session, job_id, outcome, challenge_window_s=0)
    )


async def _abandon(state: MarketState, runner: JobRunner, events: Any) -> None:
    """The buyer went away: close the runner (sends ``cancel``) and bill what was produced."""
    runner.cancelled = True
    try:
        await events.aclose()
    finally:
        await finalize(state, runner)


async def _guarded(state: MarketState, runner: JobRunner, events: Any, step: Any) -> Any:
    """Await ``step`` (work on the runner's events). If it fails, finalize the job as
    failed; if the request is cancelled (buyer gone), abandon the job. Re-raises."""
    try:
        return await step
    except asyncio.CancelledError:
        state.spawn(_abandon(state, runner, events))
        raise
    except Exception as exc:
        runner.error = exc if isinstance(exc, APIError) else UpstreamFailed(str(exc))
        await finalize(state, runner)
        raise


async def _drain(events: AsyncIterator[str | None]) -> None:
    async for _ in events:
        pass


async def complete(state: MarketState, buyer: Buyer, body: GenerationRequestBody) -> dict[str, Any]:
    """Run a non-streamed request to the end; returns the OpenAI response body."""
    runner = await open_job(state, buyer, body)
    events = runner.events()
    await _guarded(state, runner, events, _drain(events))
    await finalize(state, runner)
    if runner.error is not None:
        raise runner.error
    prefix = "chatcmpl-" if body.kind == "chat" else "cmpl-"
    return completion_response(
        body.kind, prefix + runner.spec.job_id, body.model, runner.text,
        runner.finish_reason or "stop", runner.usage(),
    )


async def _sse(
    state: MarketState,
    runner: JobRunner,
    events: AsyncIterator[str | None],
    first: Any,
    body: GenerationRequestBody,
    request_path: str,
    started: float,
) -> AsyncIterator[str]:
    kind, model = body.kind, body.model
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + runner.spec.job_id
    created = int(time.time())
    sent_first = False
    finished = False
    # Every delta chunk is the same JSON but for its text: build the frame around it once.
    marker = "\x00delta\x00"
    template = _dumps(stream_chunk(kind, rid, model, created, marker))
    head, _, tail = template.partition(_dumps(marker))
    head, tail = "data: " + head, tail + "\n\n"
    try:
        event = first
        while event is not _END:
            if event is None:
                yield ": keep-alive\n\n"
            elif not sent_first:
                chunk = stream_chunk(kind, rid, model, created, event, first=True)
                sent_first = True
                yield f"data: {_dumps(chunk)}\n\n"
            else:
                yield head + _dumps(event) + tail
            try:
                event = await events.__anext__()
            except StopAsyncIteration:
                event = _END
            except Exception as exc:
                runner.error = exc if isinstance(exc, APIError) else UpstreamFailed(str(exc))
                event = _END
        finished = True
        await finalize(state, runner)
        if runner.error is not None:
            yield f"data: {_dumps(runner.error.body())}\n\n"
        else:
            usage = runner.usage()
            # the finish chunk carries usage too; include_usage adds OpenAI's usage-only chunk
            final = stream_chunk(kind, rid, model, created, None if kind == "chat" else "",
                                 runner.finish_reason or "stop", first=not sent_first,
                                 usage=usage)
            yield f"data: {_dumps(final)}\n\n"
            if body.include_usage:
                usage_chunk = stream_chunk(kind, rid, model, created, None, usage=usage,
                                           no_choices=True)
                yield f"data: {_dumps(usage_chunk)}\n\n"
        yield "data: [DONE]\n\n"
        state.metrics.latency.labels(request_path).observe(time.monotonic() - started)
    finally:
        if not finished:
            # Client disconnect (the response task is being cancelled): no awaiting here.
            state.spawn(_abandon(state, runner, events))


async def generate(request: Request, buyer: Buyer, body: GenerationRequestBody) -> Any:
    state = market_state(request)
    endpoint = endpoint_label(request.scope)
    started = time.monotonic()
    streaming = False
    try:
        if not body.stream:
            return JSONResponse(await complete(state, buyer, body))
        runner = await open_job(state, buyer, body)
        events = runner.events()
        # The first event (or failure) before answering: errors keep their HTTP status.
        first = await _guarded(state, runner, events, anext(events, _END))
        streaming = True  # _sse observes the latency when the stream ends
        return EventStreamResponse(
            _sse(state, runner, events, first, body, endpoint, started),
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    finally:
        if not streaming:
            state.metrics.latency.labels(endpoint).observe(time.monotonic() - started)


# ---- routes ------------------------------------------------------------------------------


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, buyer: Buyer = Depends(authenticate)
) -> Any:
    response = await generate(request, buyer, body)
    market_state(request).metrics.requests.labels(endpoint_label(request.scope), "200").inc()
    return response


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest, request: Request, buyer: Buyer = Depends(authenticate)
) -> Any:
    response = await generate(request, buyer, body)
    market_state(request).metrics.requests.labels(endpoint_label(request.scope), "200").inc()
    return response


@router.post("/v1/batch")
async def batch(body: BatchRequest, request: Request, buyer: Buyer = Depends(authenticate)) -> Any:
    """Several prompts in one call; results come back in the order given."""
    state = market_state(request)
    items = body.items()
    if len(items) > 1:
        state.ratelimiter.check(buyer.key_id, cost=len(items) - 1)
    semaphore = asyncio.Semaphore(BATCH_CONCURRENCY)

    async def one(index: int, item: GenerationRequestBody) -> dict[str, Any]:
        async with semaphore:
            try:
                return {"index": index, "response": await complete(state, buyer, item)}
            except APIError as exc:
                return {"index": index, "status": exc.status_code, **exc.body()}

    results = await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
    prompt = sum(r["response"]["usage"]["prompt_tokens"] for r in results if "response" in r)
    completion = sum(
        r["response"]["usage"]["completion_tokens"] for r in results if "response" in r
    )
    state.metrics.requests.labels(endpoint_label(request.scope), "200").inc()
    return {
        "object": "batch.completion",
        "model": body.model,
        "data": results,
        "usage": usage_dict(prompt, completion),
    }


@router.get("/v1/models")
async def list_models(request: Request, _buyer: Buyer = Depends(authenticate)) -> Any:
    state = market_state(request)
    data = []
    for model_id, conns in sorted(state.registry.available_models().items()):
        data.append(
            {
                "id": model_id,
                "object": "model",
                "created": 0,
                "owned_by": "aidp-market",
                "nodes": len(conns),
                "context_length": max(c.models[model_id].context_length for c in conns),
                "price_per_mtok": {
                    "input": min(c.price_in for c in conns),
                    "output": min(c.price_out for c in conns),
                },
            }
        )
    return {"object": "list", "data": data}


@router.get("/v1/account")
async def account(request: Request, buyer: Buyer = Depends(authenticate)) -> Any:
    state = market_state(request)
    async with state.db.async_sessions() as session:
        row = await session.run_sync(accounts.get_account, buyer.account_id)
        return accounts.account_dict(row)


@router.get("/v1/usage")
async def usage(
    request: Request,
    buyer: Buyer = Depends(authenticate),
    limit: int = Query(50, ge=1, le=1000),
) -> Any:
    state = market_state(request)
    async with state.db.async_sessions() as session:
        return await session.run_sync(accounts.usage, buyer.account_id, limit)


__all__ = ["router", "complete", "open_job", "finalize", "ChatCompletionRequest",
           "CompletionRequest"]
