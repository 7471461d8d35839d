"""Which receipts get re-executed: the sampling policy, and reputation updates.

* Every receipt of a node's first ``verify_first_jobs`` jobs is verified.
* After that a share ``verify_sample_rate`` (5% by default) is, rising linearly to
  100% as reputation falls from ``verify_low_reputation`` to 0.
* A buyer challenge always is (see api.py).

The draw is an HMAC of the receipt hash under a market-side key: stable (a retried
task decides the same way) and unpredictable to nodes, who never see the key.

Reputation (0..1, read by the router) goes up slowly on verified-honest work and
down hard on fraud.
"""

from __future__ import annotations

import hashlib
import hmac

from sqlalchemy.orm import Session

from market import secret_store
from market.settings import MarketSettings


def sampling_key(session: Session, settings: MarketSettings) -> bytes:
    """The HMAC key of the draw: ``verify_sampling_key`` when the operator set one, else
    the random key this market generated at first start (``market.secret_store``), which
    every process of the market reads from the database. Never derived from the admin
    token: knowing one secret must not reveal which receipts go unchecked."""
    explicit = settings.verify.sampling_key
    if explicit:
        return explicit.encode()
    return bytes.fromhex(secret_store.get_or_create(session, secret_store.SAMPLING_KEY))


def sample_rate(settings: MarketSettings, *, prior_jobs: int, reputation: float) -> float:
    """Probability that a node's next receipt is re-executed."""
    if prior_jobs < settings.verify.first_jobs:
        return 1.0
    base = settings.verify.sample_rate
    low = settings.verify.low_reputation
    if low > 0 and reputation < low:
        shortfall = min(1.0, max(0.0, (low - reputation) / low))
        return min(1.0, base + (1.0 - base) * shortfall)
    return base


def draw(key: bytes, receipt_hash: str) -> float:
    """A uniform number in [0, 1) from the receipt hash, keyed by the market."""
    mac = hmac.new(key, receipt_hash.encode(), hashlib.sha256).digest()
    return int.from_bytes(mac[:8], "big") / 2**64


def should_verify(
    key: bytes, settings: MarketSettings, *, receipt_hash: str, prior_jobs: int,
    reputation: float,
) -> tuple[bool, float]:
    """(sampled?, rate used)."""
    rate = sample_rate(settings, prior_jobs=prior_jobs, reputation=reputation)
    return draw(key, receipt_hash) < rate, rate


def reputation_after_honest(reputation: float, settings: MarketSettings) -> float:
    gain = settings.verify.reputation_gain
    return min(1.0, reputation + gain * (1.0 - reputation))


def reputation_after_fraud(reputation: float, settings: MarketSettings) -> float:
    keep = settings.verify.reputation_fraud_keep
    return max(0.0, reputation * keep)
