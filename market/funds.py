"""What each buyer can still spend, known in memory, so a job can start before its
hold is committed.

The database stays the authority: every hold is still written (``billing.open_job``),
in order, before the job is finalized. This cache only decides whether a request may
be dispatched *while* that write is queued. It answers "yes" only from a fresh,
database-reported balance minus the holds it has itself let through and not yet seen
committed; any doubt (unknown account, stale entry, too little) sends the request
down the ordinary path, which waits for the write and returns 402 when the database
says so. A balance that shrinks elsewhere (another process) within ``ttl`` can let a
job start whose hold then fails: that job is stopped and nothing is charged.
"""

from __future__ import annotations

import time
from collections import defaultdict


class FundsCache:
    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self._known: dict[str, tuple[int, float]] = {}  # account -> (available, seen at)
        self._pending: defaultdict[str, int] = defaultdict(int)  # reserved, not yet committed

    def try_reserve(self, account_id: str, amount: int) -> bool:
        """Reserve ``amount`` when the cache is sure the account covers it."""
        known = self._known.get(account_id)
        if known is None or time.monotonic() - known[1] > self.ttl:
            return False
        if known[0] - self._pending[account_id] < amount:
            return False
        self._pending[account_id] += amount
        return True

    def committed(self, account_id: str, amount: int, available: int | None) -> None:
        """A reserved hold was written (``available`` after it) or failed (``None``)."""
        self._pending[account_id] -= amount
        if self._pending[account_id] <= 0:
            del self._pending[account_id]
        if available is None:
            self._known.pop(account_id, None)
        else:
            self.observe(account_id, available)

    def observe(self, account_id: str, available: int) -> None:
        """The database's spendable balance after every write committed so far."""
        self._known[account_id] = (available, time.monotonic())
