"""Engines behind one interface (:mod:`inference.base`); built by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from inference.base import Engine, EngineError

if TYPE_CHECKING:
    from node_agent.settings import NodeSettings

ENGINES = ("llamacpp", "vllm", "transformers")


def create_engine(settings: NodeSettings) -> Engine:
    """Build (not start) the engine the settings ask for; imports it lazily."""
    cache_dir = settings.cache_dir.expanduser()
    if settings.engine == "llamacpp":
        from inference.llamacpp import LlamaCppEngine

        return LlamaCppEngine(
            settings.model_path,
            model_id=settings.model,
            n_ctx=settings.n_ctx,
            n_threads=settings.threads,
            pool_size=settings.pool_size,
            cache_dir=cache_dir,
        )
    if settings.engine == "transformers":
        from inference.transformers import TransformersEngine

        return TransformersEngine(
            settings.model_path,
            model_id=settings.model,
            device=settings.device,
            dtype=settings.dtype,
            n_ctx=settings.n_ctx,
            cache_dir=cache_dir,
        )
    if settings.engine == "vllm":
        from inference.vllm import VllmEngine

        return VllmEngine(
            settings.model_path or settings.model,
            model_id=settings.model,
            python=settings.vllm_python,
            port=settings.vllm_port,
            extra_args=settings.vllm_args,
            n_ctx=settings.n_ctx,
            cache_dir=cache_dir,
        )
    raise EngineError("unknown_engine", f"unknown engine {settings.engine!r}; one of {ENGINES}")


__all__ = ["ENGINES", "Engine", "EngineError", "create_engine"]
