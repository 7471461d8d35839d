"""Pick a node for a job.

Filter: serves the model, healthy, not suspended or quarantined, has capacity, its
context holds the prompt, within the buyer's price cap and the prices the job's hold
was computed at (so no node is paid beyond the hold), not already tried for this job.
Score (each part normalised to 0..1):

* latency 40% — observed TTFT (EWMA); best known TTFT / this node's. A node with no
  observations yet gets the median of the known ones (neither favoured nor punished).
* load 40% — 1 − busy share of its ``max_concurrency``.
* reliability 20% — ``nodes.reputation`` (verification's verdicts) × (1 − observed
  failure rate).

Then a random pick between the two best, so equal nodes share the traffic instead of
the best one being herded on.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from inference.grammar import GRAMMAR_ENGINE
from market.errors import BadRequest, ModelNotFound, NoHealthyNode
from market.gateway.registry import NodeConn, NodeRegistry
from protocol.job import JobRequest
from protocol.messages import ModelOffer

W_LATENCY = 0.4
W_LOAD = 0.4
W_RELIABILITY = 0.2


@dataclass(frozen=True)
class Need:
    """What a node must offer to take a job (beyond serving its model)."""

    cap: int | None = None  # the buyer's max_price_per_mtok, for input and output
    price_bound: tuple[int, int] | None = None  # (input, output) the hold covers
    min_context: int = 0  # tokens the node's context must hold
    features: frozenset[str] = frozenset()  # what the job needs (:func:`required_features`)

    def admits(self, conn: NodeConn, model: str) -> bool:
        if not within_cap(conn, self.cap):
            return False
        if self.price_bound is not None and (
            conn.price_in > self.price_bound[0] or conn.price_out > self.price_bound[1]
        ):
            return False
        offer = conn.models[model]
        return offer.context_length >= self.min_context and offers(offer, self.features)


# the buyer's parameter each feature serves (as /v1/models lists them)
FEATURE_PARAMETERS = {"grammar": "response_format", "logit_shaping": "logit_bias",
                      "logprobs": "logprobs"}


def required_features(request: JobRequest) -> dict[str, str]:
    """What a node must declare (``protocol.messages.Capabilities``) to serve ``request``:
    feature → the buyer's parameter that asks for it (named in a 400)."""
    needed: dict[str, str] = {}
    if request.constraint is not None:
        needed["grammar"] = "response_format"
    s = request.sampling
    if s.shaped:
        needed["logit_shaping"] = ("presence_penalty" if s.presence_penalty else
                                   "frequency_penalty" if s.frequency_penalty else "logit_bias")
    if request.logprobs is not None:
        needed["logprobs"] = "logprobs"
    return needed


def offers(offer: ModelOffer, features: frozenset[str]) -> bool:
    """Whether ``offer`` serves every one of ``features``. A grammar counts only when it
    is the market's own engine and version: the market and the verifiers compute the
    same mask, and any other would make an honest node's output look like a violation."""
    caps = offer.capabilities
    return (("grammar" not in features or caps.grammar == GRAMMAR_ENGINE)
            and ("logit_shaping" not in features or caps.logit_shaping)
            and ("logprobs" not in features or caps.logprobs))


def _total_price(conn: NodeConn) -> int:
    return conn.price_in + conn.price_out


def within_cap(conn: NodeConn, cap: int | None) -> bool:
    return cap is None or (conn.price_in <= cap and conn.price_out <= cap)


def score(conn: NodeConn, best_ttft: float | None, default_ttft: float | None) -> float:
    ttft = conn.ttft_ms if conn.ttft_ms is not None else default_ttft
    latency = 1.0 if ttft is None or best_ttft is None else best_ttft / max(ttft, 1e-6)
    load = max(0.0, 1.0 - conn.load)
    reliability = max(0.0, min(1.0, conn.reputation)) * (1.0 - conn.failure_rate)
    return W_LATENCY * latency + W_LOAD * load + W_RELIABILITY * reliability


def rank(candidates: list[NodeConn]) -> list[tuple[float, NodeConn]]:
    known = [c.ttft_ms for c in candidates if c.ttft_ms is not None]
    best = min(known) if known else None
    default = statistics.median(known) if known else None
    return sorted(((score(c, best, default), c) for c in candidates), key=lambda t: -t[0])


class Router:
    def __init__(self, registry: NodeRegistry, rng: random.Random | None = None) -> None:
        self.registry = registry
        self.rng = rng or random.Random()

    def candidates(
        self, model: str, cap: int | None = None, exclude: Iterable[str] = (),
        need: Need | None = None,
    ) -> list[NodeConn]:
        excluded = set(exclude)
        need = need or Need(cap)
        return [
            c
            for c in self.registry.serving(model)
            if c.available and c.has_capacity and need.admits(c, model)
            and c.node_id not in excluded
        ]

    def check_model(self, model: str) -> None:
        if model not in self.registry.known_models:
            raise ModelNotFound(f"The model '{model}' does not exist or no node offers it",
                                param="model")

    def choose(self, model: str, cap: int | None = None, exclude: Iterable[str] = (),
               need: Need | None = None) -> NodeConn:
        """The node for the next attempt, or :class:`NoHealthyNode`."""
        pool = self.candidates(model, cap, exclude, need)
        if not pool:
            self.check_model(model)
            serving = [c for c in self.registry.serving(model) if c.available]
            if serving and cap is not None and not any(within_cap(c, cap) for c in serving):
                raise NoHealthyNode(
                    f"no healthy node serves '{model}' at or below max_price_per_mtok={cap}",
                    code="no_node_within_price_cap",
                )
            raise NoHealthyNode(f"no healthy node is available for '{model}' right now")
        ranked = rank(pool)
        if len(ranked) == 1:
            return ranked[0][1]
        return self.rng.choice(ranked[:2])[1]

    def ensure_available(self, model: str, cap: int | None = None,
                         features: dict[str, str] | None = None) -> None:
        """Raise 404/503 unless some healthy node serves ``model`` within ``cap`` (busy or
        not); 400 naming the parameter when none of them serves what the job needs."""
        serving = [c for c in self.registry.serving(model) if c.available and within_cap(c, cap)]
        if not serving:
            self.choose(model, cap)  # raises the precise error
        for feature, parameter in sorted((features or {}).items()):
            if not any(offers(c.models[model], frozenset({feature})) for c in serving):
                raise BadRequest(f"no node serving '{model}' supports {parameter} right now",
                                 param=parameter, code="unsupported_parameter")

    async def acquire(
        self, model: str, cap: int | None, exclude: Iterable[str], timeout: float,
        need: Need | None = None,
    ) -> NodeConn:
        """Like :meth:`choose`, but when every suitable node is busy, wait (up to
        ``timeout``) for one to free a slot instead of failing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        excluded = set(exclude)
        need = need or Need(cap)
        while True:
            try:
                return self.choose(model, cap, excluded, need)
            except NoHealthyNode:
                busy = any(
                    c.available and need.admits(c, model) and c.node_id not in excluded
                    for c in self.registry.serving(model)
                )
                left = deadline - loop.time()
                if not busy or left <= 0:
                    raise
                await self.registry.wait_changed(left)

    def hold_prices(self, model: str, cap: int | None = None, min_context: int = 0,
                    nodes: int = 4, spread: float = 4.0,
                    features: frozenset[str] = frozenset()) -> tuple[int, int]:
        """The (input, output) prices a job's hold is computed at: the highest among the
        ``nodes`` cheapest that could serve it (enough to fail over on), leaving out any
        asking more than ``spread`` times the (lower) median price. Nodes above these
        prices are not offered the job, so a node asking a fortune sets nobody's hold."""
        need = Need(cap, None, min_context, features)
        pool = sorted((c for c in self.registry.serving(model)
                       if c.available and need.admits(c, model)), key=_total_price)
        if not pool:
            return (0, 0)
        median = _total_price(pool[(len(pool) - 1) // 2])
        chosen = [c for c in pool if _total_price(c) <= spread * median][:max(1, nodes)]
        return max(c.price_in for c in chosen), max(c.price_out for c in chosen)

    def max_context(self, model: str, cap: int | None = None) -> int:
        """The longest context among the healthy nodes serving ``model`` within ``cap``."""
        return max((c.models[model].context_length for c in self.registry.serving(model)
                    if c.available and within_cap(c, cap)), default=0)
