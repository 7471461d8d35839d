"""The red-team suite: a real market (SQLite and PostgreSQL) attacked by hostile nodes,
buyers and relays. Each test names the invariant it holds and asserts no money moved
wrongly."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.adversarial.hostile import Behaviour, HostileNode
from tests.support.market import Market, _close_clients, buyer, db_url, market, nodes  # noqa: F401


@pytest.fixture
async def hostile(market: Market) -> AsyncIterator[Callable[..., Any]]:  # noqa: F811
    """Start hostile nodes on the market (their model listed); closed after the test."""
    started: list[HostileNode] = []

    async def start(model: str, behaviour: Behaviour, *, listed: bool = True,
                    expect_welcome: bool = True, **kwargs: Any) -> HostileNode:
        node = HostileNode(market.url, market.settings.market_id, model, behaviour, **kwargs)
        if listed:
            market.list_model(model, node.sha256 or _fake_sha(model))
        started.append(node)
        await node.start(expect_welcome=expect_welcome)
        if expect_welcome:
            from tests.support.market import wait_for

            await wait_for(lambda: node.node_id in market.state.registry.links)
        return node

    yield start
    for node in started:
        await node.close()


def _fake_sha(model: str) -> str:
    from inference.fake import fake_sha256

    return fake_sha256(model)
