"""Local Prometheus metrics (``/metrics`` on a small HTTP port, default 9400).

Each :class:`NodeMetrics` owns its registry, so several nodes can live in one
process (tests, benches) without clashing on metric names.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from node_agent.gpu import GpuMonitor

log = logging.getLogger("aidp.node.metrics")


class NodeMetrics:
    def __init__(self, gpu_monitor: GpuMonitor | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("aidp_node_running_jobs", "Jobs generating right now", registry=r)
        self.jobs = Counter("aidp_node_jobs", "Jobs finished with a receipt", ["model"], registry=r)
        self.tokens = Counter(
            "aidp_node_generated_tokens", "Completion tokens generated", ["model"], registry=r
        )
        self.tokens_per_s = Gauge(
            "aidp_node_tokens_per_second",
            "Decode speed of the last finished job",
            ["model"],
            registry=r,
        )
        # the latency histograms differ only in name and buckets
        per_model = functools.partial(Histogram, labelnames=["model"], registry=r)
        self.ttft = per_model(
            "aidp_node_ttft_seconds",
            "Time to first token",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.job_seconds = per_model(
            "aidp_node_job_seconds",
            "Whole job duration",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.gpu_monitor = gpu_monitor
        if gpu_monitor is not None and gpu_monitor.available:
            r.register(_GpuRefresher(self))  # first, so the gauges below are fresh at scrape
            labels = ["gpu", "name"]
            self.gpu_util = Gauge(
                "aidp_node_gpu_utilization_percent", "GPU util", labels, registry=r
            )
            self.gpu_mem = Gauge(
                "aidp_node_gpu_memory_used_mb", "GPU memory used", labels, registry=r
            )
            self.gpu_temp = Gauge(
                "aidp_node_gpu_temperature_c", "GPU temperature", labels, registry=r
            )
            self.gpu_power = Gauge("aidp_node_gpu_power_w", "GPU power draw", labels, registry=r)

    def job_done(self, *, model: str, tokens: int, seconds: float, ttft: float | None) -> None:
        self.jobs.labels(model).inc()
        self.tokens.labels(model).inc(tokens)
        self.job_seconds.labels(model).observe(seconds)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
            decode = seconds - ttft
            if tokens > 1 and decode > 0:
                self.tokens_per_s.labels(model).set((tokens - 1) / decode)

    def refresh_gpus(self) -> None:
        if self.gpu_monitor is None:
            return
        try:
            readings = self.gpu_monitor.read()
        except Exception:  # pynvml.NVMLError: keep the last values, serve the rest
            log.warning("GPU reading for /metrics failed", exc_info=True)
            return
        for reading in readings:
            labels = (str(reading.index), reading.name)
            self.gpu_util.labels(*labels).set(reading.util_pct)
            self.gpu_mem.labels(*labels).set(reading.memory_used_mb)
            self.gpu_temp.labels(*labels).set(reading.temperature_c)
            self.gpu_power.labels(*labels).set(reading.power_w)

    def serve(self, port: int, host: str = "127.0.0.1") -> Any:
        """Start the /metrics HTTP server in a thread (port 0 = disabled)."""
        if port <= 0:
            return None
        return start_http_server(port, addr=host, registry=self.registry)


class _GpuRefresher:
    """A collector that refreshes the GPU gauges at scrape time and yields nothing itself."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> list[Any]:
        self.metrics.refresh_gpus()
        return []
