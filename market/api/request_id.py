"""``x-request-id`` on every response, as OpenAI sends it: the client's own when it sent
a sane one (so its logs and the market's meet), else a fresh ``req_…``. Pure ASGI, so
streamed responses pass untouched; outermost, so the gate's 401/413 carry it too."""

from __future__ import annotations

import re
import secrets

from market.api.gate import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
_SANE = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def request_id(scope: Scope) -> str:
    """The id of this request: the client's ``x-request-id`` when sane, else a new one."""
    for key, value in scope.get("headers", ()):
        if key == HEADER and _SANE.fullmatch(bytes(value)):
            return bytes(value).decode("ascii")
    return "req_" + secrets.token_hex(12)


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k != HEADER]
                message["headers"] = [*headers, (HEADER, rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
