"""What every HTTP request passes before the app reads its body: a size limit and, for
the buyer and admin APIs, the credential check.

A request is untrusted until authenticated, so it must not cost the market a JSON
parse first: the gate refuses a missing or wrong API key (401) or admin token before
the body is read, and a body over ``max_request_bytes`` with 413 — from its
``Content-Length`` when it has one, else as it streams in. The buyer it found rides
on the request (``request.state.buyer``) to ``market.gateway.auth.authenticate``.

Pure ASGI (no Starlette ``BaseHTTPMiddleware``): streaming responses pass untouched.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from market.errors import APIError, AuthenticationFailed, PayloadTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# /v1 paths that need no API key: public, or signed by a node operator's own key
PUBLIC_PATHS = frozenset({"/v1/chain"})
PUBLIC_PREFIXES = ("/v1/receipts/", "/v1/stake/", "/v1/chain/payouts/", "/v1/node/")


def needs_api_key(path: str) -> bool:
    if not (path == "/v1" or path.startswith("/v1/")):
        return False
    return path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when the streamed body passes the limit. An HTTP exception,
    so the framework reading the body passes it on (as a 413) instead of calling it a
    parse error."""

    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit} bytes")


async def _respond(send: Send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _bearer(scope: Scope) -> str | None:
    scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class Gate:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state.market
        limit = state.settings.limits.max_request_bytes
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _respond(send, _too_large(limit))
            return
        try:
            await self._authenticate(scope, state)
        except APIError as exc:
            state.metrics.requests.labels(_gate_label(scope), str(exc.status_code)).inc()
            await _respond(send, exc)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        # ``send`` passes untouched: nothing here sits on a streamed response's path. A
        # BodyTooLarge the framework did not turn into its 413 comes before any response.
        try:
            await self.app(scope, limited_receive, send)
        except BodyTooLarge:
            await _respond(send, _too_large(limit))

    async def _authenticate(self, scope: Scope, state: Any) -> None:
        from market.gateway.auth import lookup_key

        path: str = scope.get("path", "")
        if path.startswith("/admin"):
            token = _bearer(scope)
            if token is None or not hmac.compare_digest(
                    token.encode(), state.settings.admin_token.encode()):
                raise AuthenticationFailed("Incorrect admin token.", code="invalid_admin_token")
            return
        if not needs_api_key(path):
            return
        token = _bearer(scope)
        if token is None:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer sk-aidp-…'.")
        buyer = await lookup_key(state, token)
        if buyer is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        scope.setdefault("state", {})["buyer"] = buyer


def _too_large(limit: int) -> APIError:
    return PayloadTooLarge(f"the request body exceeds {limit} bytes")


def _gate_label(scope: Scope) -> str:
    """A refused request has no route yet: label it by API (a closed set)."""
    path = scope.get("path", "")
    return "/admin/*" if path.startswith("/admin") else "/v1/*"
