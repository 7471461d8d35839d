"""Attacks a red-team pass found against this suite's first version, each now held.

Invariants: 1 (text and money after a failover), 5 (links bounded: handshakes, frames
after the handshake, output beyond the node's context), 6 (a price cannot shut buyers
out), 8 (no 500 from any peer input).
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx
import openai
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from inference.convert import generation_request
from inference.fake import fake_sha256
from market.money.journal import audit
from protocol.messages import ModelOffer
from tests.adversarial.hostile import (
    VOCABULARY,
    HostileNode,
    claiming,
    dies_after,
    honest_output,
    serve_honestly,
    with_sampling,
)
from tests.support.market import Buyer, Market, Nodes, expected_output, unique_model, wait_for

MESSAGES = [{"role": "user", "content": "tell me a story please"}]


def _journal_ok(market: Market) -> None:
    with market.state.db.session() as s:
        bad = [ln for ln in audit(s) if not ln.ok]
    assert not bad, bad


async def test_a_nan_in_a_receipt_fails_the_node_over_not_the_buyer(
    hostile, nodes: Nodes, market: Market, buyer: Buyer
) -> None:
    """NaN cannot be hashed canonically: a receipt carrying one is a malformed frame, the
    job fails over to an honest node, and the buyer never sees a 500."""
    model = unique_model("nan")

    async def nan_receipt(node: HostileNode, job: dict[str, Any]) -> None:
        out = honest_output(job)
        for text, ids in out.chunks:
            await node.chunk(job, text, ids)
        receipt = node.receipt(job, out.ids, out.text, prompt_tokens=out.prompt_tokens)
        frame = json.dumps({"type": "done", "job_id": job["job_id"], "finish_reason": out.finish,
                            "receipt": receipt, "usage": {"prompt_tokens": out.prompt_tokens,
                                                          "completion_tokens": len(out.ids),
                                                          "total_tokens": 1}})
        await node.send(frame.replace('"started_at": ', '"started_at": NaN, "x": ', 1))

    cheat = await hostile(model, nan_receipt)
    await nodes.start(model, price=cheat.price)
    async with httpx.AsyncClient(base_url=market.url, timeout=60,
                                 headers={"Authorization": f"Bearer {buyer.key}"}) as http:
        statuses = [(await http.post("/v1/chat/completions", json={
            "model": model, "messages": MESSAGES, "max_tokens": 6, "temperature": 0})
        ).status_code for _ in range(10)]
    assert set(statuses) == {200}, statuses
    assert cheat.jobs and market.state.registry.links[cheat.node_id].failure_rate > 0
    _journal_ok(market)


async def test_a_stop_string_split_across_a_failover_still_stops_the_output(
    hostile, nodes: Nodes, market: Market, buyer: Buyer
) -> None:
    """The first node dies right after tokens that begin the buyer's stop string (text it
    held back, never sent). The continuing node sees the held text: the stop is honoured
    and the buyer gets exactly what one honest node gives, and pays for no more."""
    model = unique_model("split-stop")
    full, ids = await expected_output("chat", model, 20, messages=MESSAGES)
    pieces = [VOCABULARY.piece(t).decode() for t in ids]
    k = next(i for i in range(3, 18) if pieces[i] + pieces[i + 1] not in "".join(pieces[:i + 1]))
    stop = pieces[k] + pieces[k + 1]
    honest_text = full[:full.index(stop)]
    replacement_up = asyncio.Event()
    dying = await hostile(model, lambda n, j: dies_after(n, j, k + 1, replacement_up))
    reply_task = asyncio.create_task(buyer.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=20, temperature=0, stop=[stop]))
    await wait_for(lambda: bool(dying.jobs))
    await nodes.start(model, price=dying.price)
    replacement_up.set()
    reply = await reply_task
    assert reply.choices[0].message.content == honest_text
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == k + 2  # up to the token completing the stop
    _journal_ok(market)


async def test_a_fortune_asked_by_one_node_shuts_no_buyer_out(
    hostile, nodes: Nodes, market: Market
) -> None:
    model = unique_model("gouge")
    await nodes.start(model, price=(100, 200))
    gouger = await hostile(model, serve_honestly, price=(10**12, 10**12))
    poor = market.buyer(credit=10**6, name="poor")
    async with httpx.AsyncClient(base_url=market.url, timeout=30,
                                 headers={"Authorization": f"Bearer {poor.key}"}) as http:
        statuses = [(await http.post("/v1/chat/completions", json={
            "model": model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0})
        ).status_code for _ in range(6)]
    assert statuses == [200] * 6
    assert gouger.jobs == []  # far above the others: not offered the job
    assert poor.get("/v1/account")["balance"] > 10**6 - 100


async def test_idle_sockets_from_one_peer_cannot_lock_nodes_out(
    nodes: Nodes, market: Market
) -> None:
    """Unauthenticated links are capped per peer address (and in all): a peer holding its
    share of idle handshakes is refused more, and a node from elsewhere still links."""
    port = int(market.url.rsplit(":", 1)[1])
    idle = []
    try:
        for _ in range(market.settings.limits.link_max_pending_per_peer):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))  # the attacker's address (loopback, another one)
            sock.connect(("127.0.0.1", port))
            idle.append(await connect(f"ws://127.0.0.1:{port}/v1/node/link", sock=sock))
        await wait_for(lambda: market.state.pending_by_peer.get("127.0.0.2", 0) ==
                       market.settings.limits.link_max_pending_per_peer)
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", port))
        with pytest.raises(InvalidStatus):  # refused before the WebSocket opens
            await connect(f"ws://127.0.0.1:{port}/v1/node/link", sock=sock)
        honest = await nodes.start(unique_model("still-links"))  # from 127.0.0.1
        assert honest.node_id in market.state.registry.links
    finally:
        for ws in idle:
            await ws.close()


async def test_handshake_frames_after_the_handshake_are_bounded_like_malformed_ones(
    hostile, market: Market
) -> None:
    node = await hostile(unique_model("chatty"), serve_honestly)
    frame = json.dumps({"type": "auth", "signature": "x"})
    for _ in range(market.settings.limits.link_max_malformed + 5):
        try:
            await node.send(frame)
        except Exception:
            break
    await wait_for(lambda: node.node_id not in market.state.registry.links, timeout=10)


async def test_a_hello_offering_one_model_twice_gets_a_clear_reject(market: Market) -> None:
    model = unique_model("twice")
    node = HostileNode(market.url, market.settings.market_id, model, claiming())
    market.list_model(model, fake_sha256(model))
    url = market.url.replace("http://", "ws://") + "/v1/node/link"
    offer = ModelOffer(id=model, sha256="ab" * 32, engine="x", context_length=1).model_dump()
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "hello", "protocol_version": 2, "pubkey": node.pubkey,
                                  "agent_version": "x", "models": [offer, offer],
                                  "price": {"input": 1, "output": 1}, "max_concurrency": 1}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert reply["type"] == "reject" and "once" in reply["reason"]


async def test_no_more_output_than_the_nodes_own_context_is_taken(
    hostile, market: Market, buyer: Buyer
) -> None:
    """A node that advertised a 24-token context cannot stream (and be paid for) more
    than what that context holds after the prompt: the default max_tokens (256) is cut
    to what fits, and an explicit one that cannot fit is refused before dispatch."""
    model = unique_model("ctx")

    async def overflowing(node: HostileNode, job: dict[str, Any]) -> None:
        out = honest_output(with_sampling(job, max_tokens=60))
        for text, ids in out.chunks:
            await node.chunk(job, text, ids)

    cheat = await hostile(model, overflowing, context_length=24)
    with pytest.raises(openai.BadRequestError):  # an explicit 60 cannot fit: the buyer's error
        await buyer.client().chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=60, temperature=0)
    stream = await buyer.client().chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, stream=True)
    received = []
    with pytest.raises(Exception):
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    prompt = len(VOCABULARY.prompt_token_ids(generation_request("chat", {"messages": MESSAGES})))
    assert len(received) <= 24 - prompt
    assert market.state.registry.links[cheat.node_id].failure_rate > 0
    _journal_ok(market)
