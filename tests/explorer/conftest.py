"""Explorer fixtures: a real market with a real node link, on SQLite and PostgreSQL."""

from tests.market.conftest import buyer, db_url, market, nodes  # noqa: F401 - re-exported fixtures
