"""Hostile nodes against the real market: each lie is refused, and no money moves for it.

Invariants held here: 1 (money only within what the market knows), 2 (unknown weights
refused at hello), 5 (links bounded), 6 (capacity cannot be faked).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import openai
import pytest
from sqlalchemy import select

from market.models import Job, Node, Receipt
from market.money import billing
from market.money.journal import audit
from tests.adversarial.hostile import (
    LIES,
    MANGLERS,
    HostileNode,
    claiming,
    dies_after,
    fail_at_once,
    hang,
    honest_output,
    refuse_busy,
    serve_honestly,
    streaming,
    with_sampling,
)
from tests.support.market import Buyer, Market, Nodes, expected_output, unique_model, wait_for

MESSAGES = [{"role": "user", "content": "tell me a story please"}]


def _job_row(market: Market, job_id: str) -> Job:
    with market.state.db.session() as s:
        job = s.get(Job, job_id)
        s.expunge(job)
        return job


def _receipts(market: Market, job_id: str) -> list[Receipt]:
    with market.state.db.session() as s:
        rows = list(s.execute(select(Receipt).where(Receipt.job_id == job_id)).scalars())
        for r in rows:
            s.expunge(r)
        return rows


def _node_earned(market: Market, node_id: str) -> int:
    with market.state.db.session() as s:
        node = s.get(Node, node_id)
        return int(node.earned_pending + node.earned_settled) if node else 0


def _journal_ok(market: Market) -> None:
    with market.state.db.session() as s:
        bad = [ln for ln in audit(s) if not ln.ok]
    assert not bad, bad


async def _ask(buyer: Buyer, model: str, max_tokens: int = 8, **kwargs):
    return await buyer.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=max_tokens, **kwargs)


# ---- refused at hello -------------------------------------------------------------------------


async def test_an_unlisted_model_or_weight_hash_is_refused_at_hello(hostile, market) -> None:
    reply = (await hostile(unique_model("unlisted"), serve_honestly, listed=False,
                           expect_welcome=False)).reply
    assert reply["type"] == "reject" and "not listed" in reply["reason"]
    model = unique_model("listed")
    market.list_model(model, "cd" * 32)  # the operator accepts these weights only
    reply = (await hostile(model, serve_honestly, listed=False, expect_welcome=False)).reply
    assert reply["type"] == "reject" and "not accepted" in reply["reason"]
    reply = (await hostile(model, serve_honestly, listed=False, expect_welcome=False,
                           sha256="cd" * 32, context_length=10**6)).reply
    assert reply["type"] == "reject" and "context_length" in reply["reason"]


async def test_advertised_concurrency_counts_only_up_to_the_cap(hostile, market) -> None:
    node = await hostile(unique_model("greedy"), serve_honestly, max_concurrency=100_000)
    conn = market.state.registry.links[node.node_id]
    assert conn.max_concurrency == market.settings.limits.node_max_concurrency


# ---- receipts that lie ------------------------------------------------------------------------


@pytest.mark.parametrize("lie", sorted(LIES))
async def test_a_lying_receipt_is_rejected_and_nobody_is_paid_for_it(
    hostile, market: Market, buyer: Buyer, lie: str
) -> None:
    model = unique_model("liar")
    cheat = await hostile(model, claiming(**LIES[lie]))
    before = buyer.get("/v1/account")
    reply = await _ask(buyer, model, max_tokens=8, temperature=0)
    job_id = reply.id.removeprefix("chatcmpl-")
    text, _ = await expected_output("chat", model, 8, messages=MESSAGES)
    assert reply.choices[0].message.content == text  # the buyer still has the output
    job = _job_row(market, job_id)
    assert job.charged_amount == 0 and _receipts(market, job_id) == []
    assert _node_earned(market, cheat.node_id) == 0
    after = buyer.get("/v1/account")
    assert after["balance"] == before["balance"] and after["held"] == 0
    _journal_ok(market)


async def test_a_receipt_replayed_from_an_earlier_job_is_rejected(
    hostile, market: Market, buyer: Buyer
) -> None:
    kept: list[dict] = []

    async def replaying(node: HostileNode, job: dict) -> None:
        out = honest_output(job)
        for chunk_text, ids in out.chunks:
            await node.chunk(job, chunk_text, ids)
        receipt = node.receipt(job, out.ids, out.text, prompt_tokens=out.prompt_tokens)
        if kept:
            receipt = kept[0]  # the first job's genuine receipt, sent again
        kept.append(receipt)
        await node.done(job, out.finish, receipt, out.prompt_tokens, len(out.ids))

    model = unique_model("replay")
    cheat = await hostile(model, replaying)
    first = await _ask(buyer, model, temperature=0)
    assert _job_row(market, first.id.removeprefix("chatcmpl-")).charged_amount > 0
    earned = _node_earned(market, cheat.node_id)
    second = await _ask(buyer, model, temperature=0)
    assert _job_row(market, second.id.removeprefix("chatcmpl-")).charged_amount == 0
    assert _node_earned(market, cheat.node_id) == earned
    _journal_ok(market)


# ---- chunks that lie --------------------------------------------------------------------------


@pytest.mark.parametrize("mangle", sorted(MANGLERS))
async def test_a_chunk_that_lies_is_never_relayed_and_the_job_moves_on(
    hostile, nodes: Nodes, market: Market, buyer: Buyer, mangle: str
) -> None:
    model = unique_model("mangler")
    cheat = await hostile(model, streaming(MANGLERS[mangle]))
    await nodes.start(model, price=cheat.price)
    chunks = []
    for _ in range(20):  # the router picks at random: ask until the cheat was tried
        stream = await _ask(buyer, model, max_tokens=12, temperature=0, stream=True)
        chunks = [c async for c in stream]
        if cheat.jobs:
            break
    assert cheat.jobs, "the cheat was never chosen"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected, _ = await expected_output("chat", model, 12, messages=MESSAGES)
    assert text == expected  # exactly what the ids decode to, nothing the cheat wrote
    assert "evil" not in text and "free" not in text
    assert market.state.registry.links[cheat.node_id].failure_rate > 0
    assert _node_earned(market, cheat.node_id) == 0
    _journal_ok(market)


async def test_ids_after_a_stop_string_are_refused(hostile, nodes, market, buyer) -> None:
    model = unique_model("nostop")
    full, _ = await expected_output("chat", model, 12, messages=MESSAGES)
    stop = full.split()[3]  # a word the honest output contains

    async def ignoring_stop(node: HostileNode, job: dict) -> None:
        out = honest_output(with_sampling(job, stop=[]))  # keeps going past the stop
        for text, chunk_ids in out.chunks:
            await node.chunk(job, text, chunk_ids)
        receipt = node.receipt(job, out.ids, out.text, prompt_tokens=out.prompt_tokens)
        await node.done(job, out.finish, receipt, out.prompt_tokens, len(out.ids))

    cheat = await hostile(model, ignoring_stop)
    await nodes.start(model, price=cheat.price)
    for _ in range(20):  # the router picks at random: ask until the cheat was tried
        reply = await _ask(buyer, model, max_tokens=12, temperature=0, stop=[stop])
        if cheat.jobs:
            break
    assert cheat.jobs, "the cheat was never chosen"
    assert reply.choices[0].message.content == full[:full.index(stop)]
    assert _node_earned(market, cheat.node_id) == 0
    assert market.state.registry.links[cheat.node_id].failure_rate > 0


# ---- money stays inside the hold ----------------------------------------------------------------


async def test_the_hold_is_exact_and_counts_the_prompt_as_the_market_tokenizes_it(
    nodes: Nodes, market: Market, buyer: Buyer
) -> None:
    from inference.convert import generation_request
    from inference.fake import FakeVocabulary

    model = unique_model("exact")
    await nodes.start(model, price=(1_000_000, 3_000_000))
    long_text = "word " * 2000  # 10 KB: a bytes-per-token bound would hold ~5× too much
    messages = [{"role": "user", "content": long_text}]
    reply = await buyer.client().chat.completions.create(model=model, messages=messages,
                                                         max_tokens=5, temperature=0)
    job = _job_row(market, reply.id.removeprefix("chatcmpl-"))
    body = {"model": model, "messages": messages, "max_tokens": 5, "temperature": 0}
    prompt = len(FakeVocabulary().prompt_token_ids(generation_request("chat", body)))
    assert reply.usage.prompt_tokens == prompt
    assert job.hold_amount == billing.worst_case_hold(prompt, 5, 1_000_000, 3_000_000,
                                                      market.settings.billing.market_fee_bps)
    assert job.charged_amount <= job.hold_amount


async def test_failover_segments_share_one_hold(hostile, nodes: Nodes, market: Market,
                                                 buyer: Buyer) -> None:
    """Input priced far above output: the continuing node's receipt (prompt + the
    continuation as its input) would cost more than the job's worst case. It is paid only
    what is left of the hold; the buyer never pays more than one job's worst case."""
    model = unique_model("shared-hold")
    price = (1_000_000_000, 1_000_000)  # per 1M tokens: 1,000 per input token, 1 per output
    replacement_up = asyncio.Event()
    dying = await hostile(model, lambda n, j: dies_after(n, j, 10, replacement_up),
                          price=price)
    reply_task = asyncio.create_task(_ask(buyer, model, max_tokens=30, temperature=0))
    await wait_for(lambda: bool(dying.jobs))
    await nodes.start(model, price=price)
    replacement_up.set()
    reply = await reply_task
    expected, _ = await expected_output("chat", model, 30, messages=MESSAGES)
    assert reply.choices[0].message.content == expected
    job = _job_row(market, reply.id.removeprefix("chatcmpl-"))
    receipts = _receipts(market, job.id)
    assert job.failovers == 1 and len(receipts) == 1
    uncapped = billing.node_cost(receipts[0].prompt_tokens, receipts[0].completion_tokens,
                                 *price)
    assert uncapped + billing.market_fee(uncapped, 1000) > job.hold_amount  # would exceed
    assert job.charged_amount == receipts[0].cost <= job.hold_amount
    assert receipts[0].node_earning < uncapped
    _journal_ok(market)


async def test_a_node_dearer_than_the_hold_is_never_used(hostile, nodes: Nodes,
                                                          market: Market, buyer: Buyer) -> None:
    model = unique_model("dear")
    dear_up = asyncio.Event()
    cheap = await hostile(model, lambda n, j: dies_after(n, j, 3, dear_up), price=(10, 10))
    reply_task = asyncio.create_task(_ask(buyer, model, max_tokens=20, temperature=0,
                                          stream=True))
    await wait_for(lambda: bool(cheap.jobs))
    dear = await nodes.start(model, price=(10_000, 10_000))  # joined after the hold
    dear_up.set()
    stream = await reply_task
    chunks = []
    with pytest.raises(openai.APIError, match="no other node"):
        async for chunk in stream:  # what the cheap node produced, then a clear error
            chunks.append(chunk)
    assert dear.stats.jobs_accepted == 0
    assert chunks
    with market.state.db.session() as s:
        job = s.execute(select(Job).order_by(Job.created_at.desc())).scalars().first()
        assert job.charged_amount <= job.hold_amount
    _journal_ok(market)


# ---- capacity cannot be faked ----------------------------------------------------------------


async def test_sybils_that_refuse_fail_or_hang_fail_no_request(
    hostile, nodes: Nodes, market: Market, buyer: Buyer
) -> None:
    """Four fake nodes advertising capacity (two refuse as busy, one fails every job,
    one accepts and never answers) and one honest node: no request fails, and the fakes
    soon sit out of routing."""
    model = unique_model("sybil")
    fakes = [await hostile(model, behaviour, max_concurrency=64)
             for behaviour in (refuse_busy, refuse_busy, fail_at_once, hang)]
    honest = await nodes.start(model, price=(1, 1), max_concurrency=16)
    client = buyer.client(timeout=120)
    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        try:
            await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"request {i}"}],
                max_tokens=4, temperature=0)
        except openai.APIError:
            failures += 1

    for start in range(0, 100, 10):
        await asyncio.gather(*(one(i) for i in range(start, start + 10)))
    assert failures <= 1, failures
    assert honest.stats.jobs_done >= 99
    for fake in fakes:
        conn = market.state.registry.links.get(fake.node_id or "")
        assert conn is not None and (conn.quarantines >= 1 or not fake.jobs)
    _journal_ok(market)


# ---- links are bounded -----------------------------------------------------------------------


async def _link_closed(market: Market, node: HostileNode) -> None:
    await wait_for(lambda: node.node_id not in market.state.registry.links, timeout=10)


async def test_an_oversized_frame_closes_the_nodes_link(hostile, market: Market) -> None:
    node = await hostile(unique_model("big"), serve_honestly)
    await node.send(json.dumps({"type": "status", "running": 0, "queued": 0,
                                "pad": "x" * (market.settings.limits.link_max_frame_bytes + 1)}))
    await _link_closed(market, node)


async def test_a_flood_of_frames_closes_the_link_and_costs_the_node(hostile, market) -> None:
    node = await hostile(unique_model("flood"), serve_honestly)
    conn = market.state.registry.links[node.node_id]
    frame = json.dumps({"type": "status", "running": 0, "queued": 0})
    burst = int(market.settings.limits.link_messages_per_s * 3)
    try:
        for _ in range(burst):
            await node.send(frame)
    except Exception:  # the market closed the link under the flood
        pass
    await _link_closed(market, node)
    assert conn.quarantined


async def test_malformed_frames_are_logged_a_few_times_then_the_link_closes(
    hostile, market: Market, caplog: pytest.LogCaptureFixture
) -> None:
    node = await hostile(unique_model("junk"), serve_honestly)
    caplog.set_level(logging.WARNING, logger="market.link")
    for i in range(market.settings.limits.link_max_malformed + 10):
        try:
            await node.send(f'{{"type": "nonsense", "n": {i}}}')
        except Exception:
            break
    await _link_closed(market, node)
    logged = [r for r in caplog.records if "sent a malformed frame" in r.getMessage()
              and node.node_id in r.getMessage()]
    assert 1 <= len(logged) <= market.settings.limits.link_malformed_logged


async def test_a_request_too_big_for_the_node_link_is_refused_before_dispatch(
    hostile, market: Market, buyer: Buyer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the smallest link the settings allow: a context's worth of continuation ids can
    # outgrow it (at the default 4 MiB no request within a context of 8,192 does)
    limits = market.state.settings.limits
    monkeypatch.setattr(limits, "link_max_frame_bytes", 64 << 10)
    node = await hostile(unique_model("link"), serve_honestly, context_length=8192)
    # fits the request body limit and the context, but with max_tokens' worth of
    # continuation ids the job frame could outgrow the link
    with pytest.raises(openai.APIStatusError) as exc:
        await buyer.client().chat.completions.create(
            model=node.model, messages=[{"role": "user", "content": "hi"}],
            max_tokens=8180)  # 8 bytes an id: 65,440 bytes of ids alone
    assert exc.value.status_code == 413
    assert node.jobs == []


async def _answers_with_vectors(node: Any, job: dict[str, Any]) -> None:
    """Answers a generation job with an embedding's frame (a well-formed one)."""
    out = honest_output(job)
    receipt = node.receipt(job, out.ids, out.text, prompt_tokens=out.prompt_tokens)
    usage = {"prompt_tokens": out.prompt_tokens, "completion_tokens": 0,
             "total_tokens": out.prompt_tokens}
    await node.send({"type": "embedded", "job_id": job["job_id"], "output": "",
                     "usage": usage, "receipt": receipt})


async def test_an_embedding_frame_answering_a_generation_fails_the_node_over(
        hostile, nodes: Nodes, market: Market, buyer: Buyer) -> None:
    model = unique_model("vectors")
    cheat = await hostile(model, _answers_with_vectors)
    await nodes.start(model, price=cheat.price)
    for _ in range(20):  # the router picks at random: ask until the cheat was tried
        reply = await _ask(buyer, model, max_tokens=8, temperature=0)
        if cheat.jobs:
            break
    assert cheat.jobs, "the cheat was never chosen"
    expected, _ = await expected_output("chat", model, 8, messages=MESSAGES)
    assert reply.choices[0].message.content == expected
    assert market.state.registry.links[cheat.node_id].jobs_failed >= 1
    assert _node_earned(market, cheat.node_id) == 0
