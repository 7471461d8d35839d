"""Failover and routing with real node links (node_agent.link.NodeLink) killed mid-job.

The deterministic engine makes every healthy node produce the same continuation from
any prefix, so a buyer's stream that survives a node's death must equal the stream of
one healthy node, token for token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
from sqlalchemy import select

from inference.base import EngineError, GenerationEvent, GenerationRequest
from market.models import Job, Receipt
from market.money.billing import market_fee, node_cost
from market.verify.reexec import find_continuation
from protocol.job import JobRequest
from protocol.receipt import receipt_from_json
from tests.support.engines import DeterministicEngine
from tests.support.market import Buyer, Market, Nodes, expected_output, unique_model, wait_for

STORY = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me a story"}]


class BrokenEngine(DeterministicEngine):
    """Fails every job before its first token, as a crashed model server would."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        raise EngineError("engine_crashed", "the model server died")
        yield  # pragma: no cover - makes this an async generator


async def _job(market: Market, buyer: Buyer) -> dict:
    return buyer.get("/v1/usage?limit=1")["data"][0]


async def _stream_then_leave(market: Market, buyer: Buyer, model: str, after_chunks: int) -> None:
    """Stream a 100-token chat and disconnect after ``after_chunks`` chunks."""
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream(
            "POST", f"{market.api}/chat/completions",
            headers={"Authorization": f"Bearer {buyer.key}"},
            json={"model": model, "messages": STORY, "max_tokens": 100, "stream": True},
        ) as response:
            seen = 0
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    seen += 1
                if seen >= after_chunks:
                    break


def _receipts(market: Market, job_id: str) -> list[Receipt]:
    with market.state.db.session() as session:
        return list(session.execute(
            select(Receipt).where(Receipt.job_id == job_id).order_by(Receipt.seq)).scalars())


async def test_node_dies_before_first_token(buyer: Buyer, market: Market, nodes: Nodes) -> None:
    model = unique_model()
    slow = await nodes.start(model, token_delay=5.0)  # would take 5 s to its first token
    request = asyncio.create_task(buyer.client().chat.completions.create(
        model=model, messages=STORY, max_tokens=16
    ))
    await wait_for(lambda: slow.running_jobs == 1)
    await nodes.start(model)
    await slow.kill()
    reply = await request
    text, _ = await expected_output("chat", model, 16, messages=STORY)
    assert reply.choices[0].message.content == text
    job = await _job(market, buyer)
    assert job["failovers"] == 1 and job["status"] == "completed"


async def test_engine_error_before_first_token_is_invisible(
    buyer: Buyer, market: Market, nodes: Nodes
) -> None:
    model = unique_model()
    broken = await nodes.start(model, engine=BrokenEngine(model_id=model))
    good = await nodes.start(model)
    assert broken.node_id is not None
    conn = market.state.registry.links[broken.node_id]
    text, _ = await expected_output("chat", model, 4, messages=STORY)
    # The router picks between the two best at random: ask until the broken node was tried
    # (a run of 40 picks that all miss it has a probability of about 1e-12).
    requests = 0
    while conn.jobs_failed == 0 and requests < 40:
        reply = await buyer.client().chat.completions.create(
            model=model, messages=STORY, max_tokens=4
        )
        requests += 1
        assert reply.choices[0].message.content == text
    assert conn.jobs_failed >= 1 and conn.failure_rate > 0
    assert good.stats.jobs_done == requests  # every answer came from the good node


async def test_node_killed_mid_stream_stream_completes(
    buyer: Buyer, market: Market, nodes: Nodes
) -> None:
    model = unique_model()
    mid_stream = market.state.metrics.failovers.labels("mid_stream")
    failovers_before = mid_stream._value.get()
    first = await nodes.start(model, token_delay=0.02, price=(100, 200))
    stream = await buyer.client().chat.completions.create(
        model=model, messages=STORY, max_tokens=60, stream=True,
        stream_options={"include_usage": True},
    )
    parts: list[str] = []
    usage = None
    second = None
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
        if chunk.usage is not None and not chunk.choices:
            usage = chunk.usage
        if len(parts) == 20 and second is None:
            second = await nodes.start(model, token_delay=0.0, price=(100, 200))
            await first.kill()
    text, ids = await expected_output("chat", model, 60, messages=STORY)
    assert "".join(parts) == text
    assert len(ids) == 60
    assert usage is not None and usage.completion_tokens == 60
    assert second is not None and second.stats.jobs_done == 1
    job = await _job(market, buyer)
    assert job["failovers"] == 1 and job["status"] == "completed"
    assert job["completion_tokens"] == 60
    assert mid_stream._value.get() == failovers_before + 1
    # billed: the second node's receipt (prompt + the continued prefix, its own tokens)
    assert job["charged"] > 0 and job["hold"] >= job["charged"]
    # The dead node left no receipt; the second one is stored with the prefix it was given,
    # which is the one its signed request digest attests (so a verifier can replay it).
    (receipt,) = _receipts(market, job["id"])
    continued = 60 - receipt.completion_tokens
    assert continued >= 20
    assert receipt.continuation_token_ids == ids[:continued]
    signed = receipt_from_json(receipt.receipt)
    assert list(signed.output_token_ids) == ids[continued:]
    asked = JobRequest.from_openai("chat", {"model": model, "messages": STORY})
    assert find_continuation(signed, asked, [ids[:continued]]) == ids[:continued]
    assert find_continuation(signed, asked, [ids[:continued - 1], []]) is None


async def test_node_killed_mid_stream_non_stream(
    buyer: Buyer, market: Market, nodes: Nodes
) -> None:
    model = unique_model()
    first = await nodes.start(model, token_delay=0.02)
    request = asyncio.create_task(buyer.client().completions.create(
        model=model, prompt="Once upon a time", max_tokens=30
    ))
    await wait_for(lambda: first.running_jobs == 1 and first.stats.recent
                   and sum(n for _, n in first.stats.recent) >= 10)
    await nodes.start(model)
    await first.kill()
    reply = await request
    text, _ = await expected_output("completion", model, 30, prompt="Once upon a time")
    assert reply.choices[0].text == text
    assert reply.usage is not None and reply.usage.completion_tokens == 30


async def test_receipts_stored_per_segment(buyer: Buyer, market: Market, nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model, price=(1_000, 2_000))
    reply = await buyer.client().chat.completions.create(model=model, messages=STORY,
                                                         max_tokens=7)
    job_id = reply.id.removeprefix("chatcmpl-")
    with market.state.db.session() as session:
        job = session.get(Job, job_id)
        receipts = session.execute(select(Receipt).where(Receipt.job_id == job_id)).scalars().all()
        assert job is not None and len(receipts) == 1
        receipt = receipts[0]
        assert receipt.state == "pending"
        assert receipt.window_closes_at > receipt.created_at
        assert receipt.completion_tokens == 7
        assert receipt.output_text == reply.choices[0].message.content
        cost = node_cost(receipt.prompt_tokens, 7, 1_000, 2_000)
        assert receipt.node_earning == cost
        assert receipt.fee == market_fee(cost, market.settings.billing.market_fee_bps)
        assert job.charged_amount == receipt.cost == cost + receipt.fee


async def test_client_disconnect_cancels_node_and_bills_produced(
    market: Market, nodes: Nodes
) -> None:
    model = unique_model()
    node = await nodes.start(model, token_delay=0.05, price=(0, 1_000_000))
    buyer = market.buyer(credit=10**9)
    await _stream_then_leave(market, buyer, model, after_chunks=5)
    # The node is told to cancel promptly, long before its 100 tokens (5 s).
    await wait_for(lambda: node.running_jobs == 0, timeout=3)
    await wait_for(lambda: buyer.get("/v1/usage?limit=1")["data"][0]["status"] == "cancelled",
                   timeout=5)
    job = buyer.get("/v1/usage?limit=1")["data"][0]
    produced = job["completion_tokens"]
    assert 5 <= produced < 100
    # 1 base unit per token at 1,000,000 per Mtok, plus the market fee
    assert job["charged"] == produced + market_fee(produced, market.settings.billing.market_fee_bps)
    account = buyer.get("/v1/account")
    assert account["held"] == 0
    assert account["balance"] == 10**9 - job["charged"]
    # The node signed for what it produced and is paid for it, not the market.
    (receipt,) = _receipts(market, job["id"])
    assert receipt.completion_tokens == produced and receipt.node_earning == produced
    assert receipt.cost == job["charged"]
    assert receipt_from_json(receipt.receipt).signature_valid()
    with market.state.db.session() as session:
        assert session.get(Job, job["id"]).finish_reason == "cancelled"


class UnsignedCancelEngine(DeterministicEngine):
    """Cannot count its prompt after a cancel, so its node signs nothing (fault injection)."""

    async def prompt_token_count(self, request: GenerationRequest) -> int:
        raise EngineError("tokenizer_unavailable", "the tokenizer went away")


async def test_disconnect_without_a_receipt_bills_relayed_tokens(
    market: Market, nodes: Nodes
) -> None:
    model = unique_model()
    await nodes.start(model, engine=UnsignedCancelEngine(model_id=model, token_delay=0.05),
                      price=(0, 1_000_000))
    buyer = market.buyer(credit=10**9)
    await _stream_then_leave(market, buyer, model, after_chunks=5)
    await wait_for(lambda: buyer.get("/v1/usage?limit=1")["data"][0]["status"] == "cancelled",
                   timeout=10)
    job = buyer.get("/v1/usage?limit=1")["data"][0]
    produced = job["completion_tokens"]
    assert 5 <= produced < 100
    # No receipt: the relayed tokens are billed at the node's price, nobody is paid for them.
    assert _receipts(market, job["id"]) == []
    assert job["charged"] == produced + market_fee(produced, market.settings.billing.market_fee_bps)
    assert buyer.get("/v1/account")["held"] == 0


async def test_two_equal_nodes_share_traffic(buyer: Buyer, nodes: Nodes) -> None:
    model = unique_model()
    a = await nodes.start(model)
    b = await nodes.start(model)
    for _ in range(30):
        await buyer.client().completions.create(model=model, prompt="hi", max_tokens=2)
    assert a.stats.jobs_accepted + b.stats.jobs_accepted == 30
    assert min(a.stats.jobs_accepted, b.stats.jobs_accepted) >= 5


async def test_observed_stats_recorded(buyer: Buyer, market: Market, nodes: Nodes) -> None:
    model = unique_model()
    link = await nodes.start(model, token_delay=0.002)
    for _ in range(3):
        await buyer.client().chat.completions.create(model=model, messages=STORY, max_tokens=10)
    assert link.node_id is not None
    conn = market.state.registry.links[link.node_id]
    assert conn.ttft_ms is not None and conn.ttft_ms > 0
    assert conn.tokens_per_s is not None and conn.tokens_per_s > 0
    assert conn.failure_rate == 0.0
    assert conn.jobs_total == 3


async def test_all_nodes_failing_is_503(buyer: Buyer, nodes: Nodes) -> None:
    import openai
    import pytest

    model = unique_model()
    await nodes.start(model, engine=BrokenEngine(model_id=model))
    with pytest.raises(openai.InternalServerError) as info:
        await buyer.client().chat.completions.create(model=model, messages=STORY, max_tokens=4)
    assert info.value.status_code == 503
    assert info.value.response.json()["error"]["code"] == "upstream_failed"
    job = buyer.get("/v1/usage?limit=1")["data"][0]
    assert job["status"] == "failed" and job["charged"] == 0


async def test_keepalive_comments_while_the_node_is_slow(
    buyer: Buyer, market: Market, nodes: Nodes
) -> None:
    model = unique_model()
    await nodes.start(model, token_delay=2.5)  # first token after 2.5 s; keep-alive every 1 s
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"{market.api}/chat/completions",
            headers={"Authorization": f"Bearer {buyer.key}"},
            json={"model": model, "messages": STORY, "max_tokens": 1, "stream": True},
        )
    lines = [line for line in response.text.split("\n\n") if line]
    assert lines[0] == ": keep-alive"
    assert lines.count(": keep-alive") >= 2
    assert lines[-1] == "data: [DONE]"
    text, _ = await expected_output("chat", model, 1, messages=STORY)
    assert text in response.text
