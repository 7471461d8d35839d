"""Buyer authentication (API keys) and the admin token, as FastAPI dependencies.

Key lookups are cached in-process for a few seconds (the hot path then makes no
query for them); revoking through the admin API drops the cache entry at once, a
revocation from another process (the CLI) takes effect within ``KEY_CACHE_TTL``.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass

from fastapi import Request
from sqlalchemy import select

from market.errors import AuthenticationFailed
from market.gateway.state import MarketState
from market.models import ApiKey
from market.money.accounts import hash_key

KEY_CACHE_TTL = 10.0


@dataclass(frozen=True)
class Buyer:
    account_id: str
    key_id: str


def market_state(request: Request) -> MarketState:
    return request.app.state.market  # type: ignore[no-any-return]


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it as 'Authorization: Bearer sk-aidp-…'."
        )
    return token.strip()


async def lookup_key(state: MarketState, token: str) -> Buyer | None:
    digest = hash_key(token)
    cached = state.key_cache.get(digest)
    if cached is not None and cached[2] > time.monotonic():
        return Buyer(account_id=cached[1], key_id=cached[0])
    # One query per key at a time: concurrent requests with the same key share it.
    inflight = state.key_lookups
    waiting = inflight.get(digest)
    if waiting is not None:
        return await asyncio.shield(waiting)
    future: asyncio.Future[Buyer | None] = asyncio.get_running_loop().create_future()
    inflight[digest] = future
    try:
        buyer = await _query_key(state, digest)
        future.set_result(buyer)
        return buyer
    except BaseException as exc:
        future.set_exception(exc)
        future.exception()  # retrieved: waiters re-raise it, nobody else needs to
        raise
    finally:
        del inflight[digest]


async def _query_key(state: MarketState, digest: str) -> Buyer | None:
    now = time.monotonic()
    async with state.db.async_sessions() as session:
        row = (
            await session.execute(
                select(ApiKey.id, ApiKey.account_id).where(
                    ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)
                )
            )
        ).first()
    if row is None:
        state.key_cache.pop(digest, None)
        return None
    state.key_cache[digest] = (row[0], row[1], now + KEY_CACHE_TTL)
    return Buyer(account_id=row[1], key_id=row[0])


def forget_key(state: MarketState, key_id: str) -> None:
    for digest, (kid, _acct, _exp) in list(state.key_cache.items()):
        if kid == key_id:
            del state.key_cache[digest]


async def authenticate(request: Request) -> Buyer:
    """The buyer behind the request's API key (401 otherwise); applies the rate limit.

    ``market.api.gate`` has usually looked the key up already, before the body was read."""
    state = market_state(request)
    buyer = getattr(request.state, "buyer", None)
    if buyer is None:
        buyer = await lookup_key(state, _bearer(request))
    if buyer is None:
        raise AuthenticationFailed("Incorrect API key provided.")
    state.ratelimiter.check(buyer.key_id)
    return buyer


async def require_admin(request: Request) -> None:
    state = market_state(request)
    token = _bearer(request)
    if not hmac.compare_digest(token.encode(), state.settings.admin_token.encode()):
        raise AuthenticationFailed("Incorrect admin token.", code="invalid_admin_token")
