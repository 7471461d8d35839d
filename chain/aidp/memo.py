"""The ``aidp:`` memo formats, and finding a movement on chain by the memo it carries.

Memos (Memo v2, UTF-8) name the movements that are plain SPL transfers, so anyone
reading the chain — the explorer, a reconcile job, an auditor — can tell them apart:

    aidp:deposit:v1:<account>                buyer → deposit account
    aidp:pull:v1:<key>                       allowance pull, market as delegate
    aidp:fee:v1:<root>:<count>:<key>         deposit → treasury, market fee of a round
    aidp:mint:v1:<key>                       local chains: backing minted to the deposit
    aidp:anchor:v1:<root>:<count>            beside the program's ``anchor_root``

Stake, slashes, payout epochs and claims are instructions of the ``aidp_market`` program
and need no memo: the program's accounts say what they are.

``<key>`` is the caller's idempotency key (``chain_transfers.idempotency_key``), which
lets a reconcile find a payment on chain even when its signature was lost. Writers and
readers of these texts live here together so the two can never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from solders.pubkey import Pubkey

from chain.ledger.base import Ledger

MEMO_PREFIX = "aidp:"


@dataclass(frozen=True)
class AidpMemo:
    kind: str
    version: str
    fields: tuple[str, ...]


def parse_memo(text: str | None) -> AidpMemo | None:
    """``aidp:<kind>:<version>:<fields...>`` → AidpMemo; anything else → None."""
    if not text or not text.startswith(MEMO_PREFIX):
        return None
    parts = text.split(":")
    if len(parts) < 3:
        return None
    return AidpMemo(parts[1], parts[2], tuple(parts[3:]))


def _check_field(value: str) -> str:
    """A field must not contain the separator, or a reader would split it in two."""
    if ":" in value or not value:
        raise ValueError(f"memo field must be non-empty and contain no ':': {value!r}")
    return value


def _root_fields(root_hex: str, count: int) -> str:
    """``<root>:<count>``: the root re-encoded as lowercase hex (a non-hex one raises)."""
    return f"{bytes.fromhex(root_hex).hex()}:{int(count)}"


def deposit_memo(account: str) -> str:
    return f"aidp:deposit:v1:{_check_field(account)}"


def fee_memo(root_hex: str, count: int, key: str) -> str:
    return f"aidp:fee:v1:{_root_fields(root_hex, count)}:{_check_field(key)}"


def anchor_memo(root_hex: str, count: int) -> str:
    return f"aidp:anchor:v1:{_root_fields(root_hex, count)}"


def keyed_memo(kind: str, key: str) -> str:
    return f"aidp:{_check_field(kind)}:v1:{_check_field(key)}"


def memo_texts(field: str | None) -> list[str]:
    """The memos of getSignaturesForAddress's ``memo`` field (``[len] text`` joined by ``; ``).

    Each text is cut by its byte length, so a memo that itself contains ``; `` or ``[``
    is read whole."""
    out: list[str] = []
    data = (field or "").encode()
    pos = 0
    while pos < len(data):
        if data[pos : pos + 1] != b"[":
            return out + [data[pos:].decode(errors="replace")]
        close = data.find(b"] ", pos)
        try:
            length = int(data[pos + 1 : close])
        except ValueError:
            return out + [data[pos:].decode(errors="replace")]
        start = close + 2
        out.append(data[start : start + length].decode(errors="replace"))
        pos = start + length
        if data[pos : pos + 2] == b"; ":
            pos += 2
    return out


def memo_names(text: str, key: str) -> bool:
    """True when memo ``text`` carries ``key`` as a whole field (or is exactly ``key``).

    Whole fields, not substrings: key ``acct.1`` must not match the memo of ``acct.10``."""
    if text == key:
        return True
    parsed = parse_memo(text)
    return parsed is not None and key in parsed.fields


async def find_memo(
    ledger: Ledger, address: Pubkey, needle: str, *, limit: int = 1000
) -> list[str]:
    """Signatures of recent successful transactions touching ``address`` whose memo names
    ``needle`` (e.g. an idempotency key) as a whole field: how a reconcile finds a payment
    it lost track of."""
    return [
        s.signature
        for s in await ledger.signatures_for_address(address, limit=limit)
        if s.err is None and any(memo_names(t, needle) for t in memo_texts(s.memo))
    ]
