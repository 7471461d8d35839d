"""What each buyer can still spend, known in memory, so a job can start before its
hold is committed.

The database stays the authority: every hold is still written (``billing.open_job``),
in order, before the job is finalized. This cache only decides whether a request may
be dispatched *while* that write is queued. It answers "yes" only from a fresh,
database-reported balance minus the holds it has itself let through and not yet seen
committed; too little sends the request down the ordinary path, which waits for the
write and returns 402 when the database says so. A balance that shrinks elsewhere
(another process) within ``ttl`` can let a job start whose hold then fails: that job
is stopped and nothing is charged.

An unknown or stale entry is refreshed by one read of the balance (:meth:`refresh`),
shared by every request of that account that arrives meanwhile, rather than sending
a burst of requests after a quiet spell through the write queue one hold at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable


class FundsCache:
    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self._known: dict[str, tuple[int, float]] = {}  # account -> (available, seen at)
        self._pending: defaultdict[str, int] = defaultdict(int)  # reserved, not yet committed
        self._observations: defaultdict[str, int] = defaultdict(int)  # bumps per observe
        self._refreshing: dict[str, asyncio.Future[None]] = {}

    def try_reserve(self, account_id: str, amount: int) -> bool:
        """Reserve ``amount`` when the cache is sure the account covers it."""
        if not self.is_fresh(account_id):
            return False
        if self._known[account_id][0] - self._pending[account_id] < amount:
            return False
        self._pending[account_id] += amount
        return True

    def is_fresh(self, account_id: str) -> bool:
        known = self._known.get(account_id)
        return known is not None and time.monotonic() - known[1] <= self.ttl

    def committed(self, account_id: str, amount: int, available: int | None) -> None:
        """A reserved hold was written (``available`` after it) or failed (``None``)."""
        self._pending[account_id] -= amount
        if self._pending[account_id] <= 0:
            del self._pending[account_id]
        if available is None:
            self._known.pop(account_id, None)
            self._observations[account_id] += 1
        else:
            self.observe(account_id, available)

    def observe(self, account_id: str, available: int) -> None:
        """The database's spendable balance after every write committed so far."""
        self._known[account_id] = (available, time.monotonic())
        self._observations[account_id] += 1

    async def refresh(self, account_id: str, read: Callable[[], Awaitable[int]]) -> None:
        """Learn the account's spendable balance from ``read()`` (a database query).

        Concurrent callers for one account share one read. A reading is dropped when a
        write reported a balance while it ran: that report is the newer one (a hold
        committed after the read would otherwise be forgotten).
        """
        running = self._refreshing.get(account_id)
        if running is not None:
            await asyncio.shield(running)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._refreshing[account_id] = future
        before = self._observations[account_id]
        try:
            available = await read()
            if self._observations[account_id] == before:
                self.observe(account_id, available)
        finally:
            del self._refreshing[account_id]
            future.set_result(None)
