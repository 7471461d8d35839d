"""In-process token bucket per API key (``settings.limits.rate_limit_rpm``)."""

from __future__ import annotations

import math
import time

from market.errors import RateLimited


class RateLimiter:
    """Capacity = one minute's allowance; refills continuously."""

    def __init__(self, requests_per_minute: int) -> None:
        self.capacity = float(max(1, requests_per_minute))
        self.rate = self.capacity / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)

    def check(self, key: str, cost: float = 1.0) -> None:
        """Take ``cost`` tokens or raise :class:`RateLimited` with ``Retry-After``."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            retry_after = max(1, math.ceil((cost - tokens) / self.rate))
            raise RateLimited(
                f"rate limit of {int(self.capacity)} requests per minute exceeded; "
                f"retry after {retry_after}s",
                headers={"Retry-After": str(retry_after)},
            )
        self._buckets[key] = (tokens - cost, now)
