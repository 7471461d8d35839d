"""Prometheus metrics of the gateway (one registry per app, served at /metrics)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "aidp_requests", "API requests by endpoint and status code",
            ["endpoint", "status"], registry=r,
        )
        self.ttft = Histogram(
            "aidp_ttft_seconds", "Time to first token as seen by the buyer",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.latency = Histogram(
            "aidp_request_seconds", "Total request latency", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "aidp_tokens", "Tokens served", ["model", "type"], registry=r,
        )
        self.nodes = Gauge("aidp_nodes", "Connected nodes", ["state"], registry=r)
        self.failovers = Counter(
            "aidp_failovers", "Jobs moved to another node", ["phase"], registry=r,
        )
        for phase in ("before_first_token", "mid_stream"):
            self.failovers.labels(phase)
        self.node_errors = Counter(
            "aidp_node_errors", "Node failures by reason", ["reason"], registry=r,
        )
        self.receipts_rejected = Counter(
            "aidp_receipts_rejected", "Receipts failing the cheap checks", ["code"], registry=r,
        )
        self.charged = Counter(
            "aidp_charged_base_units", "Buyer charges (AIDP base units)", registry=r,
        )


def endpoint_label(scope: Any) -> str:
    """The route template a request matched (``/v1/jobs/{job_id}``), never its raw path:
    metric labels come from a closed set, whatever URLs clients send."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"
