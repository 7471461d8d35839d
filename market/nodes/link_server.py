"""WebSocket ``/v1/node/link``: authenticate nodes and carry their jobs.

Handshake: node ``hello`` → market ``challenge`` (32 fresh random bytes, used once) →
node ``auth`` (ed25519 signature of the nonce and the ``Host`` it dialed by the hello's
pubkey) → market ``welcome`` or ``reject``. Unsigned, wrongly signed and replayed
auths (a signature over an earlier nonce) fail the check and are rejected.

After ``welcome`` a reader loop routes ``chunk``/``done``/``error`` to the in-flight
job's queue and records ``status`` heartbeats. A disconnect fails every in-flight job
over (the dispatcher sees a synthetic ``error``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Any

from pydantic import ValidationError
from solders.pubkey import Pubkey
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from market.models import Node, NodeModel, utcnow
from market.nodes.registry import NodeConn
from market.state import MarketState
from protocol.keys import LINK_AUTH_DOMAIN, link_auth_message, verify
from protocol.messages import (
    PROTOCOL_VERSION,
    Auth,
    Challenge,
    Chunk,
    Done,
    Hello,
    JobError,
    Reject,
    Status,
    Welcome,
    encode,
    parse_node_message,
)

log = logging.getLogger("market.link")

CLOSE_POLICY = 1008


class HandshakeFailed(Exception):
    pass


def register_node(session: Session, hello: Hello) -> dict[str, Any]:
    """Create or refresh the node's row and its offered models; returns what the
    router needs (id, reputation, suspended, observed stats)."""
    node = session.execute(select(Node).where(Node.pubkey == hello.pubkey)).scalar_one_or_none()
    if node is None:
        node = Node(pubkey=hello.pubkey)
        session.add(node)
    node.region = hello.region
    node.agent_version = hello.agent_version
    node.gpus = [g.model_dump() for g in hello.gpus]
    node.price_in = hello.price.input
    node.price_out = hello.price.output
    node.max_concurrency = hello.max_concurrency
    node.last_seen_at = utcnow()
    session.flush()
    session.execute(delete(NodeModel).where(NodeModel.node_id == node.id))
    for offer in hello.models:
        session.add(
            NodeModel(
                node_id=node.id,
                model_id=offer.id,
                sha256=offer.sha256,
                engine=offer.engine,
                quantization=offer.quantization,
                context_length=offer.context_length,
            )
        )
    return {
        "id": node.id,
        "reputation": node.reputation if node.reputation is not None else 0.5,
        "suspended": bool(node.suspended),
        "ttft_ms": node.ttft_ms,
        "tokens_per_s": node.tokens_per_s,
        "failure_rate": node.failure_rate or 0.0,
        "jobs_total": node.jobs_total or 0,
        "jobs_failed": node.jobs_failed or 0,
    }


async def _receive(ws: WebSocket, timeout: float | None) -> str:
    message = await asyncio.wait_for(ws.receive(), timeout)
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    if text is None:
        data = message.get("bytes") or b""
        text = data.decode("utf-8", errors="replace")
    return text


async def _reject(ws: WebSocket, reason: str) -> None:
    try:
        await ws.send_text(encode(Reject(reason=reason)))
        await ws.close(code=CLOSE_POLICY, reason=reason[:120])
    except Exception:  # the peer may already be gone
        pass


async def _expect(ws: WebSocket, kind: type[Any], timeout: float) -> Any:
    """The node's next frame, which must be a valid ``kind`` message."""
    name = kind.model_fields["type"].default
    try:
        message = parse_node_message(await _receive(ws, timeout))
    except ValidationError as exc:
        raise HandshakeFailed(f"expected a valid {name}: {exc.errors()[0]['msg']}") from exc
    if not isinstance(message, kind):
        raise HandshakeFailed(f"expected {name}, got {message.type}")
    return message


async def _require_stake(state: MarketState, pubkey: str) -> None:
    """Registration policy: a node must have ``min_stake`` bonded on chain (0 = off)."""
    minimum = state.settings.min_stake
    if minimum <= 0:
        return
    from market.chain.runtime import ChainNotInitialized
    from market.chain.stake import has_min_stake
    from programs.ledger import LedgerError

    try:
        staked = await has_min_stake(pubkey, state.settings)
    except (ChainNotInitialized, LedgerError, OSError) as exc:
        raise HandshakeFailed(f"stake cannot be checked right now: {exc}") from exc
    if not staked:
        raise HandshakeFailed(f"stake below the market's minimum of {minimum} base units")


async def _handshake(state: MarketState, ws: WebSocket) -> tuple[Hello, dict[str, Any]]:
    timeout = state.settings.node_auth_timeout
    hello: Hello = await _expect(ws, Hello, timeout)
    if hello.protocol_version != PROTOCOL_VERSION:
        raise HandshakeFailed(f"unsupported protocol_version {hello.protocol_version}")
    try:
        Pubkey.from_string(hello.pubkey)
    except ValueError as exc:
        raise HandshakeFailed("pubkey is not a base58 ed25519 public key") from exc

    nonce = secrets.token_hex(32)  # fresh per connection: an old signature never verifies
    await ws.send_text(encode(Challenge(nonce=nonce)))
    auth: Auth = await _expect(ws, Auth, timeout)
    signed = link_auth_message(ws.headers.get("host", ""), bytes.fromhex(nonce))
    if not verify(hello.pubkey, LINK_AUTH_DOMAIN, signed, auth.signature):
        raise HandshakeFailed("auth signature does not verify for this pubkey and challenge")

    await _require_stake(state, hello.pubkey)
    info = await state.writer.submit(lambda session: register_node(session, hello))
    if info["suspended"]:
        raise HandshakeFailed("node is suspended")
    return hello, info


async def node_link(ws: WebSocket) -> None:
    state: MarketState = ws.app.state.market
    await ws.accept()
    try:
        hello, info = await _handshake(state, ws)
    except HandshakeFailed as exc:
        log.warning("node link rejected: %s", exc)
        state.metrics.node_errors.labels("auth_rejected").inc()
        await _reject(ws, str(exc))
        return
    except (TimeoutError, WebSocketDisconnect):
        state.metrics.node_errors.labels("handshake_aborted").inc()
        if ws.client_state == WebSocketState.CONNECTED:
            await _reject(ws, "handshake timed out")
        return

    conn = NodeConn(
        node_id=info["id"],
        pubkey=hello.pubkey,
        hello=hello,
        ws=ws,
        reputation=info["reputation"],
        suspended=info["suspended"],
        ttft_ms=info["ttft_ms"],
        tokens_per_s=info["tokens_per_s"],
        failure_rate=info["failure_rate"],
        jobs_total=info["jobs_total"],
        jobs_failed=info["jobs_failed"],
    )
    previous = state.registry.add(conn)
    if previous is not None:
        log.info("node %s reconnected; closing its older link", conn.node_id)
        previous.closed = True
        previous.fail_inflight("node_reconnected", "the node opened a new link")
        try:
            await previous.ws.close(code=1000)
        except Exception:
            pass
    await conn.send(
        Welcome(node_id=conn.node_id, heartbeat_interval=state.settings.heartbeat_interval)
    )
    log.info("node %s linked (%s, models %s)", conn.node_id, hello.pubkey,
             ", ".join(conn.models))
    try:
        await _read_loop(state, conn)
    except WebSocketDisconnect:
        pass
    except Exception:
        log.exception("node %s link failed", conn.node_id)
    finally:
        state.registry.remove(conn)
        conn.fail_inflight("node_disconnected", "the node's link closed")
        log.info("node %s unlinked", conn.node_id)


async def _read_loop(state: MarketState, conn: NodeConn) -> None:
    ws = conn.ws
    while True:
        raw = await _receive(ws, None)
        conn.last_heartbeat = time.monotonic()
        try:
            message = parse_node_message(raw)
        except (ValidationError, json.JSONDecodeError) as exc:
            log.warning("node %s sent a malformed frame: %s", conn.node_id, str(exc)[:200])
            state.metrics.node_errors.labels("malformed_frame").inc()
            continue
        if isinstance(message, Chunk | Done | JobError):
            conn.route(message.job_id, message)
        elif isinstance(message, Status):
            conn.status = message
            if not conn.healthy:
                conn.healthy = True
        else:
            log.warning("node %s sent %s after the handshake", conn.node_id, message.type)
