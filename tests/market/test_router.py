"""Router scoring on real NodeConn objects (no network)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from market.errors import ModelNotFound, NoHealthyNode
from market.gateway.registry import NodeConn, NodeRegistry
from market.gateway.router import Router, rank
from protocol.messages import Hello, ModelOffer, Price, Status


def conn(node_id: str, *, model: str = "m", price: tuple[int, int] = (1, 1),
         ttft: float | None = None, running: int = 0, max_concurrency: int = 10,
         reputation: float = 0.5, failure_rate: float = 0.0, healthy: bool = True) -> NodeConn:
    hello = Hello(pubkey=node_id, agent_version="t",
                  models=[ModelOffer(id=model, sha256="00", engine="t", context_length=1)],
                  price=Price(input=price[0], output=price[1]), max_concurrency=max_concurrency)
    c = NodeConn(node_id=node_id, pubkey=node_id, hello=hello, ws=None, reputation=reputation,
                 ttft_ms=ttft, failure_rate=failure_rate, healthy=healthy)
    c.status = Status(running=running, queued=0)
    return c


def router(*conns: NodeConn, seed: int = 0) -> Router:
    registry = NodeRegistry()
    for c in conns:
        registry.add(c)
    return Router(registry, random.Random(seed))


def order(*conns: NodeConn) -> list[str]:
    return [c.node_id for _, c in rank(list(conns))]


def test_latency_load_reliability_each_count() -> None:
    assert order(conn("slow", ttft=100), conn("fast", ttft=10)) == ["fast", "slow"]
    assert order(conn("busy", running=9), conn("idle", running=0)) == ["idle", "busy"]
    assert order(conn("flaky", failure_rate=0.5), conn("solid")) == ["solid", "flaky"]
    assert order(conn("low", reputation=0.1), conn("high", reputation=0.9)) == ["high", "low"]


def test_weights_latency_and_load_outweigh_reliability() -> None:
    # A full but reputable node loses to an idle one of average reputation (load 40% > 20%).
    full, idle = conn("full", running=10, reputation=1.0), conn("idle", reputation=0.5)
    assert order(full, idle)[0] == "idle"


def test_picks_between_the_two_best_only() -> None:
    nodes = [conn("a", ttft=10), conn("b", ttft=11), conn("c", ttft=500, running=9)]
    r = router(*nodes)
    picks = Counter(r.choose("m").node_id for _ in range(400))
    assert set(picks) == {"a", "b"}
    assert min(picks.values()) > 100  # random between the two, not herded


def test_filters_health_capacity_price_and_tried() -> None:
    r = router(
        conn("sick", healthy=False),
        conn("full", max_concurrency=1),
        conn("pricey", price=(50, 50)),
        conn("ok", price=(5, 5)),
    )
    r.registry.links["full"].inflight["j"] = None  # type: ignore[assignment]
    assert {c.node_id for c in r.candidates("m", cap=10)} == {"ok"}
    assert {c.node_id for c in r.candidates("m")} == {"pricey", "ok"}
    assert {c.node_id for c in r.candidates("m", exclude=["ok"])} == {"pricey"}
    with pytest.raises(NoHealthyNode):
        r.choose("m", cap=1)
    with pytest.raises(ModelNotFound):
        r.choose("other")


def test_unknown_latency_gets_the_median() -> None:
    ranked = rank([conn("new"), conn("a", ttft=10), conn("b", ttft=30), conn("c", ttft=20)])
    assert [c.node_id for _, c in ranked].index("new") in (1, 2)


def test_a_node_asking_a_fortune_sets_no_hold() -> None:
    """The hold is priced at the cheapest few nodes, leaving out any far above the median:
    one gouger cannot make every buyer's hold unaffordable (and is not offered the job)."""
    fair = [conn(f"fair{i}", price=(100 + i, 200 + i)) for i in range(3)]
    gouger = conn("gouger", price=(10**12, 10**12))
    r = router(*fair, gouger)
    assert r.hold_prices("m") == (102, 202)
    assert router(fair[0], gouger).hold_prices("m") == (100, 200)  # even one against one
    cheap = conn("cheap", price=(1, 1))  # a cheap node does not exclude the fair ones
    assert router(cheap, *fair).hold_prices("m") == (102, 202)
    many = [conn(f"n{i}", price=(10 * (i + 1), 10 * (i + 1))) for i in range(8)]
    assert router(*many).hold_prices("m", nodes=4) == (40, 40)  # the four cheapest
    assert router(*many).hold_prices("m", cap=25) == (20, 20)


def test_a_node_cannot_shed_its_sit_out_by_reconnecting() -> None:
    registry = NodeRegistry()
    first = conn("sybil")
    registry.add(first)
    for _ in range(first.quarantine_after):
        first.observe_failure()
    assert first.quarantined and not first.available
    registry.remove(first)  # it drops its link ...
    again = conn("sybil")
    registry.add(again)  # ... and dials in again
    assert again.quarantined and again.quarantines == 1
    replaced = conn("sybil")
    registry.add(replaced)  # a second link while the first is up inherits it too
    assert replaced.quarantined
