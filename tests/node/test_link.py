"""The real NodeLink against a protocol-conformant market peer (raw WebSocket frames)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from node_agent.link import NodeLink, link_url
from protocol.canonical import sha256_hex
from protocol.job import request_digest
from protocol.messages import Cancel, Done, JobError
from tests.node.conftest import MarketPeer
from tests.support.engines import DeterministicEngine
from tests.support.market import wait_for

BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0}


def make_link(peer: MarketPeer, keypair, engine=None, **kw) -> NodeLink:
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_max", 0.2)
    return NodeLink(peer.url, keypair, engine or DeterministicEngine(), price=(100, 200), **kw)


async def _started(link: NodeLink) -> asyncio.Task[None]:
    """Run ``link`` until the peer has welcomed it; the task is the link's run loop."""
    task = asyncio.create_task(link.run())
    await link.wait_ready(5)
    return task


async def _stopped(link: NodeLink, task: asyncio.Task[None]) -> None:
    """Stop ``link`` and wait for its run loop to end; an error in it fails the test."""
    await link.stop()
    await task


def test_link_url() -> None:
    assert link_url("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/v1/node/link"
    assert link_url("https://m.example/") == "wss://m.example/v1/node/link"
    assert link_url("ws://h:1/v1/node/link") == "ws://h:1/v1/node/link"
    with pytest.raises(ValueError):
        link_url("ftp://h")


async def test_handshake_heartbeat_and_job(market_peer: MarketPeer, keypair) -> None:
    link = make_link(market_peer, keypair, max_concurrency=2, region="eu")
    task = await _started(link)
    hello = market_peer.hellos[0]
    assert hello.pubkey == str(keypair.pubkey()) and hello.region == "eu"
    assert hello.max_concurrency == 2 and hello.price.input == 100 and hello.price.output == 200
    assert hello.models[0].id == "test-model" and market_peer.auth_ok == [True]
    assert link.node_id == "node-1"

    await market_peer.job("j1", BODY)
    done = await market_peer.wait_end("j1")
    assert isinstance(done, Done), done
    receipt = done.receipt
    assert receipt.signature_valid() and receipt.token_ids_consistent()
    text = market_peer.text("j1")
    assert receipt.body.output_sha256 == sha256_hex(text)
    assert receipt.output_token_ids == market_peer.token_ids("j1")
    assert receipt.body.request_sha256 == request_digest("chat", BODY["messages"], [])
    assert receipt.body.sampling.temperature == 0.0 and receipt.body.sampling.max_tokens == 12
    assert done.usage.completion_tokens == len(receipt.output_token_ids)
    assert receipt.body.gpu is None  # no GPU monitor given

    await asyncio.sleep(0.35)  # heartbeats every 0.1 s as the market asked
    assert len(market_peer.statuses) >= 2
    await link.stop()
    await asyncio.wait_for(task, 5)


async def test_continuation_job_streams_only_new_tokens(market_peer: MarketPeer, keypair) -> None:
    link = make_link(market_peer, keypair)
    task = await _started(link)
    body = dict(BODY, max_tokens=20)
    await market_peer.job("full", body)
    await market_peer.wait_end("full")
    full_ids = market_peer.token_ids("full")
    prefix = full_ids[:5]
    await market_peer.job("cont", dict(body, max_tokens=15), continuation_token_ids=prefix)
    done = await market_peer.wait_end("cont")
    assert isinstance(done, Done)
    assert market_peer.token_ids("cont") == full_ids[5:]
    assert done.receipt.body.request_sha256 == request_digest("chat", body["messages"], prefix)
    await _stopped(link, task)


async def test_cancel_before_the_first_token_is_an_error(market_peer: MarketPeer, keypair) -> None:
    """Nothing produced, nothing to sign."""
    link = make_link(market_peer, keypair, DeterministicEngine(token_delay=5.0))
    task = await _started(link)
    await market_peer.job("unstarted", BODY)
    await wait_for(lambda: link.running_jobs == 1)
    await market_peer.send(Cancel(job_id="unstarted"))
    end = await market_peer.wait_end("unstarted", timeout=3)
    assert isinstance(end, JobError) and end.code == "cancelled"
    assert market_peer.token_ids("unstarted") == []
    await _stopped(link, task)


async def test_cancel_busy_and_errors(market_peer: MarketPeer, keypair) -> None:
    link = make_link(market_peer, keypair, DeterministicEngine(token_delay=0.05), max_concurrency=1)
    task = await _started(link)
    await market_peer.job("slow", dict(BODY, max_tokens=1000))
    await market_peer.job("second", BODY)  # over max_concurrency
    busy = await market_peer.wait_end("second")
    assert isinstance(busy, JobError) and busy.code == "busy"
    await asyncio.wait_for(market_peer.job_events["slow:chunk"].wait(), 5)
    await market_peer.send(Cancel(job_id="slow"))
    end = await market_peer.wait_end("slow")
    # Tokens were produced: the node signs for them rather than dropping the work.
    assert isinstance(end, Done) and end.finish_reason == "cancelled"
    produced = market_peer.token_ids("slow")
    assert 1 <= len(produced) < 1000
    assert end.receipt.output_token_ids == produced
    assert end.receipt.body.output_sha256 == sha256_hex(market_peer.text("slow").encode())
    assert end.usage.completion_tokens == len(produced) and end.usage.prompt_tokens > 0
    assert end.receipt.signature_valid()
    assert link.running_jobs == 0

    await market_peer.job("nomodel", BODY, model="other")
    assert (await market_peer.wait_end("nomodel")).code == "model_not_found"
    await market_peer.job("bad", {"messages": "nope"})
    assert (await market_peer.wait_end("bad")).code == "bad_request"
    await market_peer.job("late", dict(BODY, max_tokens=1000), deadline=time.time() + 0.2)
    assert (await market_peer.wait_end("late")).code == "deadline_exceeded"
    await _stopped(link, task)


async def test_reconnects_after_market_drops(market_peer: MarketPeer, keypair) -> None:
    link = make_link(market_peer, keypair)
    task = await _started(link)
    await market_peer.connections[0].close()
    for _ in range(100):
        if link.stats.connections >= 2:
            break
        await asyncio.sleep(0.05)
    assert link.stats.connections == 2 and len(market_peer.auth_ok) == 2
    await _stopped(link, task)


async def test_reconnects_when_market_starts_late(keypair) -> None:
    peer = MarketPeer()
    from tests.support.net import free_port

    port = free_port()
    link = NodeLink(
        f"http://127.0.0.1:{port}",
        keypair,
        DeterministicEngine(),
        backoff_initial=0.05,
        backoff_max=0.2,
    )
    task = asyncio.create_task(link.run())
    await asyncio.sleep(0.3)
    assert link.stats.last_error is not None and not link.ready.is_set()
    from websockets.asyncio.server import serve

    server = await serve(peer._handle, "127.0.0.1", port)
    try:
        await link.wait_ready(5)
    finally:
        await _stopped(link, task)
        server.close()


async def test_rejected_node_keeps_retrying_with_backoff(keypair) -> None:
    async with MarketPeer(reject_reason="suspended") as peer:
        link = make_link(peer, keypair)
        task = asyncio.create_task(link.run())
        await asyncio.sleep(0.5)
        assert link.stats.last_reject == "suspended" and not link.ready.is_set()
        assert 2 <= len(peer.hellos) <= 12  # backoff, not a busy loop
        await _stopped(link, task)


async def test_drain_finishes_in_flight_and_refuses_new(market_peer: MarketPeer, keypair) -> None:
    link = make_link(market_peer, keypair, DeterministicEngine(token_delay=0.01), max_concurrency=4)
    task = await _started(link)
    await market_peer.job("inflight", dict(BODY, max_tokens=30))
    await asyncio.wait_for(market_peer.job_events["inflight:chunk"].wait(), 5)
    drain = asyncio.create_task(link.drain(timeout=10))
    await asyncio.sleep(0)
    await market_peer.job("new", BODY)
    assert (await market_peer.wait_end("new")).code == "draining"
    await drain
    assert isinstance(await market_peer.wait_end("inflight"), Done)
    await asyncio.wait_for(task, 5)


async def test_kill_drops_socket_without_a_word(market_peer: MarketPeer, keypair) -> None:
    link = make_link(market_peer, keypair, DeterministicEngine(token_delay=0.02))
    task = await _started(link)
    await market_peer.job("crash", dict(BODY, max_tokens=1000))
    await asyncio.wait_for(market_peer.job_events["crash:chunk"].wait(), 5)
    await link.kill()
    await asyncio.wait_for(task, 5)
    ws = market_peer.connections[0]
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.close_code is None or ws.close_code == 1006  # abnormal closure: no close frame
    frames = market_peer.frames["crash"]
    assert frames and all(f.type == "chunk" for f in frames)  # no done, no error


class _GarbledChallengePeer(MarketPeer):
    """A market whose challenge nonce is not hex."""

    async def _handle(self, ws) -> None:
        from protocol.messages import Challenge, encode, parse_node_message

        self.hellos.append(parse_node_message(await ws.recv()))
        await ws.send(encode(Challenge(nonce="not hex")))
        await asyncio.sleep(0.5)


async def test_a_garbled_challenge_is_a_protocol_error_and_the_link_keeps_dialling(keypair) -> None:
    async with _GarbledChallengePeer() as peer:
        link = make_link(peer, keypair)
        task = asyncio.create_task(link.run())
        await asyncio.sleep(0.5)
        assert not task.done()  # the link did not die on the bad frame
        assert "nonce" in (link.stats.last_error or "") and len(peer.hellos) >= 2
        await _stopped(link, task)


class _ClosingEngine(DeterministicEngine):
    """Records when its generator is closed."""

    def __init__(self) -> None:
        super().__init__(token_delay=0.05)
        self.closed_at: float | None = None

    async def generate(self, request):
        try:
            async for event in super().generate(request):
                yield event
        finally:
            self.closed_at = time.monotonic()


async def test_the_engine_stream_is_closed_when_the_deadline_passes(
    market_peer: MarketPeer, keypair
) -> None:
    engine = _ClosingEngine()
    link = make_link(market_peer, keypair, engine)
    task = await _started(link)
    await market_peer.job("late", dict(BODY, max_tokens=500), deadline=time.time() + 0.3)
    end = await market_peer.wait_end("late")
    assert isinstance(end, JobError) and end.code == "deadline_exceeded"
    assert engine.closed_at is not None  # the engine was told to stop generating
    await _stopped(link, task)


async def test_a_market_that_names_itself_otherwise_is_not_served(keypair) -> None:
    """The node signs the market it dialed and names it in every receipt: a welcome from a
    market calling itself something else (a relay) ends the session before any job."""
    async with MarketPeer(welcome_market_id="evil-market.example") as peer:
        link = make_link(peer, keypair)
        task = asyncio.create_task(link.run())
        try:
            await wait_for(lambda: link.stats.last_error is not None, timeout=5)
            assert "evil-market.example" in (link.stats.last_error or "")
            assert not link.ready.is_set() and link.stats.connections == 0
        finally:
            await link.stop()
            await asyncio.wait_for(task, 5)
    assert link.market_id == f"127.0.0.1:{peer.port}"


async def test_a_frame_over_the_nodes_limit_closes_the_link_and_runs_nothing(
    market_peer: MarketPeer, keypair
) -> None:
    """A hostile market cannot make a node buffer an endless frame: past MAX_FRAME_BYTES
    the node drops the connection (and dials again), and starts no job from it."""
    from node_agent.link import MAX_FRAME_BYTES

    link = make_link(market_peer, keypair)
    task = asyncio.create_task(link.run())
    try:
        await link.wait_ready(5)
        request = {"kind": "completion", "model": "test-model",
                   "prompt": "x" * (MAX_FRAME_BYTES + 1),
                   "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 1}}
        huge = {"type": "job", "job_id": "huge", "request": request, "deadline": 0.0}
        await market_peer.connections[-1].send(json.dumps(huge))
        await wait_for(lambda: len(market_peer.hellos) >= 2, timeout=10)  # it dialled again
        assert link.stats.jobs_accepted == 0 and "huge" not in market_peer.frames
    finally:
        await link.stop()
        await asyncio.wait_for(task, 5)
