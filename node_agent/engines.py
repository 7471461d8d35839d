"""Engines behind one interface (:mod:`inference.base`); built by name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from inference.base import Engine, EngineError

if TYPE_CHECKING:
    from node_agent.settings import NodeSettings

ENGINES = ("llamacpp", "vllm", "transformers")


def create_engine(settings: NodeSettings) -> Engine:
    """Build (not start) the engine the settings ask for; imports it lazily."""
    # what every engine takes; each branch adds its own settings
    common: dict[str, Any] = {
        "model_id": settings.model,
        "n_ctx": settings.n_ctx,
        "cache_dir": settings.cache_dir.expanduser(),
    }
    if settings.engine == "llamacpp":
        from inference.llamacpp import LlamaCppEngine

        return LlamaCppEngine(settings.model_path, n_threads=settings.threads,
                              pool_size=settings.pool_size, **common)
    if settings.engine == "transformers":
        from inference.transformers import TransformersEngine

        return TransformersEngine(settings.model_path, device=settings.device,
                                  dtype=settings.dtype, **common)
    if settings.engine == "vllm":
        from inference.vllm import VllmEngine

        return VllmEngine(settings.model_path or settings.model, python=settings.vllm_python,
                          port=settings.vllm_port, extra_args=settings.vllm_args, **common)
    raise EngineError("unknown_engine", f"unknown engine {settings.engine!r}; one of {ENGINES}")


__all__ = ["ENGINES", "Engine", "EngineError", "create_engine"]
