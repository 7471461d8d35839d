"""Running a node: load the engine, serve /metrics, hold the market link until a signal.

SIGTERM/SIGINT drain (no new jobs, running ones finish, up to ``drain_timeout``); a
second signal stops at once. The engine is closed however this ends, so a vLLM child
never outlives the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from node_agent import __version__
from node_agent.settings import NodeSettings
from protocol.keys import DEFAULT_KEYPAIR_PATH
from protocol.runtime import tune_for_latency


def _say(message: str) -> None:
    print(message, flush=True)


async def serve(settings: NodeSettings, *, install_signals: bool = True) -> int:
    """Start the engine, the metrics endpoint and the link; run until SIGTERM/SIGINT."""
    from node_agent.engines import create_engine
    from node_agent.gpu import GpuMonitor

    keypair = _load_keypair(settings.keypair)
    if keypair is None:
        return 2
    gpu = GpuMonitor()
    _say(f"aidp-node {__version__}: node {keypair.pubkey()}; {gpu.note}")
    engine = create_engine(settings)
    embedders = create_embedders(settings)
    try:
        return await _serve_engine(settings, keypair, engine, embedders, gpu, install_signals)
    finally:
        # also when loading fails or is interrupted: a vLLM child must not outlive us
        await engine.close()
        for embedder in embedders:
            await embedder.close()
        gpu.close()


def create_embedders(settings: NodeSettings) -> list[Any]:
    """The embedding model the settings ask for (none unless ``embedding_model`` is set)."""
    if not settings.embedding_model:
        return []
    from inference.embedding import SentenceEmbedder

    path = None if settings.embedding_model == "default" else settings.embedding_model
    return [SentenceEmbedder(path, model_id=settings.embedding_model_id,
                             device=settings.device,
                             threads=settings.threads,
                             cache_dir=settings.cache_dir.expanduser())]


def _load_keypair(path: Path) -> Any | None:
    """The node's keypair, or None after telling the operator what to do about it."""
    from protocol.keys import load_keypair

    keypair_path = path.expanduser()
    outfile = "" if path == DEFAULT_KEYPAIR_PATH else f" --outfile {path}"
    if not keypair_path.exists():
        print(
            f"error: no keypair at {keypair_path}; create one with `aidp-node keygen{outfile}`",
            file=sys.stderr,
        )
        return None
    try:
        return load_keypair(keypair_path)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read the keypair {keypair_path}: {exc}", file=sys.stderr)
        return None


async def _serve_engine(
    settings: NodeSettings, keypair: Any, engine: Any, embedders: list[Any], gpu: Any,
    install_signals: bool,
) -> int:
    from node_agent.link import NodeLink

    started = time.perf_counter()
    _say(f"loading {settings.model} on {settings.engine}…")
    await engine.start()
    _say(
        f"engine {engine.name} ({engine.version}) loaded {engine.model.id} "
        f"[{engine.model.quantization or 'native'}] sha256 {engine.model.sha256[:16]}… "
        f"in {time.perf_counter() - started:.1f}s"
    )
    for embedder in embedders:
        started = time.perf_counter()
        await embedder.start()
        _say(f"embeddings: {embedder.model.id} ({embedder.dimensions} dimensions, "
             f"{embedder.version}) sha256 {embedder.model.sha256[:16]}… "
             f"in {time.perf_counter() - started:.1f}s")
    link = NodeLink(
        settings.market_url,
        keypair,
        engine,
        price=(settings.price_in, settings.price_out),
        max_concurrency=settings.max_concurrency,
        region=settings.region,
        gpu_monitor=gpu,
        metrics=_start_metrics(settings, gpu),
        ssl_context=tls_context(settings.ca_file),
        embedders=embedders,
    )
    if install_signals:  # this process is the node's own: see protocol.runtime
        install_signal_handlers(link, settings.drain_timeout)
        tune_for_latency()
    _say(f"connecting to {link.url}…")
    announcer = asyncio.create_task(_announce(link, engine, settings))
    try:
        await link.run()
    finally:
        announcer.cancel()
    _say(f"stopped after {link.stats.jobs_done} job(s), {link.stats.tokens} token(s)")
    return 0


def _start_metrics(settings: NodeSettings, gpu: Any) -> Any:
    """The node's metrics, served on ``metrics_port`` when it is free (a taken port only
    turns the endpoint off: it is no reason not to serve jobs)."""
    from node_agent.metrics import NodeMetrics

    metrics = NodeMetrics(gpu)
    if settings.metrics_port:
        try:
            metrics.serve(settings.metrics_port, settings.metrics_host)
            _say(f"metrics on http://{settings.metrics_host}:{settings.metrics_port}/metrics")
        except OSError as exc:
            _say(f"warning: metrics port {settings.metrics_port} unavailable ({exc}); metrics off")
    return metrics


def install_signal_handlers(link: Any, drain_timeout: float) -> None:
    """SIGTERM/SIGINT: the first drains the link, a second stops it at once."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    pending: set[asyncio.Future[None]] = set()  # signal-started shutdowns, kept referenced

    def on_signal(signame: str) -> None:
        if stopping.is_set():
            _say(f"{signame} again: stopping now")
            future = asyncio.ensure_future(link.stop())
        else:
            stopping.set()
            _say(
                f"{signame}: draining ({link.running_jobs} job(s) in flight, "
                f"up to {drain_timeout:.0f}s)…"
            )
            future = asyncio.ensure_future(link.drain(timeout=drain_timeout))
        pending.add(future)
        future.add_done_callback(pending.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal, sig.name)


async def _announce(link: Any, engine: Any, settings: NodeSettings) -> None:
    """Say when the node is first ready, each reconnection, and each link lost."""
    announced = False
    while True:
        await link.ready.wait()
        if not announced:
            _say(
                f"ready: node {link.node_id} serving {engine.model.id} via {engine.name} "
                f"at {settings.market_url} (max_concurrency {settings.max_concurrency})"
            )
            announced = True
        else:
            _say(f"reconnected: node {link.node_id}")
        while link.ready.is_set():
            await asyncio.sleep(0.2)
        if not link.draining:
            _say("link lost; reconnecting…")


def tls_context(ca_file: Path | None) -> ssl.SSLContext | None:
    """The TLS trust for a wss:// market: the system's CAs, or ``ca_file``'s."""
    if ca_file is None:
        return None
    return ssl.create_default_context(cafile=str(ca_file.expanduser()))
