"""GPU detection and metrics through NVML (``nvidia-ml-py``), and CPU info.

A machine without a GPU (or without the NVIDIA driver) is a normal case, not an
error: :class:`GpuMonitor` then reports ``available = False`` with a note saying why,
and receipts carry no GPU metrics.

While jobs run, a background thread samples every GPU every ``interval`` seconds;
a receipt gets the aggregate of the samples taken between its job's start and end
(utilisation and power averaged, memory and temperature at their maximum).
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from protocol.messages import GpuInfo, GpuSample
from protocol.receipt import GpuMetrics

log = logging.getLogger("aidp.node.gpu")


@dataclass(frozen=True)
class Reading:
    at: float
    index: int
    name: str
    util_pct: float
    memory_used_mb: int
    memory_total_mb: int
    temperature_c: float
    power_w: float


def _nvml() -> Any:
    import pynvml  # from nvidia-ml-py

    return pynvml


def cpu_info() -> dict[str, Any]:
    """Processor model, cores and memory, for ``doctor`` and CPU-only nodes."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"model": model, "cores": os.cpu_count() or 1}
    try:
        import psutil

        info["memory_mb"] = int(psutil.virtual_memory().total / 2**20)
    except ImportError:
        pass
    return info


class GpuMonitor:
    """NVML handles, instantaneous readings and a job-time background sampler."""

    def __init__(self, interval: float = 0.25, history_s: float = 3600.0) -> None:
        self.interval = interval
        self.available = False
        self.note = ""
        self._handles: list[Any] = []
        self._names: list[str] = []
        self._history: deque[list[Reading]] = deque(maxlen=max(16, int(history_s / interval)))
        self._lock = threading.Lock()
        self._active = 0
        self._wake = threading.Event()
        self._stopped = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read_failed = False  # warned once about a failing reading
        try:
            nvml = _nvml()
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            for i in range(count):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                name = nvml.nvmlDeviceGetName(handle)
                self._handles.append(handle)
                self._names.append(name.decode() if isinstance(name, bytes) else str(name))
            self.available = count > 0
            self.note = (
                f"{count} NVIDIA GPU(s) found through NVML" if count else "NVML found no GPU"
            )
        except ImportError:
            self.note = "nvidia-ml-py is not installed; no GPU metrics"
        except Exception as exc:  # pynvml.NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.note = f"no NVIDIA GPU found ({exc.__class__.__name__}: {exc}); running on CPU"

    # ---- readings ---------------------------------------------------------------

    def read(self) -> list[Reading]:
        if not self.available:
            return []
        nvml = _nvml()
        now = time.time()
        readings = []
        for index, (handle, name) in enumerate(zip(self._handles, self._names, strict=True)):
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                temp = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            except Exception:
                temp = 0.0
            try:
                power = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
            except Exception:
                power = 0.0
            readings.append(
                Reading(
                    at=now,
                    index=index,
                    name=name,
                    util_pct=float(util.gpu),
                    memory_used_mb=int(mem.used / 2**20),
                    memory_total_mb=int(mem.total / 2**20),
                    temperature_c=temp,
                    power_w=power,
                )
            )
        return readings

    def gpu_infos(self) -> list[GpuInfo]:
        return [GpuInfo(name=r.name, vram_mb=r.memory_total_mb) for r in self.read()]

    def samples(self) -> list[GpuSample]:
        """Current readings in the heartbeat's shape."""
        return [
            GpuSample(
                name=r.name,
                util_pct=r.util_pct,
                memory_used_mb=r.memory_used_mb,
                temperature_c=r.temperature_c,
                power_w=r.power_w,
            )
            for r in self.read()
        ]

    # ---- job-time sampling ---------------------------------------------------------

    def _record(self) -> None:
        try:
            readings = self.read()
        except Exception as exc:  # pynvml.NVMLError: a lost or busy GPU must not fail a job
            if not self._read_failed:
                log.warning("GPU reading failed (%s: %s); that sample is skipped",
                            exc.__class__.__name__, exc)
                self._read_failed = True
            return
        if readings:
            with self._lock:
                self._history.append(readings)

    def _loop(self) -> None:
        while not self._stopped:
            if self._active > 0:
                self._record()
                self._stop.wait(self.interval)  # close() wakes it at once
            else:
                self._wake.wait(1.0)
                self._wake.clear()

    def job_started(self) -> float:
        """Mark a job as running (starts sampling); returns the start time."""
        started = time.time()
        if self.available:
            with self._lock:
                self._active += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
                self._thread.start()
            self._wake.set()
            self._record()
        return started

    def job_finished(self, started_at: float) -> GpuMetrics | None:
        """Aggregate the samples taken since ``started_at`` (None without a GPU)."""
        if not self.available:
            return None
        self._record()
        with self._lock:
            self._active = max(0, self._active - 1)
            rows = [r for rs in self._history if rs and rs[0].at >= started_at for r in rs]
        return aggregate(rows)

    def close(self) -> None:
        self._stopped = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            # let the sampler finish its reading before NVML goes away under it
            self._thread.join(timeout=self.interval + 2.0)
        if self.available:
            try:
                _nvml().nvmlShutdown()
            except Exception:
                pass


def aggregate(rows: list[Reading]) -> GpuMetrics | None:
    """One ``GpuMetrics`` from readings of one or more GPUs over a job."""
    if not rows:
        return None
    names = sorted({r.name for r in rows})
    indices = {r.index for r in rows}
    name = names[0] if len(names) == 1 else " + ".join(names)
    if len(indices) > 1:
        name = f"{len(indices)}x {name}"
    times = sorted({r.at for r in rows})
    per_time_mem = [sum(r.memory_used_mb for r in rows if r.at == t) for t in times]
    per_time_power = [sum(r.power_w for r in rows if r.at == t) for t in times]
    return GpuMetrics(
        name=name,
        util_avg=round(sum(r.util_pct for r in rows) / len(rows), 2),
        memory_used_mb=max(per_time_mem),
        power_avg_w=round(sum(per_time_power) / len(per_time_power), 2),
        temperature_max_c=max(r.temperature_c for r in rows),
        samples=len(times),
    )
