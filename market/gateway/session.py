"""One buyer request's job, start to end: quote and hold → run → finalize.

``JobSession.open`` counts the prompt as a node must, prices the worst case at the prices
of the nodes that may serve it, holds that amount and writes the job; the session's
``JobRunner`` (``market.gateway.jobs``) dispatches it and relays its chunks; ``finalize``
writes the receipts and the charge and releases the hold, exactly once, whatever happened
in between (a failure, a buyer who left, a database that was away for a while). The
routes in ``market.api.openai`` only turn HTTP bodies into a ``JobOrder`` and events into
OpenAI's response shapes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

from inference.base import EngineError
from inference.convert import engine_request
from inference.grammar import GrammarMatcher, InvalidConstraint, vocabulary_tokenizer
from inference.sampler import SAMPLER
from inference.vocab import Vocabulary
from market.errors import APIError, BadRequest, PayloadTooLarge, UpstreamFailed
from market.gateway.auth import Buyer
from market.gateway.embeddings import EmbeddingRunner, EmbeddingSpec
from market.gateway.jobs import JobRunner, JobSpec
from market.gateway.router import required_features
from market.gateway.state import MarketState
from market.models import Job, new_id, utcnow
from market.money import billing
from market.settings import MarketSettings
from protocol import tools
from protocol.embedding import FLOAT_BYTES, EmbeddingRequest
from protocol.job import JobRequest
from protocol.messages import Job as JobMessage
from protocol.messages import encode

# prompts longer than this are tokenized in a worker thread, not on the event loop
TOKENIZE_INLINE_CHARS = 16_384
# JSON bytes one continuation token id may add to a job frame ("262143," is 7)
CONTINUATION_ID_BYTES = 8
# a job frame's bytes beyond its prompt text and continuation (ids, sampling, stop strings)
FRAME_OVERHEAD_BYTES = 16_384
MESSAGE_OVERHEAD_CHARS = 64  # a message's role, name and JSON punctuation
# an ``embedded`` frame's bytes beyond its vectors (the receipt, usage, punctuation)
EMBEDDED_OVERHEAD_BYTES = 8_192
# a finalize the database refused is retried after these pauses (doubling)
FINALIZE_RETRY_FIRST_S = 0.5
FINALIZE_RETRY_MAX_S = 30.0

log = logging.getLogger("market.gateway.session")

T = TypeVar("T")


@dataclass(frozen=True)
class JobOrder:
    """What the live path needs of a buyer's request: the typed job, and the few facts
    of the HTTP body the job contract does not carry."""

    request: JobRequest
    stream: bool = False
    price_cap: int | None = None  # the buyer's cap, AIDP base units per 1M tokens
    prompt_chars: int = 0  # characters of prompt text: cheap bounds before counting
    messages: int = 0  # chat messages (each adds a little JSON to the job frame)
    max_tokens_given: bool = False  # the buyer set max_tokens (not the market's default)

    @property
    def model(self) -> str:
        return self.request.model


@dataclass(frozen=True)
class _Quote:
    """What a job may cost, from the market's own count of its prompt."""

    prompt_tokens: int
    prices: tuple[int, int]  # (input, output) per 1M tokens the hold covers
    hold: int


class JobSession:
    """A held, stored job and the runner that serves it; finalized exactly once."""

    def __init__(self, state: MarketState, runner: JobRunner | EmbeddingRunner) -> None:
        self.state = state
        self.runner = runner

    @classmethod
    async def open(cls, state: MarketState, buyer: Buyer, order: JobOrder) -> JobSession:
        """Check the model and capacity, count the prompt, hold the worst case, store the
        job. Raises the ``APIError`` the buyer sees (404, 400, 402, 413, 503)."""
        settings = state.settings
        if order.request.sampling.seed is None:  # every job's sampler noise is fixed here
            order = replace(order, request=order.request.with_seed(secrets.randbits(63)))
        state.catalog.require_task(order.model, "generation")
        state.router.ensure_available(order.model, order.price_cap,
                                      required_features(order.request))
        vocabulary = await state.catalog.vocabulary(order.model)
        _check_bias(order.request, vocabulary)
        grammar = None
        if order.request.constraint is not None:  # compiled off the loop (≤ 64 KiB schemas)
            grammar = await asyncio.to_thread(_compile_constraint, order.request, vocabulary)
        quote = await _quote(state, order, vocabulary)
        lifetime = settings.routing.job_first_token_timeout + settings.limits.job_max_duration_s
        spec = JobSpec(
            job_id=new_id("job"),
            request=order.request,
            vocabulary=vocabulary,
            prompt_tokens=quote.prompt_tokens,
            hold=quote.hold,
            price_bound=quote.prices,
            deadline=asyncio.get_running_loop().time() + lifetime,
            price_cap=order.price_cap,
        )
        _check_frame(spec, settings, order.prompt_chars + MESSAGE_OVERHEAD_CHARS * order.messages)
        job = Job(
            id=spec.job_id,
            account_id=buyer.account_id,
            api_key_id=buyer.key_id,
            model=order.model,
            kind=order.request.kind,
            request=order.request.model_dump(mode="json"),
            stream=order.stream,
            sampler=SAMPLER,
            status="running",
            hold_amount=quote.hold,
            deadline_at=utcnow() + timedelta(seconds=lifetime),
        )
        runner = JobRunner(state, spec, grammar)
        runner.hold_written = await _place_hold(state, buyer, job)
        return cls(state, runner)

    @classmethod
    async def open_embedding(cls, state: MarketState, buyer: Buyer, request: EmbeddingRequest,
                             price_cap: int | None = None) -> JobSession:
        """Check the model, count every input as the node must, hold what they cost,
        store the job (raises the ``APIError`` the buyer sees: 404, 400, 402, 413, 503)."""
        settings, model = state.settings, request.model
        listing = state.catalog.require_task(model, "embedding")
        state.router.ensure_available(model, price_cap)
        tokenizer = await state.catalog.embedding_tokenizer(model)
        chars = sum(len(text) for text in request.inputs)
        counts = (await asyncio.to_thread(tokenizer.count, request.inputs)
                  if chars > TOKENIZE_INLINE_CHARS else tokenizer.count(request.inputs))
        _check_inputs(state, request, counts, min(listing.context_length, tokenizer.max_tokens),
                      price_cap, tokenizer.layout.dimensions, chars)
        prices = state.router.hold_prices(model, price_cap, max(counts),
                                          settings.routing.hold_price_nodes,
                                          settings.routing.hold_price_spread)
        hold = billing.worst_case_hold(sum(counts), 0, *prices, settings.billing.market_fee_bps)
        lifetime = settings.routing.job_first_token_timeout + settings.limits.job_max_duration_s
        spec = EmbeddingSpec(job_id=new_id("job"), request=request, prompt_tokens=sum(counts),
                             longest_input=max(counts), hold=hold, price_bound=prices,
                             deadline=asyncio.get_running_loop().time() + lifetime,
                             dimensions=tokenizer.layout.dimensions,
                             normalized=tokenizer.layout.normalize, price_cap=price_cap)
        job = Job(id=spec.job_id, account_id=buyer.account_id, api_key_id=buyer.key_id,
                  model=model, kind=request.kind, request=request.model_dump(mode="json"),
                  stream=False, sampler=None, status="running", hold_amount=hold,
                  deadline_at=utcnow() + timedelta(seconds=lifetime))
        runner = EmbeddingRunner(state, spec)
        runner.hold_written = await _place_hold(state, buyer, job)
        return cls(state, runner)

    @classmethod
    async def open_choices(cls, state: MarketState, buyer: Buyer, order: JobOrder,
                           n: int) -> list[JobSession]:
        """``n`` jobs for OpenAI's ``n`` choices: each its own hold, receipt and bill, and
        its own seed (choice 0 keeps the buyer's; the others derive from it, or are drawn
        when the buyer gave none). All are held or none: a refusal releases the holds
        already placed, unstarted and uncharged (every hold is confirmed written before
        any choice starts, so no choice runs for a request that is then refused)."""
        sessions: list[JobSession] = []
        try:
            for index in range(n):
                seed = choice_seed(order.request.sampling.seed, index)
                request = order.request if seed is None else order.request.with_seed(seed)
                sessions.append(await cls.open(state, buyer, replace(order, request=request)))
            if n > 1:  # holds are written behind the balance check: wait for every one
                for session in sessions:
                    if session.runner.hold_written is not None:
                        await session.runner.hold_written
        except BaseException:
            for session in sessions:
                session.runner.error = UpstreamFailed("another choice of the request was refused")
                await session.finalize()
            raise
        return sessions

    @property
    def job_id(self) -> str:
        return self.runner.spec.job_id

    async def run_to_end(self) -> None:
        """Serve the whole job, then finalize it; raises the job's error, if any."""
        events = self.runner.events()
        await self.guarded(events, _drain(events))
        await self.finalize()
        if self.runner.error is not None:
            raise self.runner.error

    async def guarded(self, events: AsyncIterator[str | None], step: Awaitable[T]) -> T:
        """Await ``step`` (work on the runner's events). If it fails, finalize the job as
        failed; if the request is cancelled (buyer gone), abandon the job. Re-raises."""
        try:
            return await step
        except asyncio.CancelledError:
            self.state.spawn(self.abandon(events))
            raise
        except Exception as exc:
            self.runner.error = exc if isinstance(exc, APIError) else UpstreamFailed(str(exc))
            await self.finalize()
            raise

    async def abandon(self, events: Any) -> None:
        """The buyer went away: close the runner (sends ``cancel``) and bill what was
        produced."""
        self.runner.cancelled = True
        try:
            await events.aclose()
        finally:
            await self.finalize()

    async def finalize(self) -> None:
        """Write receipts and charge, release the hold; kept and retried until the
        database takes it."""
        state, runner = self.state, self.runner
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
        _observe(state, runner, outcome)


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index`` of a request seeded ``seed`` (a 63-bit hash of both
    for index > 0: reproducible, and each choice draws its own noise)."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.sha256(b"aidp-choice-v1" + seed.to_bytes(8, "little", signed=True)
                            + index.to_bytes(2, "little")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _observe(state: MarketState, runner: JobRunner, outcome: billing.Outcome) -> None:
    metrics = state.metrics
    model = runner.spec.model
    if runner.first_token_at is not None:
        metrics.ttft.labels(model).observe(runner.first_token_at - runner.started)
    metrics.tokens.labels(model, "prompt").inc(outcome.prompt_tokens)
    metrics.tokens.labels(model, "completion").inc(outcome.completion_tokens)
    metrics.charged.inc(sum(s.cost for s in outcome.segments) + outcome.unreceipted_charge)


# ---- quote and hold -----------------------------------------------------------------------


def _count_prompt(vocabulary: Vocabulary, request: JobRequest) -> int:
    """The rendered prompt's tokens, counted as a node must count them."""
    try:
        return len(vocabulary.prompt_token_ids(engine_request(request)))
    except EngineError as exc:
        raise BadRequest(f"the prompt cannot be rendered for this model: {exc}",
                         code=exc.code) from None


def _check_bias(request: JobRequest, vocabulary: Vocabulary) -> None:
    """400 for a logit bias outside the model's vocabulary (refused before any funds are
    held, never discovered by a node)."""
    if request.sampling.logit_bias and request.sampling.logit_bias[-1][0] >= vocabulary.size:
        raise BadRequest(f"logit_bias names token {request.sampling.logit_bias[-1][0]}; this "
                         f"model's token ids are 0…{vocabulary.size - 1}",
                         param="logit_bias", code="invalid_value")


def _compile_constraint(request: JobRequest, vocabulary: Vocabulary) -> GrammarMatcher:
    """The relay's own matcher of the job's constraint, against the listed vocabulary (as
    every node and verifier compiles it); 400 for a schema no grammar can be built from.
    Blocking: run it in a thread."""
    constraint = request.constraint
    assert constraint is not None
    try:
        return GrammarMatcher(vocabulary_tokenizer(vocabulary), constraint)
    except InvalidConstraint as exc:
        param = "tools" if constraint.name == tools.CONSTRAINT_NAME else "response_format"
        raise BadRequest(str(exc), param=param, code="invalid_value") from None


def _check_inputs(state: MarketState, request: EmbeddingRequest, counts: list[int],
                  model_max: int, price_cap: int | None, dimensions: int, chars: int) -> None:
    """400 for an input longer than the model reads (its own files and the listing say
    how long; a node may offer less); 413 when the job or its vectors would not fit one
    node-link frame (the width is the listing's, never a node's)."""
    context = min(model_max, state.router.max_context(request.model, price_cap))
    for index, count in enumerate(counts):
        if count > context:
            raise BadRequest(f"input {index} is {count} tokens; '{request.model}' reads at "
                             f"most {context} per input",
                             param="input" if len(counts) == 1 else f"input[{index}]",
                             code="context_length_exceeded")
    limit = state.settings.limits.link_max_frame_bytes
    answer = len(counts) * dimensions * FLOAT_BYTES * 4 // 3 + EMBEDDED_OVERHEAD_BYTES
    job = chars * 6 + FRAME_OVERHEAD_BYTES
    if max(answer, job) > limit:
        raise PayloadTooLarge(f"{len(counts)} inputs of {dimensions} dimensions need up to "
                              f"{max(answer, job)} bytes on the node link, more than its "
                              f"{limit}: send fewer inputs per request")


def _check_frame(spec: JobSpec, settings: MarketSettings, prompt_chars: int) -> None:
    """413 unless the job frame fits the node link however far it fails over (the
    continuation ids it may carry included). Encoded only when a cheap bound does not
    already show it fits (a character is at most 6 bytes of JSON)."""
    max_tokens = spec.request.sampling.max_tokens
    limit = settings.limits.link_max_frame_bytes
    if prompt_chars * 6 + FRAME_OVERHEAD_BYTES + max_tokens * CONTINUATION_ID_BYTES <= limit:
        return
    message = JobMessage(job_id=spec.job_id, request=spec.request, deadline=0.0)
    frame = len(encode(message).encode())
    worst = frame + max_tokens * CONTINUATION_ID_BYTES
    if worst > limit:
        raise PayloadTooLarge(
            f"this request needs up to {worst} bytes on the node link, more than its "
            f"{limit}: send a shorter prompt or a smaller max_tokens")


async def _quote(state: MarketState, order: JobOrder, vocabulary: Vocabulary) -> _Quote:
    """Count the prompt as a node must, check it fits a node, price the worst case."""
    settings, cap, request = state.settings, order.price_cap, order.request
    if order.prompt_chars > TOKENIZE_INLINE_CHARS:
        prompt_tokens = await asyncio.to_thread(_count_prompt, vocabulary, request)
    else:
        prompt_tokens = _count_prompt(vocabulary, request)
    context = state.router.max_context(order.model, cap)
    if prompt_tokens >= context:
        raise BadRequest(
            f"the prompt is {prompt_tokens} tokens; the longest context any node serving "
            f"'{order.model}' offers is {context}",
            param="messages" if request.kind == "chat" else "prompt",
            code="context_length_exceeded")
    max_tokens = request.sampling.max_tokens
    if order.max_tokens_given and prompt_tokens + max_tokens > context:
        # as OpenAI: asked for more than fits, a 400 (a default is cut to what fits)
        raise BadRequest(
            f"the prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}: "
            f"{prompt_tokens + max_tokens} in all, over the longest context any node "
            f"serving '{order.model}' offers ({context}); ask for at most "
            f"{context - prompt_tokens}",
            param="max_tokens", code="context_length_exceeded")
    routing = settings.routing
    prices = state.router.hold_prices(order.model, cap, prompt_tokens + 1,
                                      routing.hold_price_nodes, routing.hold_price_spread,
                                      frozenset(required_features(request)))
    hold = billing.worst_case_hold(prompt_tokens, request.sampling.max_tokens, *prices,
                                   settings.billing.market_fee_bps)
    return _Quote(prompt_tokens, prices, hold)


async def _place_hold(state: MarketState, buyer: Buyer, job: Job) -> asyncio.Future[int] | None:
    """Write the job and its hold. When the in-memory balance covers it, the write goes
    behind and the job starts now (the returned future; ``market.gateway.funds``);
    otherwise the write is awaited (402 when the database refuses it)."""
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
        state.spawn(_finalize_unstarted(state, job.id))
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


# ---- finalize -----------------------------------------------------------------------------


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


async def _finalize_unstarted(state: MarketState, job_id: str) -> None:
    outcome = billing.Outcome(status="cancelled", error="client disconnected")
    await state.writer.submit(
        lambda session: billing.finalize_job(session, job_id, outcome, challenge_window_s=0)
    )


async def _drain(events: AsyncIterator[str | None]) -> None:
    async for _ in events:
        pass
