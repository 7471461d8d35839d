"""Alembic environment: the URL comes from the market settings (or the caller).

``market.migrate.upgrade(url)`` passes the URL through ``config.attributes``; the
``alembic`` command line falls back to ``AIDP_DB__URL`` / the embedded default.
SQLite uses batch mode so later migrations can alter columns.
"""

from __future__ import annotations

from alembic import context

from market.db import is_sqlite, make_sync_engine
from market.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("database_url")
    if url:
        return url
    from market.settings import get_settings

    return get_settings().db.url


def run_migrations_offline() -> None:
    from market.db import driver_url

    url = _url()
    context.configure(
        url=driver_url(url, async_=False).render_as_string(hide_password=False),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=is_sqlite(url),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_sync_engine(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
