"""Fixtures every test package may use: real service URLs and an artifacts folder.

PostgreSQL and Redis are real servers. Where one is unreachable a test that needs it
is skipped with the reason, except under CI (``CI=true``), where that is a failure:
CI machines have both, so a skip there would hide a broken suite.
"""

from __future__ import annotations

import os
import socket
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
