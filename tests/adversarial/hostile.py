"""A hostile node: hand-written frames on a real WebSocket to the real market.

It authenticates like any node (its own keypair), then answers each ``job`` with a
behaviour the test picks: honest, or one of the ways a cheat would try to take money
or escape verification. The honest parts (token ids, text, receipt) come from the
deterministic engine's own rules, so only the lie a test asks for differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from solders.keypair import Keypair
from websockets.asyncio.client import ClientConnection, connect

from inference.base import GenerationRequest
from inference.convert import engine_request
from inference.fake import EOS, FakeVocabulary, fake_sha256, next_token, prompt_text
from protocol.job import JobRequest
from protocol.keys import LINK_AUTH_DOMAIN, RECEIPT_DOMAIN, link_auth_message, sign
from protocol.messages import Hello, ModelOffer, Price, encode
from protocol.receipt import ReceiptBody, SamplingParams, sign_receipt
from protocol.text import TextStream
from tests.support.fake_node import close_node, fingerprint_rows, receipt_fields

Behaviour = Callable[["HostileNode", dict[str, Any]], Awaitable[None]]
VOCABULARY = FakeVocabulary()


@dataclass
class Honest:
    """What an honest deterministic node produces for a job."""

    ids: list[int]
    chunks: list[tuple[str, list[int]]]  # (text, ids) per chunk, as an honest node sends
    finish: str
    prompt_tokens: int

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.chunks)


def with_sampling(job: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The job frame with some sampling fields changed (what a cheat pretends it got)."""
    request = job["request"]
    return {**job, "request": {**request, "sampling": {**request["sampling"], **changes}}}


def honest_output(job: dict[str, Any]) -> Honest:
    request: GenerationRequest = engine_request(JobRequest.model_validate(job["request"]),
                                                job["continuation_token_ids"])
    prompt = prompt_text(request)
    tokens = list(request.continuation_token_ids)
    stream = TextStream(request.stop)
    stream.prime(VOCABULARY.piece(t) for t in tokens)
    chunks: list[tuple[str, list[int]]] = []
    ids: list[int] = []
    finish, stopped = "length", False
    while len(ids) < request.max_tokens:
        token = next_token(prompt, tokens)
        if token == EOS:
            finish = "stop"
            break
        tokens.append(token)
        ids.append(token)
        delta, stopped = stream.push(VOCABULARY.piece(token))
        chunks.append((delta, [token]))
        if stopped:
            finish = "stop"
            break
    tail = "" if stopped else stream.flush()
    if tail:
        chunks.append((tail, []))
    return Honest(ids, chunks, finish, len(VOCABULARY.prompt_token_ids(request)))


@dataclass
class HostileNode:
    market_url: str
    market_id: str
    model: str
    behaviour: Behaviour
    price: tuple[int, int] = (1, 1)
    max_concurrency: int = 4
    sha256: str | None = None
    context_length: int = 4096
    keypair: Keypair = field(default_factory=Keypair)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    node_id: str | None = None
    reply: dict[str, Any] | None = None  # the market's answer to auth (welcome or reject)
    ws: ClientConnection | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @property
    def pubkey(self) -> str:
        return str(self.keypair.pubkey())

    async def start(self, *, expect_welcome: bool = True) -> dict[str, Any]:
        url = self.market_url.replace("http://", "ws://") + "/v1/node/link"
        self.ws = await connect(url, max_size=None)
        hello = Hello(pubkey=self.pubkey, agent_version="hostile",
                      models=[ModelOffer(id=self.model, sha256=self.sha256 or fake_sha256(
                          self.model), engine="hostile", context_length=self.context_length)],
                      price=Price(input=self.price[0], output=self.price[1]),
                      max_concurrency=self.max_concurrency)
        await self.ws.send(encode(hello))
        first = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
        if first["type"] == "challenge":
            signed = link_auth_message(self.market_id, bytes.fromhex(first["nonce"]))
            await self.ws.send(json.dumps({"type": "auth", "signature": sign(
                self.keypair, LINK_AUTH_DOMAIN, signed)}))
            first = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
        self.reply = first
        if expect_welcome:
            assert first["type"] == "welcome", first
            self.node_id = first["node_id"]
            self._tasks = [asyncio.create_task(self._heartbeat()),
                           asyncio.create_task(self._serve())]
        return first

    async def _heartbeat(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(Exception):
            while True:
                await self.ws.send(json.dumps({"type": "status", "running": 0, "queued": 0}))
                await asyncio.sleep(0.1)

    async def _serve(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                message = json.loads(raw)
                if message["type"] == "job":
                    self.jobs.append(message)
                    self._tasks.append(asyncio.create_task(self.behaviour(self, message)))

    async def send(self, frame: dict[str, Any] | str) -> None:
        assert self.ws is not None
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def chunk(self, job: dict[str, Any], text: str, ids: list[int]) -> None:
        await self.send({"type": "chunk", "job_id": job["job_id"], "text": text,
                         "token_ids": ids})

    def receipt(self, job: dict[str, Any], ids: list[int], text: str, *,
                prompt_tokens: int, keypair: Keypair | None = None,
                **overrides: Any) -> dict[str, Any]:
        request = JobRequest.model_validate(job["request"])
        fields: dict[str, Any] = dict(
            job_id=job["job_id"], market_id=self.market_id, node_pubkey=self.pubkey,
            model_id=self.model, model_sha256=self.sha256 or fake_sha256(self.model),
            engine="hostile", engine_version="1",
            **receipt_fields(job, request, ids, text, prompt_tokens=prompt_tokens),
        )
        fields.update(overrides)
        signed = sign_receipt(self.keypair, ReceiptBody(**fields), ids,
                              fingerprint_rows(ids)).model_dump(mode="json")
        if keypair is not None:  # claims to be this node, signed by another key
            signed["signature"] = sign(keypair, RECEIPT_DOMAIN,
                                       bytes.fromhex(ReceiptBody(**fields).digest()))
        return signed

    async def done(self, job: dict[str, Any], finish: str, receipt: dict[str, Any],
                   prompt_tokens: int, completion_tokens: int) -> None:
        await self.send({"type": "done", "job_id": job["job_id"], "finish_reason": finish,
                         "receipt": receipt, "usage": {
                             "prompt_tokens": prompt_tokens,
                             "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}})

    async def error(self, job: dict[str, Any], code: str, message: str = "no") -> None:
        await self.send({"type": "error", "job_id": job["job_id"], "code": code,
                         "message": message})

    async def close(self) -> None:
        await close_node(self._tasks, self.ws)


# ---- behaviours ------------------------------------------------------------------------------


async def serve_honestly(node: HostileNode, job: dict[str, Any], **receipt_overrides: Any
                         ) -> None:
    out = honest_output(job)
    for text, ids in out.chunks:
        await node.chunk(job, text, ids)
    prompt = receipt_overrides.pop("prompt_tokens", out.prompt_tokens)
    receipt = node.receipt(job, out.ids, out.text, prompt_tokens=prompt, **receipt_overrides)
    await node.done(job, out.finish, receipt, prompt, len(out.ids))


def claiming(**overrides: Any) -> Behaviour:
    """Honest output, a receipt that lies about ``overrides``."""
    async def behaviour(node: HostileNode, job: dict[str, Any]) -> None:
        await serve_honestly(node, job, **overrides)
    return behaviour


async def refuse_busy(node: HostileNode, job: dict[str, Any]) -> None:
    await node.error(job, "busy", "at capacity")


async def fail_at_once(node: HostileNode, job: dict[str, Any]) -> None:
    await node.error(job, "internal", "something broke")


async def hang(node: HostileNode, job: dict[str, Any]) -> None:
    await asyncio.sleep(3600)


async def dies_after(node: HostileNode, job: dict, tokens: int,
                      when: asyncio.Event | None = None) -> None:
    out = honest_output(job)
    for text, ids in out.chunks[:tokens]:
        await node.chunk(job, text, ids)
    if when is not None:
        await when.wait()
    await asyncio.sleep(0.05)
    assert node.ws is not None
    node.ws.transport.abort()  # the node dies mid-stream: no receipt


def streaming(mangle: Callable[[int, str, list[int]], list[tuple[str, list[int]]]]) -> Behaviour:
    """Honest ids; each chunk passed through ``mangle(index, text, ids)`` first."""
    async def behaviour(node: HostileNode, job: dict) -> None:
        out = honest_output(job)
        for i, (text, ids) in enumerate(out.chunks):
            for frame in mangle(i, text, ids):
                await node.chunk(job, *frame)
        receipt = node.receipt(job, out.ids, out.text, prompt_tokens=out.prompt_tokens)
        await node.done(job, out.finish, receipt, out.prompt_tokens, len(out.ids))
    return behaviour


MANGLERS = {
    # text the ids do not decode to (an ad, a phishing link …)
    "text_not_from_ids": lambda i, t, ids: [("VISIT evil.example" if i == 2 else t, ids)],
    # ids outside the vocabulary
    "ids_outside_vocabulary": lambda i, t, ids: [(t, [10**6] if i == 2 else ids)],
    # a flood of empty chunks to keep the job alive
    "empty_chunks": lambda i, t, ids: [(t, ids)] + ([("", [])] * 500 if i == 1 else []),
    # text without token ids (free words)
    "text_without_ids": lambda i, t, ids: [(t, ids)] + ([(" free", [])] if i == 1 else []),
}


# receipt fields a cheat lies about (with honest output): each must be refused
LIES = {
    "prompt_tokens": {"prompt_tokens": 10_000},
    "completion_tokens": {"completion_tokens": 9},
    "model_sha256": {"model_sha256": "ee" * 32},
    "market_id": {"market_id": "another-market.example"},
    "job_id": {"job_id": "job_someone_elses"},
    "temperature": {"sampling": SamplingParams(temperature=1.0, top_p=1.0, max_tokens=8)},
    "signed_by_another_key": {"keypair": Keypair()},
}
