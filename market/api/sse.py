"""A ``text/event-stream`` response that notices a buyer who goes away.

Starlette's ``StreamingResponse`` (on an ASGI server speaking spec < 2.4, as uvicorn
does) runs every response as two tasks in an anyio task group: one writes the body,
one waits for ``http.disconnect``. Per streamed request that group, its cancel scopes
and the extra task cost more than the rest of the relay. Here the request's own task
writes the body and one plain asyncio task waits for the disconnect; when it comes,
it cancels the writer, which is exactly where the event source (``market.api.openai``)
learns the buyer left and tells the node to stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], headers: Mapping[str, str] | None = None):
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writer = asyncio.current_task()
        assert writer is not None
        state = {"streaming": True, "left": False}

        async def watch_for_disconnect() -> None:
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # the server's receive failed: treat it as the buyer gone
                pass
            if state["streaming"]:  # not the server's "response complete" wake-up
                state["left"] = True
                writer.cancel()

        watcher = asyncio.ensure_future(watch_for_disconnect())
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for text in self.events:
                await send({"type": "http.response.body", "body": text.encode(),
                            "more_body": True})
            state["streaming"] = False
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["left"]:
                raise
            writer.uncancel()  # the buyer left: a normal end for this response
        finally:
            state["streaming"] = False
            watcher.cancel()
