"""The buyer's OpenAI-compatible API: models, chat/completions (streamed or not), batch,
account and usage. Thin: bodies become a ``JobOrder``, the job runs in a ``JobSession``
(``market.gateway.session``), its events become OpenAI's response shapes here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from market.api.schemas import (
    BatchRequest,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequestBody,
    GenerationRequestBody,
    completion_response,
    embedding_response,
    logprobs_object,
    stream_chunk,
    usage_dict,
)
from market.api.sse import EventStreamResponse
from market.errors import APIError, BadRequest, ModelNotFound, UpstreamFailed
from market.gateway.auth import Buyer, authenticate, market_state
from market.gateway.router import FEATURE_PARAMETERS, offers
from market.gateway.session import JobOrder, JobSession
from market.gateway.state import MarketState
from market.metrics import endpoint_label
from market.money import accounts
from market.settings import MarketSettings
from protocol.embedding import EmbeddingRequest
from protocol.job import InvalidJobRequest
from protocol.tools import ToolCall, parse_calls

router = APIRouter()

_END = object()
BATCH_CONCURRENCY = 16

log = logging.getLogger("market.api")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def job_order(body: GenerationRequestBody, settings: MarketSettings) -> JobOrder:
    """The typed job a body asks for (400 when the job contract refuses it)."""
    try:
        request = body.job_request(settings.billing.default_max_tokens)
    except InvalidJobRequest as exc:
        raise BadRequest(str(exc), param=exc.param) from None
    return JobOrder(request=request, stream=body.stream, price_cap=body.max_price_per_mtok,
                    prompt_chars=body.prompt_chars(), messages=len(getattr(body, "messages", ())),
                    max_tokens_given=body.max_tokens is not None
                    or getattr(body, "max_completion_tokens", None) is not None)


async def complete(state: MarketState, buyer: Buyer, body: GenerationRequestBody) -> dict[str, Any]:
    """Run a non-streamed request to the end (one job per choice, concurrently); returns
    the OpenAI response body. A choice that fails fails the request (the others' output
    was produced and is charged, as for a stream the buyer left)."""
    jobs = await JobSession.open_choices(state, buyer, job_order(body, state.settings), body.n)
    results = await asyncio.gather(*(job.run_to_end() for job in jobs), return_exceptions=True)
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        raise failed
    prefix = "chatcmpl-" if body.kind == "chat" else "cmpl-"
    responses = [_choice_response(body, job.runner, prefix) for job in jobs]
    response = responses[0]
    if len(responses) > 1:
        for index, other in enumerate(responses[1:], start=1):
            response["choices"].append({**other["choices"][0], "index": index})
        usage = [r["usage"] for r in responses]
        response["usage"] = usage_dict(sum(u["prompt_tokens"] for u in usage),
                                       sum(u["completion_tokens"] for u in usage))
    return response


def _choice_response(body: GenerationRequestBody, runner: Any, prefix: str) -> dict[str, Any]:
    wanted = runner.spec.request.logprobs is not None
    echoed = body.echoed if isinstance(body, CompletionRequest) else ""
    response = completion_response(
        body.kind, prefix + runner.spec.job_id, body.model, echoed + runner.text,
        runner.finish_reason or "stop", runner.usage(),
        logprobs=logprobs_object(body.kind, runner.logprobs if wanted else None,
                                 runner.spec.vocabulary.piece),
    )
    content, calls = finished_tool_calls(body, runner)
    if calls:
        choice = response["choices"][0]
        choice["message"] = {"role": "assistant", "content": content,
                             "tool_calls": [c.openai() for c in calls]}
        choice["finish_reason"] = "tool_calls"
    return response


def finished_tool_calls(body: GenerationRequestBody, runner: Any
                        ) -> tuple[str | None, list[ToolCall]]:
    """The calls in a finished chat output (``protocol.tools``); none for a job cut at
    max_tokens, whose call could not be whole."""
    if not isinstance(body, ChatCompletionRequest) or not body.tools or (
            runner.finish_reason != "stop"):
        return runner.text, []
    mode, offered = body.tool_setup()
    return parse_calls(runner.text, mode, offered, runner.spec.job_id)


async def next_event(events: AsyncIterator[str | None], runner: Any) -> Any:
    """The job's next event, or ``_END`` when it ended; a failure is kept on the runner
    (the stream is already under way: it ends with the error, not an HTTP status)."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return _END
    except Exception as exc:
        runner.error = exc if isinstance(exc, APIError) else UpstreamFailed(str(exc))
        return _END


async def _sse(
    state: MarketState,
    job: JobSession,
    events: AsyncIterator[str | None],
    first: Any,
    body: GenerationRequestBody,
    request_path: str,
    started: float,
) -> AsyncIterator[str]:
    kind, model, runner = body.kind, body.model, job.runner
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + runner.spec.job_id
    created = int(time.time())
    sent_first = False
    finished = False
    # Every delta chunk is the same JSON but for its text: build the frame around it once.
    marker = "\x00delta\x00"
    with_usage = body.include_usage
    template = _dumps(stream_chunk(kind, rid, model, created, marker, usage_field=with_usage))
    head, _, tail = template.partition(_dumps(marker))
    head, tail = "data: " + head, tail + "\n\n"
    wants_logprobs = runner.spec.request.logprobs is not None
    logprobs_sent = 0  # runner.logprobs already streamed
    text_sent = 0  # characters already streamed (completions' text_offset)
    # with tools the output is read as a whole (a call or text): held, keep-alives meanwhile
    holds_output = isinstance(body, ChatCompletionRequest) and bool(body.tools) and (
        body.tool_setup()[0] != "none")
    # echo: the prompt goes out with the first text (or alone at the end)
    echo = body.echoed if isinstance(body, CompletionRequest) else ""
    try:
        event = first
        while event is not _END:
            if echo and isinstance(event, str):
                event, echo = echo + event, ""
            if event is None or holds_output:
                yield ": keep-alive\n\n"
            elif wants_logprobs:  # a chunk of its own for every delta: no template
                entries = runner.logprobs[logprobs_sent:]
                logprobs_sent += len(entries)
                chunk = stream_chunk(kind, rid, model, created, event, first=not sent_first,
                                     usage_field=with_usage,
                                     logprobs=logprobs_object(kind, entries,
                                                              runner.spec.vocabulary.piece,
                                                              text_sent))
                text_sent += len(event)
                sent_first = True
                yield f"data: {_dumps(chunk)}\n\n"
            elif not sent_first:
                chunk = stream_chunk(kind, rid, model, created, event, first=True,
                                     usage_field=with_usage)
                sent_first = True
                yield f"data: {_dumps(chunk)}\n\n"
            else:
                yield head + _dumps(event) + tail
            event = await next_event(events, runner)
        finished = True
        await job.finalize()
        if runner.error is not None:
            yield f"data: {_dumps(runner.error.body())}\n\n"
        else:
            finish = runner.finish_reason or "stop"
            if holds_output:
                content, calls = finished_tool_calls(body, runner)
                chunk = stream_chunk(kind, rid, model, created, content, first=True,
                                     usage_field=with_usage,
                                     tool_calls=[c.openai(i) for i, c in enumerate(calls)]
                                     if calls else None)
                sent_first = True
                finish = "tool_calls" if calls else finish
                yield f"data: {_dumps(chunk)}\n\n"
            # usage once, on OpenAI's usage-only chunk when asked for (a client that sums
            # the usage of every chunk counts it once), never on the finish chunk
            final = stream_chunk(kind, rid, model, created, None if kind == "chat" else echo,
                                 finish, first=not sent_first, usage_field=with_usage)
            yield f"data: {_dumps(final)}\n\n"
            if with_usage:
                usage_chunk = stream_chunk(kind, rid, model, created, None,
                                           usage=runner.usage(), no_choices=True)
                yield f"data: {_dumps(usage_chunk)}\n\n"
        yield "data: [DONE]\n\n"
        state.metrics.latency.labels(request_path).observe(time.monotonic() - started)
    finally:
        if not finished:
            # Client disconnect (the response task is being cancelled): no awaiting here.
            state.spawn(job.abandon(events))


async def _sse_choices(state: MarketState, jobs: list[JobSession], body: GenerationRequestBody,
                       request_path: str, started: float) -> AsyncIterator[str]:
    """``n`` streamed choices, interleaved as their deltas come (each chunk names its
    ``index``); each choice ends with its own finish chunk, and with ``include_usage``
    one usage chunk sums them all. A choice that fails ends the stream with its error;
    a buyer who leaves has every choice cancelled and billed for what it produced."""
    kind, model = body.kind, body.model
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + jobs[0].runner.spec.job_id
    created = int(time.time())
    with_usage = body.include_usage
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    events = [job.runner.events() for job in jobs]
    ended: set[int] = set()

    async def pump(index: int) -> None:
        job, stream = jobs[index], events[index]
        try:
            async for event in stream:
                if event is not None:
                    await queue.put((index, event))
        except Exception as exc:
            job.runner.error = exc if isinstance(exc, APIError) else UpstreamFailed(str(exc))
        ended.add(index)  # from here the job is finalized here, whoever is listening
        await job.finalize()
        await queue.put((index, _END))

    pumps = [state.spawn(pump(i)) for i in range(len(jobs))]
    finished = False
    try:
        open_choices, sent = len(jobs), set()
        while open_choices:
            try:
                async with asyncio.timeout(state.settings.routing.sse_keepalive_s):
                    index, event = await queue.get()
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            runner = jobs[index].runner
            if event is _END:
                open_choices -= 1
                if runner.error is not None:
                    yield f"data: {_dumps(runner.error.body())}\n\n"
                    break
                final = stream_chunk(kind, rid, model, created, None if kind == "chat" else "",
                                     runner.finish_reason or "stop", first=index not in sent,
                                     usage_field=with_usage, index=index)
                yield f"data: {_dumps(final)}\n\n"
                continue
            chunk = stream_chunk(kind, rid, model, created, event, first=index not in sent,
                                 usage_field=with_usage, index=index)
            sent.add(index)
            yield f"data: {_dumps(chunk)}\n\n"
        else:
            if with_usage:
                usages = [job.runner.usage() for job in jobs]
                total = usage_dict(sum(u["prompt_tokens"] for u in usages),
                                   sum(u["completion_tokens"] for u in usages))
                usage_chunk = stream_chunk(kind, rid, model, created, None, usage=total,
                                           no_choices=True)
                yield f"data: {_dumps(usage_chunk)}\n\n"
        yield "data: [DONE]\n\n"
        finished = True
        state.metrics.latency.labels(request_path).observe(time.monotonic() - started)
    finally:
        for index, task in enumerate(pumps):
            if index not in ended:  # the buyer left, or another choice failed
                task.cancel()
                state.spawn(_abandon_after(task, jobs[index], events[index]))
        if not finished:
            log.info("streamed choices of %s ended early", rid)


async def _abandon_after(pump: asyncio.Task[None], job: JobSession, events: Any) -> None:
    """Once a cancelled pump has stopped reading its choice, cancel and bill that job."""
    with contextlib.suppress(BaseException):
        await pump
    await job.abandon(events)


async def generate(request: Request, buyer: Buyer, body: GenerationRequestBody) -> Any:
    state = market_state(request)
    endpoint = endpoint_label(request.scope)
    started = time.monotonic()
    streaming = False
    try:
        if not body.stream:
            return JSONResponse(await complete(state, buyer, body))
        if body.n > 1:
            jobs = await JobSession.open_choices(state, buyer, job_order(body, state.settings),
                                                 body.n)
            streaming = True
            return EventStreamResponse(
                _sse_choices(state, jobs, body, endpoint, started),
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        job = await JobSession.open(state, buyer, job_order(body, state.settings))
        events = job.runner.events()
        # The first event (or failure) before answering: errors keep their HTTP status.
        first = await job.guarded(events, anext(events, _END))
        streaming = True  # _sse observes the latency when the stream ends
        return EventStreamResponse(
            _sse(state, job, events, first, body, endpoint, started),
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


@router.post("/v1/embeddings")
async def embeddings(
    body: EmbeddingRequestBody, request: Request, buyer: Buyer = Depends(authenticate)
) -> Any:
    """Texts to vectors on an embedding node: one held, receipted, billed job per request."""
    state = market_state(request)
    endpoint = endpoint_label(request.scope)
    started = time.monotonic()
    try:
        job_request = EmbeddingRequest.from_openai(body.model_dump(mode="json",
                                                                   exclude_none=True))
    except InvalidJobRequest as exc:
        raise BadRequest(str(exc), param=exc.param) from None
    if body.dimensions is not None:
        layout = state.catalog.require_task(body.model, "embedding").embedding_layout
        width = layout.dimensions if layout is not None else 0
        if body.dimensions != width:
            raise BadRequest(f"'{body.model}' returns {width}-dimensional vectors and cannot "
                             "shorten them", param="dimensions", code="unsupported_parameter")
    job = await JobSession.open_embedding(state, buyer, job_request, body.max_price_per_mtok)
    await job.run_to_end()
    runner = job.runner
    content = await asyncio.to_thread(embedding_response, body.model,
                                      runner.vectors,  # type: ignore[union-attr]
                                      body.encoding_format, runner.spec.prompt_tokens)
    state.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
    state.metrics.requests.labels(endpoint, "200").inc()
    return Response(content, media_type="application/json")


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


def _model_card(model_id: str, conns: list[Any]) -> dict[str, Any]:
    """One model as OpenAI lists it, with what the market knows of its nodes: how many,
    the longest context, the lowest prices, and which parameters some node serves."""
    offer = conns[0].models[model_id]
    if offer.task == "embedding":
        return {"id": model_id, "object": "model",
                "created": min(c.connected_at for c in conns), "owned_by": "aidp-market",
                "task": "embedding", "nodes": len(conns), "dimensions": offer.dimensions,
                "context_length": max(c.models[model_id].context_length for c in conns),
                "price_per_mtok": {"input": min(c.price_in for c in conns)}}
    return {
        "id": model_id,
        "object": "model",
        # since when the market serves it: its longest-connected node's arrival
        "created": min(c.connected_at for c in conns),
        "owned_by": "aidp-market",
        "task": "generation",
        "nodes": len(conns),
        "context_length": max(c.models[model_id].context_length for c in conns),
        "price_per_mtok": {
            "input": min(c.price_in for c in conns),
            "output": min(c.price_out for c in conns),
        },
        "capabilities": {
            parameter: sum(offers(c.models[model_id], frozenset({feature})) for c in conns)
            for feature, parameter in FEATURE_PARAMETERS.items()
        },
    }


@router.get("/v1/models")
async def list_models(request: Request, _buyer: Buyer = Depends(authenticate)) -> Any:
    state = market_state(request)
    data = [_model_card(model_id, conns)
            for model_id, conns in sorted(state.registry.available_models().items())]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request,
                    _buyer: Buyer = Depends(authenticate)) -> Any:
    conns = market_state(request).registry.available_models().get(model_id)
    if not conns:
        raise ModelNotFound(f"The model '{model_id}' does not exist or no node offers it",
                            param="model")
    return _model_card(model_id, conns)


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


__all__ = ["router", "complete", "job_order", "ChatCompletionRequest", "CompletionRequest"]
