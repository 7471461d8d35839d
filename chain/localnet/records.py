"""What the local chain answers with, in a JSON-RPC node's shapes: its errors
(``ChainError``, ``PreflightFailure``), a landed transaction (``TxRecord``) and the
``getTransaction`` and token-amount JSON built from it."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from solders.message import Message, MessageV0
from solders.transaction import VersionedTransaction

from chain import spl


class ChainError(Exception):
    """An error a JSON-RPC node would answer with (code, message, data)."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


class PreflightFailure(ChainError):
    def __init__(self, err: Any, logs: list[str], units: int | None = None):
        super().__init__(
            -32002,
            f"Transaction simulation failed: {describe_error(err)}",
            {
                "accounts": None,
                "err": err,
                "innerInstructions": None,
                "logs": logs,
                "replacementBlockhash": None,
                "returnData": None,
                "unitsConsumed": units or 0,
            },
        )
        self.err, self.logs = err, logs


def describe_error(err: Any) -> str:
    if err == "BlockhashNotFound":
        return "Blockhash not found"
    if err == "AlreadyProcessed":
        return "This transaction has already been processed"
    if isinstance(err, dict) and "InstructionError" in err:
        index, inner = err["InstructionError"]
        if isinstance(inner, dict) and "Custom" in inner:
            name = spl.TOKEN_ERRORS.get(inner["Custom"], "")
            detail = f"custom program error: {hex(inner['Custom'])}" + (
                f" ({name})" if name else ""
            )
        else:
            detail = inner if isinstance(inner, str) else json.dumps(inner)
        return f"Error processing Instruction {index}: {detail}"
    return json.dumps(err)


@dataclass
class TxRecord:
    """One landed transaction, in the shape getTransaction reports it."""

    seq: int
    signature: str
    slot: int
    block_time: int
    raw: bytes = field(repr=False)
    err: Any
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def transaction(self) -> VersionedTransaction:
        return VersionedTransaction.from_bytes(self.raw)

    @property
    def memos(self) -> list[str]:
        return spl.memos_of(self.transaction.message)


def writable_indices(message: Message | MessageV0) -> list[int]:
    h = message.header
    n = len(message.account_keys)
    signed, ro_signed, ro_unsigned = (
        h.num_required_signatures,
        h.num_readonly_signed_accounts,
        h.num_readonly_unsigned_accounts,
    )
    return [i for i in range(n) if i < signed - ro_signed or signed <= i < n - ro_unsigned]


def ui_amount(amount: int, decimals: int) -> dict[str, Any]:
    if decimals:
        whole, frac = divmod(amount, 10**decimals)
        text = f"{whole}.{frac:0{decimals}d}".rstrip("0").rstrip(".")
    else:
        text = str(amount)
    return {
        "amount": str(amount),
        "decimals": decimals,
        "uiAmount": amount / 10**decimals,
        "uiAmountString": text,
    }


def local_transaction_json(rec: Any, encoding: str = "base64") -> dict[str, Any]:
    """getTransaction's result for a ``TxRecord`` (base64 wire bytes)."""
    version: Any = "legacy" if rec.transaction.message.__class__.__name__ == "Message" else 0
    return {
        "slot": rec.slot,
        "blockTime": rec.block_time,
        "transaction": [base64.b64encode(rec.raw).decode(), "base64"],
        "meta": rec.meta,
        "version": version,
    }
