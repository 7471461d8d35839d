"""`aidp-market` commands and the migrations, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from market.cli import main
from market.db import make_sync_engine
from market.migrate import upgrade
from market.models import Base
from market.settings import get_settings


def aidp_market(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, in a child process."""
    env = {**os.environ, "AIDP_DB__URL": db_url}
    script = Path(sys.executable).with_name("aidp-market")
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def cli(db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """``aidp-market`` in-process (the same ``main``), on this module's database."""
    monkeypatch.setenv("AIDP_DB__URL", db_url)
    get_settings.cache_clear()

    def run(*args: str) -> tuple[int, str]:
        code = main(list(args))
        return code, capsys.readouterr().out

    yield run
    get_settings.cache_clear()


def test_accounts_keys_credit_usage(db_url: str, cli: Any) -> None:
    def run_json(*args: str) -> Any:
        code, out = cli(*args)
        assert code == 0, out
        return json.loads(out)

    account = run_json("accounts", "create", "carol")
    assert account["balance"] == 0 and account["id"].startswith("acct_")
    key = run_json("keys", "create", "--account", account["id"], "--name", "laptop")
    assert key["key"].startswith("sk-aidp-") and len(key["key"]) == len("sk-aidp-") + 32
    listed = run_json("keys", "list", "--account", account["id"])
    assert "key" not in listed[0] and listed[0]["prefix"] == key["key"][:12]
    credited = run_json("credit", account["id"], "5000", "--reference", "r1")
    again = run_json("credit", account["id"], "5000", "--reference", "r1")
    assert credited["balance"] == 5000 and again["balance"] == 5000
    assert again["credit_applied"] is False
    revoked = run_json("keys", "revoke", key["id"])
    assert revoked["revoked"] is True
    usage = run_json("usage", account["id"])
    assert usage["requests"] == 0 and usage["charged"] == 0
    # only the hash is stored
    engine = make_sync_engine(db_url)
    with engine.connect() as conn:
        hashes = conn.execute(sa.text("SELECT key_hash FROM api_keys")).scalars().all()
    engine.dispose()
    assert key["key"] not in hashes and all(len(h) == 64 for h in hashes)


def test_unknown_account_is_an_error(cli: Any) -> None:
    code, out = cli("keys", "create", "--account", "acct_nope")
    assert code == 1 and "no account" in out


def test_help_lists_commands(db_url: str) -> None:
    result = aidp_market(db_url, "--help")
    assert result.returncode == 0
    for command in ("serve", "migrate", "accounts", "keys", "credit", "usage", "up"):
        assert command in result.stdout


def test_migrations_match_models_and_are_idempotent(db_url: str) -> None:
    upgrade(db_url)
    upgrade(db_url)
    engine = make_sync_engine(db_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn)
        diffs = [d for d in compare_metadata(context, Base.metadata)
                 # tables that later migrations add without ORM classes here
                 if not (d[0] in ("remove_table", "remove_index")
                         and not str(getattr(d[1], "name", "")).startswith(tuple(
                             Base.metadata.tables)))]
        assert diffs == []
        assert context.get_current_revision() is not None
    engine.dispose()
