"""The node link server at the protocol level: raw WebSocket frames, no node agent."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from solders.keypair import Keypair
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from protocol.canonical import sha256_hex
from protocol.job import JobRequest
from protocol.keys import LINK_AUTH_DOMAIN, RECEIPT_DOMAIN, link_auth_message, sign
from protocol.messages import Hello, ModelOffer, Price, encode
from protocol.receipt import ReceiptBody, sign_receipt
from tests.support.engines import VOCAB, next_token
from tests.support.fake_node import close_node, fingerprint_rows, receipt_fields
from tests.support.market import (
    HEARTBEAT,
    Buyer,
    Market,
    Nodes,
    expected_output,
    unique_model,
    wait_for,
)


def hello_frame(keypair: Keypair, model: str = "raw-model", price: tuple[int, int] = (1, 1)) -> str:
    return encode(
        Hello(
            pubkey=str(keypair.pubkey()),
            agent_version="raw-test",
            models=[ModelOffer(id=model, sha256="ab" * 32, engine="raw", context_length=2048)],
            price=Price(input=price[0], output=price[1]),
            max_concurrency=2,
        )
    )


def link_url(market: Market) -> str:
    return market.url.replace("http://", "ws://") + "/v1/node/link"


def sign_challenge(keypair: Keypair, market: Market, challenge: dict[str, Any],
                   host: str | None = None) -> str:
    """The node's auth signature: the host it dialed and the market's nonce."""
    host = host or market.url.removeprefix("http://")
    return sign(keypair, LINK_AUTH_DOMAIN,
                link_auth_message(host, bytes.fromhex(challenge["nonce"])))


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def expect_reject(ws: ClientConnection) -> str:
    reply = await recv_json(ws)
    assert reply["type"] == "reject", reply
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    return str(reply["reason"])


@pytest.fixture(scope="module", autouse=True)
def _raw_model_listed(market: Market) -> None:
    market.list_model("raw-model", "ab" * 32)


async def test_valid_handshake_gets_welcome(market: Market) -> None:
    keypair = Keypair()
    async with connect(link_url(market)) as ws:
        await ws.send(hello_frame(keypair))
        challenge = await recv_json(ws)
        assert challenge["type"] == "challenge" and len(bytes.fromhex(challenge["nonce"])) == 32
        signature = sign_challenge(keypair, market, challenge)
        await ws.send(json.dumps({"type": "auth", "signature": signature}))
        welcome = await recv_json(ws)
        assert welcome["type"] == "welcome"
        assert welcome["heartbeat_interval"] == HEARTBEAT
        assert welcome["node_id"] in market.state.registry.links


async def test_signature_by_another_key_is_rejected(market: Market) -> None:
    async with connect(link_url(market)) as ws:
        await ws.send(hello_frame(Keypair()))
        challenge = await recv_json(ws)
        forged = sign_challenge(Keypair(), market, challenge)
        await ws.send(json.dumps({"type": "auth", "signature": forged}))
        assert "does not verify" in await expect_reject(ws)


@pytest.mark.parametrize("auth", [{"type": "auth", "signature": ""},
                                  {"type": "auth", "signature": "not-base58-!!"},
                                  {"type": "status", "running": 0, "queued": 0},
                                  {"type": "auth"}])
async def test_unsigned_auth_is_rejected(market: Market, auth: dict[str, Any]) -> None:
    async with connect(link_url(market)) as ws:
        await ws.send(hello_frame(Keypair()))
        await recv_json(ws)
        await ws.send(json.dumps(auth))
        await expect_reject(ws)


async def test_signature_without_domain_is_rejected(market: Market) -> None:
    keypair = Keypair()
    async with connect(link_url(market)) as ws:
        await ws.send(hello_frame(keypair))
        challenge = await recv_json(ws)
        raw = str(keypair.sign_message(bytes.fromhex(challenge["nonce"])))
        await ws.send(json.dumps({"type": "auth", "signature": raw}))
        await expect_reject(ws)


async def test_signature_for_another_market_host_is_rejected(market: Market) -> None:
    """A malicious market relaying this market's challenge gets the node to sign its own
    host, which this market refuses: the node cannot be impersonated by relay."""
    keypair = Keypair()
    async with connect(link_url(market)) as ws:
        await ws.send(hello_frame(keypair))
        challenge = await recv_json(ws)
        relayed = sign_challenge(keypair, market, challenge, host="evil-market.example:8000")
        await ws.send(json.dumps({"type": "auth", "signature": relayed}))
        assert "does not verify" in await expect_reject(ws)


async def test_replayed_nonce_signature_is_rejected(market: Market) -> None:
    keypair = Keypair()
    async with connect(link_url(market)) as first:
        await first.send(hello_frame(keypair))
        challenge = await recv_json(first)
        signature = sign_challenge(keypair, market, challenge)
        await first.send(json.dumps({"type": "auth", "signature": signature}))
        assert (await recv_json(first))["type"] == "welcome"
    # An eavesdropper replays the captured auth on a new connection: a fresh nonce.
    async with connect(link_url(market)) as second:
        await second.send(hello_frame(keypair))
        challenge2 = await recv_json(second)
        assert challenge2["nonce"] != challenge["nonce"]
        await second.send(json.dumps({"type": "auth", "signature": signature}))
        await expect_reject(second)


async def test_bad_hello_is_rejected(market: Market) -> None:
    async with connect(link_url(market)) as ws:
        frame = json.loads(hello_frame(Keypair()))
        frame["pubkey"] = "not-a-key"
        await ws.send(json.dumps(frame))
        assert "pubkey" in await expect_reject(ws)
    async with connect(link_url(market)) as ws:
        await ws.send(json.dumps({"type": "hello"}))
        await expect_reject(ws)


# ---- a raw node that can serve (and misbehave) --------------------------------------------


class RawNode:
    """A hand-written node: enough protocol to serve deterministic jobs, with knobs to
    tamper with receipts or go silent."""

    def __init__(self, market: Market, model: str, *, tamper: str | None = None,
                 silent_after_job: bool = False, price: tuple[int, int] = (1, 1)) -> None:
        self.market = market
        self.model = model
        self.keypair = Keypair()
        self.tamper = tamper
        self.silent_after_job = silent_after_job
        self.price = price
        self.jobs: list[dict[str, Any]] = []
        self.node_id: str | None = None
        self.silent = False
        self._tasks: list[asyncio.Task[Any]] = []
        self.ws: ClientConnection | None = None
        self.gate = asyncio.Event()  # done is held until the test opens the gate
        self.gate.set()

    async def start(self) -> None:
        model_sha = sha256_hex(self.model)  # what DeterministicEngine registers
        self.market.list_model(self.model, model_sha)
        self.ws = await connect(link_url(self.market))
        ws = self.ws
        hello = Hello(
            pubkey=str(self.keypair.pubkey()), agent_version="raw",
            models=[ModelOffer(id=self.model, sha256=model_sha, engine="raw", context_length=4096)],
            price=Price(input=self.price[0], output=self.price[1]), max_concurrency=4,
        )
        await ws.send(encode(hello))
        challenge = await recv_json(ws)
        await ws.send(json.dumps({"type": "auth", "signature": sign_challenge(
            self.keypair, self.market, challenge)}))
        welcome = await recv_json(ws)
        assert welcome["type"] == "welcome"
        self.node_id = welcome["node_id"]
        self._tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._serve())]

    async def _heartbeat(self) -> None:
        assert self.ws is not None
        while True:
            if not self.silent:
                await self.ws.send(json.dumps({"type": "status", "running": 0, "queued": 0}))
            await asyncio.sleep(HEARTBEAT / 2)

    async def _serve(self) -> None:
        assert self.ws is not None
        async for raw in self.ws:
            message = json.loads(raw)
            if message["type"] == "job":
                self.jobs.append(message)
                if self.silent_after_job:
                    self.silent = True
                    continue
                await self._run(message)

    async def _run(self, job: dict[str, Any]) -> None:
        assert self.ws is not None
        request = JobRequest.model_validate(job["request"])
        prompt = (json.dumps([[m.role, m.content] for m in request.messages or []])
                  if request.kind == "chat" else request.prompt or "")
        tokens = list(job["continuation_token_ids"])
        out_ids: list[int] = []
        finish = "length"
        while len(out_ids) < request.sampling.max_tokens:
            token = next_token(prompt, tokens)
            if token == 0:
                finish = "stop"
                break
            tokens.append(token)
            out_ids.append(token)
            await self.ws.send(json.dumps({"type": "chunk", "job_id": job["job_id"],
                                           "text": VOCAB[token], "token_ids": [token]}))
        text = "".join(VOCAB[t] for t in out_ids)
        if self.tamper == "output":
            text = text + " (edited)"
        prompt_tokens = len(prompt.split()) + len(job["continuation_token_ids"])
        if self.tamper == "prompt_tokens":
            prompt_tokens += 1000
        body = ReceiptBody(
            job_id=job["job_id"], market_id=self.market.settings.market_id,
            node_pubkey=str(self.keypair.pubkey()), model_id=self.model,
            model_sha256=sha256_hex(self.model) if self.tamper != "model" else "00" * 32,
            engine="raw", engine_version="1",
            **receipt_fields(job, request, out_ids, text, prompt_tokens=prompt_tokens),
        )
        receipt = sign_receipt(self.keypair, body, out_ids,
                               fingerprint_rows(out_ids)).model_dump(mode="json")
        await self.gate.wait()
        if self.tamper == "signature":
            other = sign(Keypair(), RECEIPT_DOMAIN, bytes.fromhex(body.digest()))
            receipt["signature"] = other
        await self.ws.send(json.dumps({
            "type": "done", "job_id": job["job_id"], "finish_reason": finish, "receipt": receipt,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(out_ids),
                      "total_tokens": prompt_tokens + len(out_ids)},
        }))

    async def close(self) -> None:
        await close_node(self._tasks, self.ws)


async def node_row(market: Market, node_id: str) -> dict[str, Any]:
    with market.admin() as admin:
        rows = admin.get("/admin/nodes").json()["data"]
    return next(r for r in rows if r["id"] == node_id)


async def test_raw_node_serves_a_job(buyer: Buyer, market: Market) -> None:
    model = unique_model("raw")
    node = RawNode(market, model)
    await node.start()
    try:
        messages = [{"role": "user", "content": "tell me a story"}]
        reply = await buyer.client().chat.completions.create(model=model, messages=messages,
                                                             max_tokens=10)
        text, _ = await expected_output("chat", model, 10, messages=messages)
        assert reply.choices[0].message.content == text
        assert node.jobs[0]["request"]["sampling"]["max_tokens"] == 10
    finally:
        await node.close()


async def test_silent_node_marked_unhealthy_within_three_intervals(market: Market) -> None:
    node = RawNode(market, unique_model("raw"))
    await node.start()
    try:
        assert node.node_id is not None
        assert (await node_row(market, node.node_id))["healthy"]
        node.silent = True
        silent_since = time.monotonic()
        while (await node_row(market, node.node_id))["healthy"]:
            await asyncio.sleep(0.02)
            assert time.monotonic() - silent_since < 10
        elapsed = time.monotonic() - silent_since
        # 3 intervals + one heartbeat already in flight + the monitor's tick
        assert elapsed <= 3 * HEARTBEAT + HEARTBEAT / 2 + 0.3, elapsed
        node.silent = False
        while not (await node_row(market, node.node_id))["healthy"]:
            await asyncio.sleep(0.02)
            assert time.monotonic() - silent_since < 10
    finally:
        await node.close()


@pytest.mark.parametrize("tamper", ["output", "signature", "model", "prompt_tokens"])
async def test_bad_receipt_is_rejected_and_job_fails_over(
    buyer: Buyer, market: Market, nodes: Nodes, tamper: str
) -> None:
    """The cheat streams its whole answer (13 tokens, then EOS) and sends a bad receipt.
    The market rejects it, counts it against the cheat, and continues on an honest node
    from the relayed tokens; that node's receipt (it adds only EOS) is the one billed."""
    model = unique_model("raw")
    cheat = RawNode(market, model, tamper=tamper)
    await cheat.start()
    try:
        messages = [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": "what is up"}]
        text, ids = await expected_output("chat", model, 30, messages=messages)
        assert len(ids) == 13
        # Only the cheat is up when the job is placed; an honest node joins before the
        # cheat sends its bad receipt, so the job has somewhere to fail over to.
        cheat.gate.clear()
        request = asyncio.create_task(buyer.client().chat.completions.create(
            model=model, messages=messages, max_tokens=30
        ))
        await wait_for(lambda: bool(cheat.jobs))
        # at the cheat's prices: the job's hold covers no more than those
        honest = await nodes.start(model, price=cheat.price)
        cheat.gate.set()
        reply = await request
        assert reply.choices[0].message.content == text
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage is not None and reply.usage.completion_tokens == 13
        assert honest.stats.jobs_done == 1
        row = await node_row(market, cheat.node_id or "")
        assert row["jobs_failed"] >= 1
        assert row["failure_rate"] > 0
        job = buyer.get("/v1/usage?limit=1")["data"][0]
        assert job["failovers"] == 1
        assert job["status"] == "completed"
        assert job["charged"] > 0  # the honest continuation's receipt
        metrics = market.state.metrics.receipts_rejected
        assert sum(s.value for m in metrics.collect() for s in m.samples
                   if s.name.endswith("_total")) >= 1
    finally:
        await cheat.close()


async def test_bad_receipt_after_full_output_charges_nothing(
    buyer: Buyer, market: Market
) -> None:
    """All max_tokens were relayed, then the receipt fails: the buyer has the text, no
    receipt proves it, so nobody is charged or paid for it."""
    model = unique_model("raw")
    cheat = RawNode(market, model, tamper="output")
    await cheat.start()
    try:
        messages = [{"role": "user", "content": "tell me a story"}]
        client = market.buyer(credit=10**9)
        reply = await client.client().chat.completions.create(
            model=model, messages=messages, max_tokens=10
        )
        text, _ = await expected_output("chat", model, 10, messages=messages)
        assert reply.choices[0].message.content == text
        job = client.get("/v1/usage?limit=1")["data"][0]
        assert job["charged"] == 0
        account = client.get("/v1/account")
        assert account["balance"] == 10**9 and account["held"] == 0
    finally:
        await cheat.close()


async def test_silent_node_mid_job_fails_over(buyer: Buyer, market: Market, nodes: Nodes) -> None:
    model = unique_model("raw")
    hung = RawNode(market, model, silent_after_job=True)
    await hung.start()
    try:
        async def start_honest() -> None:
            while not hung.jobs:
                await asyncio.sleep(0.005)
            await nodes.start(model, price=hung.price)

        helper = asyncio.create_task(start_honest())
        messages = [{"role": "user", "content": "count to ten"}]
        started = time.monotonic()
        reply = await buyer.client().chat.completions.create(
            model=model, messages=messages, max_tokens=8
        )
        await helper
        text, _ = await expected_output("chat", model, 8, messages=messages)
        assert reply.choices[0].message.content == text
        # failed over by the health monitor, far sooner than the first-token timeout
        assert time.monotonic() - started < market.settings.routing.job_first_token_timeout
    finally:
        await hung.close()
