"""Explorer fixtures: a real market with a real node link, on SQLite and PostgreSQL."""

from tests.support.market import _close_clients, buyer, db_url, market, nodes  # noqa: F401
