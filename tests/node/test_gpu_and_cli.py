"""GPU metrics aggregation, CPU-only detection, metrics endpoint, and the aidp-node CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from node_agent.cli import main
from node_agent.gpu import GpuMonitor, Reading, aggregate, cpu_info
from node_agent.metrics import NodeMetrics
from protocol.keys import load_keypair
from tests.support.net import free_port


def _node_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``aidp-node ARGS`` in a child python: exit status and output, as an operator
    sees them (the error paths under test end the process)."""
    return subprocess.run(
        [sys.executable, "-m", "node_agent.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _scrape(metrics: NodeMetrics) -> str:
    """One Prometheus scrape of ``metrics`` served on a fresh local port."""
    port = free_port()
    server = metrics.serve(port)
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server[0].shutdown()


def reading(at: float, index: int, util: float, mem: int, temp: float, power: float) -> Reading:
    return Reading(
        at=at,
        index=index,
        name="NVIDIA H100",
        util_pct=util,
        memory_used_mb=mem,
        memory_total_mb=81559,
        temperature_c=temp,
        power_w=power,
    )


def test_aggregate_one_and_two_gpus() -> None:
    assert aggregate([]) is None
    one = aggregate([reading(1, 0, 50, 1000, 40, 100), reading(2, 0, 100, 3000, 60, 300)])
    assert one is not None
    assert (
        one.name,
        one.util_avg,
        one.memory_used_mb,
        one.power_avg_w,
        one.temperature_max_c,
        one.samples,
    ) == ("NVIDIA H100", 75.0, 3000, 200.0, 60, 2)
    two = aggregate([reading(1, 0, 50, 1000, 40, 100), reading(1, 1, 70, 500, 45, 120)])
    assert two is not None and two.name == "2x NVIDIA H100"
    assert two.memory_used_mb == 1500 and two.power_avg_w == 220.0 and two.samples == 1


def test_no_gpu_is_not_an_error() -> None:
    monitor = GpuMonitor()
    if monitor.available:
        pytest.skip("this machine has an NVIDIA GPU")
    assert monitor.note and monitor.samples() == [] and monitor.gpu_infos() == []
    started = monitor.job_started()
    assert monitor.job_finished(started) is None
    info = cpu_info()
    assert info["cores"] >= 1 and info["model"]


def test_metrics_endpoint_serves_prometheus_text() -> None:
    metrics = NodeMetrics()
    metrics.job_done(model="m", tokens=11, seconds=1.1, ttft=0.1)
    metrics.running.set(2)
    text = _scrape(metrics)
    assert "aidp_node_running_jobs 2.0" in text
    assert 'aidp_node_generated_tokens_total{model="m"} 11.0' in text
    assert 'aidp_node_tokens_per_second{model="m"} 10.0' in text
    assert NodeMetrics().serve(0) is None


def test_keygen_writes_a_solana_keypair_and_refuses_to_overwrite(tmp_path, capsys) -> None:
    path = tmp_path / "id.json"
    assert main(["keygen", "--outfile", str(path)]) == 0
    raw = json.loads(path.read_text())
    assert isinstance(raw, list) and len(raw) == 64 and all(0 <= b < 256 for b in raw)
    pubkey = str(load_keypair(path).pubkey())
    assert pubkey in capsys.readouterr().out
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert main(["keygen", "--outfile", str(path)]) == 1
    assert str(load_keypair(path).pubkey()) == pubkey
    assert main(["keygen", "--outfile", str(path), "--force"]) == 0
    assert str(load_keypair(path).pubkey()) != pubkey


def test_doctor_reports_cpu_gpu_engines_models(capsys) -> None:
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cpu"]["cores"] >= 1
    assert "available" in report["gpu"] and report["gpu"]["note"]
    assert report["engines"]["llamacpp"]["usable"]
    assert any(m["id"] == "SmolLM2-135M-Instruct" for m in report["models"])
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "GPU" in text and "llamacpp" in text and "SmolLM2-135M-Instruct" in text


def test_help_texts() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "node_agent.cli", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in (
        "--market",
        "--keypair",
        "--model",
        "--engine",
        "--price-in",
        "--price-out",
        "--metrics-port",
        "AIDP_NODE_",
    ):
        assert flag in out


def test_run_without_keypair_explains_what_to_do(tmp_path) -> None:
    proc = _node_cli("run", "--keypair", str(tmp_path / "none.json"), "--metrics-port", "0")
    assert proc.returncode == 2 and "aidp-node keygen" in proc.stderr


def test_run_with_an_invalid_setting_says_which_and_exits_2(tmp_path) -> None:
    from solders.keypair import Keypair

    from protocol.keys import save_keypair

    key = save_keypair(Keypair(), tmp_path / "id.json")
    proc = _node_cli("run", "--keypair", str(key), "--max-concurrency", "0", "--metrics-port", "0")
    assert proc.returncode == 2 and "max_concurrency" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_with_an_unreadable_keypair_explains_it(tmp_path) -> None:
    bad = tmp_path / "id.json"
    bad.write_text("[1, 2, 3]")
    proc = _node_cli("run", "--keypair", str(bad), "--metrics-port", "0")
    assert proc.returncode == 2 and "cannot read the keypair" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_failing_gpu_reading_does_not_fail_the_job(monkeypatch) -> None:
    """NVML errors (a GPU lost or busy) skip samples; the job and its receipt go on."""
    from types import SimpleNamespace

    import node_agent.gpu as gpu_mod

    calls = {"n": 0}

    def utilization(handle):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("NVMLError_Unknown")
        return SimpleNamespace(gpu=80)

    fake = SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: "NVIDIA H100",
        nvmlDeviceGetUtilizationRates=utilization,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=2**30, total=80 * 2**30),
        nvmlDeviceGetTemperature=lambda h, kind: 50,
        nvmlDeviceGetPowerUsage=lambda h: 300_000,
        NVML_TEMPERATURE_GPU=0,
    )
    monkeypatch.setattr(gpu_mod, "_nvml", lambda: fake)
    monitor = GpuMonitor(interval=60)
    assert monitor.available
    started = monitor.job_started()  # first reading works
    metrics = monitor.job_finished(started)  # second one raises: skipped, not raised
    closing = time.monotonic()
    monitor.close()
    assert time.monotonic() - closing < 5  # the sampler wakes up to stop, not after 60 s
    assert metrics is not None and metrics.util_avg == 80 and metrics.samples >= 1
    assert not monitor._thread.is_alive()


def test_metrics_scrape_survives_a_failing_gpu_reading() -> None:
    from types import SimpleNamespace

    def broken() -> list:
        raise RuntimeError("NVMLError_GpuIsLost")

    monitor = SimpleNamespace(available=True, read=broken)
    metrics = NodeMetrics(monitor)  # type: ignore[arg-type]
    metrics.running.set(1)
    text = _scrape(metrics)
    assert "aidp_node_running_jobs 1.0" in text
