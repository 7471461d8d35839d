"""What decides verification and administration is secret and can be neither guessed
nor derived: invariant 3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from market.db import Database
from market.migrate import upgrade
from market.secret_store import SAMPLING_KEY, get_or_create
from market.settings import MarketSettings, exposure_problem, nested
from market.verify.sampling import sampling_key

BIN = Path(sys.executable).parent


def test_the_sampling_key_is_random_per_market_and_shared_by_its_processes(
    tmp_path: Path,
) -> None:
    """Two markets with the same admin token draw different, random keys; every process
    of one market (another connection, a worker) reads the same one from the database."""
    keys = []
    for name in ("a", "b"):
        url = f"sqlite:///{tmp_path}/{name}.db"
        upgrade(url)
        settings = MarketSettings(**nested(dict(db__url=url, admin_token="the-same-admin-token" * 2)))
        first, second = Database(url), Database(url)  # two processes' connections
        with first.session() as s:
            key = sampling_key(s, settings)
        with second.session() as s:
            assert sampling_key(s, settings) == key
            assert get_or_create(s, SAMPLING_KEY) == key.hex()
        keys.append(key)
        first.sync_engine.dispose()
        second.sync_engine.dispose()
    assert keys[0] != keys[1] and all(len(k) == 32 for k in keys)
    import hashlib

    derived = hashlib.sha256(b"aidp/verify-sampling/" + b"the-same-admin-token" * 2).digest()
    assert derived not in keys


@pytest.mark.parametrize("token,host,refused", [
    ("dev-admin-token", "0.0.0.0", True),
    ("short", "10.1.2.3", True),
    ("x" * 40, "0.0.0.0", False),
    ("dev-admin-token", "127.0.0.1", False),
    ("dev-admin-token", "::1", False),
])
def test_exposure_needs_a_real_admin_token(token: str, host: str, refused: bool) -> None:
    problem = exposure_problem(MarketSettings(admin_token=token), host)
    assert (problem is not None) == refused


def test_serve_refuses_to_listen_publicly_with_the_default_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AIDP_ADMIN_TOKEN"}
    env.update(AIDP_DATA_DIR=str(tmp_path), AIDP_DB__URL=f"sqlite:///{tmp_path}/m.db")
    out = subprocess.run([str(BIN / "aidp-market"), "serve", "--host", "0.0.0.0"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "AIDP_ADMIN_TOKEN" in out.stderr
