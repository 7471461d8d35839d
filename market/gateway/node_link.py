"""WebSocket ``/v1/node/link``: authenticate nodes and carry their jobs.

Handshake: node ``hello`` → market ``challenge`` (32 fresh random bytes, used once) →
node ``auth`` (ed25519 signature of the nonce and the market identity it dialed, by the
hello's pubkey) → market ``welcome`` or ``reject``. Unsigned, wrongly signed and
replayed auths (a signature over an earlier nonce) fail the check and are rejected. The
identity checked is the market's configured one (``settings.market_id``, the host of
its public URL), never the ``Host`` header a client chose: a market relaying another
market's challenge cannot log in there as the node. A hello offering a model that is not
listed with that weight hash is refused before any challenge (``market.listing``).

After ``welcome`` a reader loop routes ``chunk``/``done``/``error`` to the in-flight
job's queue and records ``status`` heartbeats. A disconnect fails every in-flight job
over (the dispatcher sees a synthetic ``error``).

Limits, because a node is not trusted to be polite: at most
``link_max_pending_handshakes`` links may be unauthenticated at once; a frame over
``link_max_frame_bytes`` closes the link; so does sending more than
``link_messages_per_s`` (burst twice that) or ``link_max_malformed`` malformed frames;
only the first ``link_malformed_logged`` malformed frames of a link are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from solders.pubkey import Pubkey
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from market.gateway.registry import NodeConn
from market.models import Node, NodeModel, utcnow
from protocol.keys import LINK_AUTH_DOMAIN, link_auth_message, verify
from protocol.messages import (
    PROTOCOL_VERSION,
    Auth,
    Challenge,
    Chunk,
    Done,
    Embedded,
    Hello,
    JobError,
    Reject,
    Status,
    Welcome,
    encode,
    parse_node_message,
)

if TYPE_CHECKING:  # the state holds the registry this module fills: no runtime import
    from market.gateway.state import MarketState

log = logging.getLogger("market.link")

CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009


class HandshakeFailed(Exception):
    pass


class LinkAbuse(Exception):
    """The node broke a link limit; the link is closed with this reason."""


class MessageBudget:
    """A token bucket of frames per second for one link."""

    def __init__(self, rate: float) -> None:
        self.rate = max(1.0, rate)
        self.capacity = 2 * self.rate
        self.tokens = self.capacity
        self.last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


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
        # the offer's fields by name, listed so that a new protocol field is not
        # written into a column that does not exist
        fields = offer.model_dump(include={"sha256", "engine", "quantization", "context_length"})
        session.add(NodeModel(node_id=node.id, model_id=offer.id, **fields))
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


async def _receive(ws: WebSocket, timeout: float | None, max_bytes: int) -> str:
    message = await asyncio.wait_for(ws.receive(), timeout)
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    if text is None:
        data = message.get("bytes") or b""
        if len(data) > max_bytes:
            raise LinkAbuse(f"frame of {len(data)} bytes exceeds {max_bytes}")
        text = data.decode("utf-8", errors="replace")
    # n characters are n to 4n bytes of UTF-8: encode only when it could matter
    if len(text) > max_bytes // 4 and len(text.encode("utf-8", errors="replace")) > max_bytes:
        raise LinkAbuse(f"frame exceeds {max_bytes} bytes")
    return text


async def _reject(ws: WebSocket, reason: str) -> None:
    try:
        await ws.send_text(encode(Reject(reason=reason)))
        await ws.close(code=CLOSE_POLICY, reason=reason[:120])
    except Exception:  # the peer may already be gone
        pass


async def _expect(ws: WebSocket, kind: type[Any], timeout: float, max_bytes: int) -> Any:
    """The node's next frame, which must be a valid ``kind`` message."""
    name = kind.model_fields["type"].default
    try:
        message = parse_node_message(await _receive(ws, timeout, max_bytes))
    except LinkAbuse as exc:
        raise HandshakeFailed(str(exc)) from exc
    except ValidationError as exc:
        raise HandshakeFailed(f"expected a valid {name}: {exc.errors()[0]['msg']}") from exc
    if not isinstance(message, kind):
        raise HandshakeFailed(f"expected {name}, got {message.type}")
    return message


async def _require_stake(state: MarketState, pubkey: str) -> None:
    """Registration policy: a node must have ``min_stake`` bonded on chain (0 = off)."""
    minimum = state.settings.chain.min_stake
    if minimum <= 0:
        return
    from chain.ledger.base import LedgerError
    from market.onchain.runtime import ChainNotInitialized
    from market.onchain.stake import has_min_stake

    try:
        staked = await has_min_stake(pubkey, state.settings)
    except (ChainNotInitialized, LedgerError, OSError) as exc:
        raise HandshakeFailed(f"stake cannot be checked right now: {exc}") from exc
    if not staked:
        raise HandshakeFailed(f"stake below the market's minimum of {minimum} base units")


async def _handshake(state: MarketState, ws: WebSocket) -> tuple[Hello, dict[str, Any]]:
    settings = state.settings
    timeout = settings.limits.node_auth_timeout
    max_bytes = settings.limits.link_max_frame_bytes
    hello: Hello = await _expect(ws, Hello, timeout, max_bytes)
    if hello.protocol_version != PROTOCOL_VERSION:
        raise HandshakeFailed(f"unsupported protocol_version {hello.protocol_version}")
    try:
        Pubkey.from_string(hello.pubkey)
    except ValueError as exc:
        raise HandshakeFailed("pubkey is not a base58 ed25519 public key") from exc
    if (refusal := state.catalog.refusal(hello.models)) is not None:
        raise HandshakeFailed(refusal)
    if max(hello.price.input, hello.price.output) > settings.limits.node_max_price_per_mtok:
        raise HandshakeFailed(f"price above this market's maximum of "
                              f"{settings.limits.node_max_price_per_mtok} per 1M tokens")

    nonce = secrets.token_hex(32)  # fresh per connection: an old signature never verifies
    await ws.send_text(encode(Challenge(nonce=nonce)))
    auth: Auth = await _expect(ws, Auth, timeout, max_bytes)
    signed = link_auth_message(settings.market_id, bytes.fromhex(nonce))
    if not verify(hello.pubkey, LINK_AUTH_DOMAIN, signed, auth.signature):
        raise HandshakeFailed(
            f"auth signature does not verify for this pubkey, challenge and market "
            f"{settings.market_id!r}")

    await _require_stake(state, hello.pubkey)
    info = await state.writer.submit(lambda session: register_node(session, hello))
    if info["suspended"]:
        raise HandshakeFailed("node is suspended")
    return hello, info


async def node_link(ws: WebSocket) -> None:
    state: MarketState = ws.app.state.market
    settings = state.settings
    peer = ws.client.host if ws.client else "?"
    if (state.pending_handshakes >= settings.limits.link_max_pending_handshakes
            or state.pending_by_peer.get(peer, 0) >= settings.limits.link_max_pending_per_peer):
        state.metrics.node_errors.labels("too_many_handshakes").inc()
        await ws.close(code=1013)  # try again later
        return
    state.pending_handshakes += 1
    state.pending_by_peer[peer] = state.pending_by_peer.get(peer, 0) + 1
    try:
        await ws.accept()
        hello, info = await _handshake(state, ws)
    except HandshakeFailed as exc:
        log.warning("node link rejected: %s", exc)
        state.metrics.node_errors.labels("auth_rejected").inc()
        await _reject(ws, str(exc))
        return
    except (TimeoutError, WebSocketDisconnect, OSError):
        state.metrics.node_errors.labels("handshake_aborted").inc()
        if ws.client_state == WebSocketState.CONNECTED:
            await _reject(ws, "handshake timed out")
        return
    except Exception:  # a bug must cost the node its link, not the market a traceback storm
        log.exception("node link handshake failed")
        state.metrics.node_errors.labels("handshake_error").inc()
        await _reject(ws, "the handshake could not be completed")
        return
    finally:
        state.pending_handshakes -= 1
        left = state.pending_by_peer.get(peer, 1) - 1
        if left > 0:
            state.pending_by_peer[peer] = left
        else:
            state.pending_by_peer.pop(peer, None)

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
        concurrency_cap=state.settings.limits.node_max_concurrency,
        quarantine_after=state.settings.routing.node_quarantine_after,
        quarantine_s=state.settings.routing.node_quarantine_s,
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
        Welcome(node_id=conn.node_id, heartbeat_interval=state.settings.routing.heartbeat_interval,
                market_id=state.settings.market_id,
                max_frame_bytes=state.settings.limits.link_max_frame_bytes)
    )
    log.info("node %s linked (%s, models %s)", conn.node_id, hello.pubkey,
             ", ".join(conn.models))
    try:
        await _read_loop(state, conn)
    except WebSocketDisconnect:
        pass
    except LinkAbuse as exc:
        log.warning("node %s: closing its link: %s", conn.node_id, exc)
        state.metrics.node_errors.labels("link_abuse").inc()
        with contextlib.suppress(Exception):
            await ws.close(code=CLOSE_POLICY, reason=str(exc)[:120])
    except Exception:
        log.exception("node %s link failed", conn.node_id)
    finally:
        state.registry.remove(conn)
        conn.fail_inflight("node_disconnected", "the node's link closed")
        log.info("node %s unlinked", conn.node_id)


async def _read_loop(state: MarketState, conn: NodeConn) -> None:
    ws = conn.ws
    settings = state.settings
    budget = MessageBudget(settings.limits.link_messages_per_s)
    malformed = 0
    while True:
        raw = await _receive(ws, None, settings.limits.link_max_frame_bytes)
        if not budget.take():
            conn.observe_failure(conn.quarantine_after)
            raise LinkAbuse(f"more than {budget.rate:.0f} frames per second")
        conn.last_heartbeat = time.monotonic()
        try:
            message = parse_node_message(raw)
        except (ValidationError, json.JSONDecodeError) as exc:
            malformed += 1
            state.metrics.node_errors.labels("malformed_frame").inc()
            if malformed <= settings.limits.link_malformed_logged:
                log.warning("node %s sent a malformed frame: %s", conn.node_id, str(exc)[:200])
            if malformed >= settings.limits.link_max_malformed:
                raise LinkAbuse(f"{malformed} malformed frames") from None
            continue
        if isinstance(message, Chunk | Done | Embedded | JobError):
            conn.route(message.job_id, message)
        elif isinstance(message, Status):
            conn.status = message
            if not conn.healthy:
                conn.healthy = True
        else:  # a handshake frame after the handshake: as bad as a malformed one
            malformed += 1
            state.metrics.node_errors.labels("malformed_frame").inc()
            if malformed <= settings.limits.link_malformed_logged:
                log.warning("node %s sent %s after the handshake", conn.node_id, message.type)
            if malformed >= settings.limits.link_max_malformed:
                raise LinkAbuse(f"{malformed} malformed frames")
