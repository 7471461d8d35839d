"""Run a blocking token loop in a worker thread and stream its events to asyncio.

The loop gets ``emit(event)`` and a ``threading.Event`` that is set when the consumer
goes away (cancelled task, closed generator); it must check the event every token.
``on_finished`` runs exactly once, as soon as the work is known to have stopped, so a
resource it used (a llama.cpp context) is free again before the next request asks.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from inference.base import GenerationEvent

Emit = Callable[[GenerationEvent], None]
Work = Callable[[Emit, threading.Event], None]

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def stream_from_thread(
    work: Work, on_finished: Callable[[], None] | None = None
) -> AsyncIterator[GenerationEvent]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancel = threading.Event()

    def emit(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # loop closed under us: the consumer is gone
            cancel.set()

    def runner() -> None:
        try:
            work(emit, cancel)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            emit(_Failure(exc))
        finally:
            emit(_DONE)

    finished = False

    def finish() -> None:
        # Once: when the consumer sees the work end, or (consumer gone early) on the loop
        # once the thread really stopped. Either way the work no longer runs.
        nonlocal finished
        if not finished:
            finished = True
            if on_finished is not None:
                on_finished()

    future = loop.run_in_executor(None, runner)
    future.add_done_callback(lambda _f: finish())
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                finish()
                return
            if isinstance(item, _Failure):
                finish()  # ``work`` has raised: it touches nothing any more
                raise item.exc
            yield item
    finally:
        cancel.set()
