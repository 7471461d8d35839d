"""Run the Alembic migrations in ``migrations/`` against a database URL."""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parent.parent
_lock = threading.Lock()


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """``alembic upgrade head`` for ``url`` (idempotent; serialized within a process)."""
    with _lock:
        command.upgrade(alembic_config(url), revision)
