"""Group commit: the request path's writes, batched into few transactions.

Every write on the hot path (place a hold and open a job; finalize a job) is a small
sync function of a ``Session``. :meth:`BatchWriter.submit` queues it; one writer task
runs whatever is queued in ONE transaction on a worker thread and commits once. Under
load many jobs share a commit; idle, a write is committed at once. On SQLite this also
means the process never contends with itself for the database lock.

A function that raises (e.g. insufficient balance) must leave no trace and must not
disturb the others. Savepoints would give that, at two statements per function on
every write; refusals are rare, so the batch first runs without them, and only when
a function raises is that attempt rolled back and the batch replayed with each
function inside its own SAVEPOINT. Functions are therefore pure database work: safe
to run twice when the first run was rolled back.

Callers get the function's result or its exception. A write whose caller was cancelled
still happens (the caller decides how to compensate).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from market.db import Database
from market.errors import APIError

log = logging.getLogger("market.writer")

T = TypeVar("T")
MAX_BATCH = 256


class BatchWriter:
    def __init__(self, db: Database, max_batch: int = MAX_BATCH) -> None:
        self.db = db
        self.max_batch = max_batch
        self._queue: asyncio.Queue[tuple[Callable[[Session], Any], asyncio.Future[Any]]] = (
            asyncio.Queue()
        )
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.writes = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="db-writer")

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        if self._task is None:
            return
        while not self._queue.empty():
            await asyncio.sleep(0.01)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    async def submit(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` in the next batch; returns its result or raises its error."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((fn, future))
        return await asyncio.shield(future)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                # On a worker thread: a lock held by another process (a Celery worker on
                # SQLite) must not stall the event loop.
                outcomes = await asyncio.to_thread(self._apply, [fn for fn, _ in batch])
            except BaseException as exc:  # the commit itself failed: every caller hears it
                outcomes = [(False, exc)] * len(batch)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            self.batches += 1
            self.writes += len(batch)
            for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _apply(self, fns: list[Callable[[Session], Any]]) -> list[tuple[bool, Any]]:
        try:
            with self.db.sync_sessions.begin() as session:
                return [(True, fn(session)) for fn in fns]
        except Exception:  # rolled back: find out which function failed, keep the rest
            return self._apply_isolated(fns)

    def _apply_isolated(self, fns: list[Callable[[Session], Any]]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        with self.db.sync_sessions.begin() as session:
            for fn in fns:
                savepoint = session.begin_nested()
                try:
                    result = fn(session)
                    savepoint.commit()
                    outcomes.append((True, result))
                except APIError as exc:  # an expected refusal: undo just this one
                    savepoint.rollback()
                    outcomes.append((False, exc))
                except Exception as exc:
                    log.exception("database write failed")
                    savepoint.rollback()
                    outcomes.append((False, exc))
        return outcomes
