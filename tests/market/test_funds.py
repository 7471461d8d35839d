"""The in-memory view of buyers' spendable balances (market.gateway.funds)."""

from __future__ import annotations

import asyncio

from market.gateway.funds import FundsCache


async def test_concurrent_refreshes_share_one_read() -> None:
    cache = FundsCache(ttl=60)
    reads = 0
    gate = asyncio.Event()

    async def read() -> int:
        nonlocal reads
        reads += 1
        await gate.wait()
        return 1_000

    waiting = [asyncio.ensure_future(cache.refresh("a", read)) for _ in range(5)]
    await asyncio.sleep(0)
    assert not cache.is_fresh("a") and not cache.try_reserve("a", 1)
    gate.set()
    await asyncio.gather(*waiting)
    assert reads == 1
    assert cache.try_reserve("a", 600)
    assert not cache.try_reserve("a", 600)  # 400 left while the first hold is pending


async def test_a_reading_older_than_a_commit_is_dropped() -> None:
    cache = FundsCache(ttl=60)
    gate = asyncio.Event()

    async def read() -> int:
        await gate.wait()
        return 1_000  # taken before the hold below committed

    refreshing = asyncio.ensure_future(cache.refresh("a", read))
    await asyncio.sleep(0)
    cache.observe("a", 200)  # a hold committed meanwhile and reported what is left
    gate.set()
    await refreshing
    assert not cache.try_reserve("a", 201)
    assert cache.try_reserve("a", 200)


async def test_a_stale_entry_is_not_trusted() -> None:
    cache = FundsCache(ttl=0.01)
    cache.observe("a", 1_000)
    assert cache.is_fresh("a")
    await asyncio.sleep(0.02)
    assert not cache.is_fresh("a") and not cache.try_reserve("a", 1)
