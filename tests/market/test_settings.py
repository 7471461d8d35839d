"""Settings in groups: one spelling (AIDP_GROUP__FIELD) for the environment, for
overrides by name and for ``aidp-market settings``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from market.settings import MarketSettings, Tolerances, environment_names, nested

REPO = Path(__file__).resolve().parents[2]


def test_group_fields_are_read_from_double_underscore_variables(monkeypatch) -> None:
    monkeypatch.setenv("AIDP_DB__URL", "postgresql://example/db")
    monkeypatch.setenv("AIDP_VERIFY__SAMPLE_RATE", "0.5")
    monkeypatch.setenv("AIDP_VERIFY__TOLERANCES__TOP_K", "64")
    monkeypatch.setenv("AIDP_CHAIN", '{"min_stake": 7}')
    s = MarketSettings()
    assert s.db.url == "postgresql://example/db"
    assert s.verify.sample_rate == 0.5
    assert s.verify.tolerances.top_k == 64
    assert s.verify.tolerances.logprob_tol == Tolerances().logprob_tol  # the rest keep defaults
    assert s.chain.min_stake == 7


def test_a_misspelt_group_field_is_an_error_not_a_silent_default() -> None:
    with pytest.raises(ValidationError, match="sample_rat"):
        MarketSettings(**nested({"verify__sample_rat": 1.0}))
    with pytest.raises(ValidationError):
        MarketSettings(**nested({"verify__sample_rate": 2.0}))  # bounded: a probability


def test_nested_spelling_round_trips_through_environment_names() -> None:
    s = MarketSettings(**nested({"routing__heartbeat_interval": 0.25, "verify__first_jobs": 3,
                                 "port": 9001}))
    names = dict(environment_names(s))
    assert names["AIDP_ROUTING__HEARTBEAT_INTERVAL"] == 0.25
    assert names["AIDP_VERIFY__FIRST_JOBS"] == 3
    assert names["AIDP_PORT"] == 9001
    assert "AIDP_VERIFY__TOLERANCES__Z_THRESHOLD" in names
    # every name printed is one the environment really sets
    env = {k: str(v) for k, v in names.items() if not isinstance(v, dict) and v is not None}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        reread = MarketSettings()
    assert reread.routing.heartbeat_interval == 0.25 and reread.verify.first_jobs == 3


def test_settings_command_masks_secrets(tmp_path: Path) -> None:
    env = {**os.environ, "AIDP_ADMIN_TOKEN": "a-very-secret-admin-token-value",
           "AIDP_VERIFY__SAMPLING_KEY": "hmac-key", "AIDP_LIMITS__RATE_LIMIT_RPM": "42"}
    out = subprocess.run([sys.executable, "-m", "market.cli", "settings"], cwd=tmp_path, env={
        **env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=True).stdout
    assert "AIDP_LIMITS__RATE_LIMIT_RPM=42" in out
    assert "AIDP_ADMIN_TOKEN=***" in out and "AIDP_VERIFY__SAMPLING_KEY=***" in out
    assert "a-very-secret" not in out and "hmac-key" not in out
