"""Market fixtures: a real server per module, on SQLite and on PostgreSQL."""

from tests.support.market import _close_clients, buyer, db_url, market, nodes  # noqa: F401
