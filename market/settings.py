"""All marketplace configuration, in one object, read from ``AIDP_*`` variables.

Every field has an embedded default so ``make up`` needs no server: SQLite for the
database, SQLite for the Celery broker, the in-process ledger. Production points the
same fields at PostgreSQL, Redis and a Solana RPC URL.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DATA_DIR = Path(".aidp")


class MarketSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AIDP_", env_file=".env", extra="ignore")

    # --- service -----------------------------------------------------------------
    data_dir: Path = DATA_DIR
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    log_json: bool = False
    admin_token: str = Field(
        default="dev-admin-token",
        description="Bearer token for /admin endpoints; change it outside development.",
    )

    # --- storage -----------------------------------------------------------------
    database_url: str = f"sqlite:///{DATA_DIR}/market.db"

    # --- billing (integer AIDP base units) ---------------------------------------
    market_fee_bps: int = Field(default=1000, ge=0, le=10_000, description="10% = 1000 bps")
    token_decimals: int = 6
    default_max_tokens: int = 256

    # --- rate limits -------------------------------------------------------------
    rate_limit_rpm: int = Field(default=600, description="requests per minute per API key")

    # --- node link & routing -----------------------------------------------------
    heartbeat_interval: float = 5.0
    job_first_token_timeout: float = 60.0
    max_failover_attempts: int = 3

    # --- verification & challenge windows (Celery) --------------------------------
    broker_url: str = f"sqla+sqlite:///{DATA_DIR}/broker.db"
    challenge_window_s: float = 24 * 3600.0
    verify_sample_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    verify_first_jobs: int = 20
    slash_multiplier: int = 10

    # --- chain ---------------------------------------------------------------------
    ledger_url: str = Field(
        default="inprocess",
        description="'inprocess' for an embedded LiteSVM, or a Solana JSON-RPC URL.",
    )


@lru_cache
def get_settings() -> MarketSettings:
    return MarketSettings()
