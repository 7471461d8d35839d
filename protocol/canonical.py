"""Canonical JSON and hashing shared by market, node and explorer.

Both sides of every proof must produce byte-identical input to sha256, so the
encoding is fixed here once: sorted keys, no whitespace, UTF-8, no NaN.
The explorer's JavaScript mirrors exactly these rules.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """Encode ``value`` as canonical JSON bytes (sorted keys, compact, UTF-8)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def sha256_hex(data: bytes | str) -> str:
    """Hex sha256 of bytes, or of a str encoded as UTF-8."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def digest_json(value: Any) -> str:
    """Hex sha256 of the canonical JSON of ``value``."""
    return sha256_hex(canonical_json(value))


def token_ids_digest(token_ids: list[int]) -> str:
    """Digest of a token id sequence (receipts carry the hash, the ids ride beside)."""
    return digest_json(list(token_ids))
