"""Database engines and sessions, sync and async, from the one ``database_url`` setting.

``sqlite:///path`` and ``postgresql://…`` (or ``postgres://``) are accepted and mapped to
drivers: ``sqlite+pysqlite`` / ``sqlite+aiosqlite`` and ``postgresql+psycopg`` (psycopg 3
serves both the sync and the async engine). SQLite files get WAL mode, a busy timeout
and foreign keys on every connection.

The request path reads through the async engine and writes through
:class:`market.writer.BatchWriter` (one writer, group commit, on the sync engine);
Celery workers and the CLI use sync sessions. Business logic is written once against
a sync ``Session``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

SQLITE_BUSY_TIMEOUT_MS = 10_000


def driver_url(url: str, *, async_: bool) -> URL:
    """Map a plain database URL to the driver this code uses (sync or async)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite" if async_ else "sqlite+pysqlite")
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:///… or postgresql://…")


def is_sqlite(url: str | URL) -> bool:
    return make_url(str(url) if isinstance(url, URL) else url).get_backend_name() == "sqlite"


def _ensure_sqlite_dir(url: URL) -> None:
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_connect_sync(dbapi_connection: Any, record: Any) -> None:
    _sqlite_pragmas(dbapi_connection, record)
    # Let SQLAlchemy, not the sqlite3 module, emit BEGIN (so SAVEPOINTs work) ...
    dbapi_connection.isolation_level = None


def _sqlite_begin_immediate(conn: Any) -> None:
    # ... and take the write lock up front: a deferred transaction that reads and then
    # writes can fail with "database is locked" without waiting for busy_timeout.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_sync_engine(url: str, **kwargs: Any) -> Engine:
    """A sync engine. On SQLite every transaction is ``BEGIN IMMEDIATE``: writers queue
    on the busy timeout instead of failing on a lock upgrade."""
    target = driver_url(url, async_=False)
    if target.get_backend_name() == "sqlite":
        _ensure_sqlite_dir(target)
        kwargs.setdefault("connect_args", {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        engine = create_engine(target, **kwargs)
        event.listen(engine, "connect", _sqlite_connect_sync)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(target, **kwargs)


def make_async_engine(url: str, **kwargs: Any) -> AsyncEngine:
    target = driver_url(url, async_=True)
    if target.get_backend_name() == "sqlite":
        _ensure_sqlite_dir(target)
        kwargs.setdefault("connect_args", {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        engine = create_async_engine(target, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 20)
    kwargs.setdefault("max_overflow", 20)
    return create_async_engine(target, **kwargs)


class Database:
    """Both engines and session factories for one database URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sync_engine = make_sync_engine(url)
        self.async_engine = make_async_engine(url)
        self.sync_sessions = sessionmaker(self.sync_engine, expire_on_commit=False)
        self.async_sessions = async_sessionmaker(self.async_engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A sync session in a transaction: committed on success, rolled back on error."""
        with self.sync_sessions.begin() as session:
            yield session

    async def dispose(self) -> None:
        await self.async_engine.dispose()
        self.sync_engine.dispose()


def sync_session_factory(url: str, *, null_pool: bool = False) -> sessionmaker[Session]:
    """A sync sessionmaker for workers and CLI commands that only need sync access."""
    engine = make_sync_engine(url, poolclass=NullPool) if null_pool else make_sync_engine(url)
    return sessionmaker(engine, expire_on_commit=False)


__all__ = [
    "AsyncSession",
    "Database",
    "Session",
    "driver_url",
    "is_sqlite",
    "make_async_engine",
    "make_sync_engine",
    "sync_session_factory",
]
