"""A ``Ledger`` over a ``LocalChain`` in this process: the embedded default and the tests'
chain, with no network and no threads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from solders.account import Account
from solders.hash import Hash
from solders.pubkey import Pubkey

from chain import spl
from chain.ledger.base import (
    Ledger,
    SignatureInfo,
    SignatureWindow,
    TransactionRejected,
    TxInfo,
    tx_info_from_json,
)
from chain.localnet.chain import LocalChain
from chain.localnet.records import PreflightFailure, local_transaction_json


class InProcessLedger(Ledger):
    """A ``Ledger`` over a ``LocalChain`` in this process (no network, no threads)."""

    local = True

    def __init__(self, chain: LocalChain):
        self.chain = chain

    async def latest_blockhash(self) -> tuple[Hash, int]:
        return self.chain.latest_blockhash()

    async def block_height(self) -> int:
        return self.chain.block_height()

    async def slot(self) -> int:
        return self.chain.slot()

    async def get_account(self, pubkey: Pubkey) -> Account | None:
        return self.chain.get_account(pubkey)

    async def minimum_balance_for_rent_exemption(self, size: int) -> int:
        return self.chain.rent_exempt(size)

    async def send_raw(self, raw: bytes, *, preflight: bool = True) -> str:
        try:
            return str(self.chain.send(raw, preflight=preflight))
        except PreflightFailure as exc:
            raise TransactionRejected(exc.message, exc.err, exc.logs) from None

    async def signature_statuses(
        self, signatures: Sequence[str]
    ) -> list[tuple[int, Any, str] | None]:
        out: list[tuple[int, Any, str] | None] = []
        for s in signatures:
            st = self.chain.signature_status(s)
            out.append((st[0], st[1], "finalized") if st else None)
        return out

    async def get_transaction(self, signature: str) -> TxInfo | None:
        rec = self.chain.transaction(signature)
        if rec is None:
            return None
        return tx_info_from_json(signature, local_transaction_json(rec))

    async def signature_page(self, address: Pubkey, window: SignatureWindow) -> list[SignatureInfo]:
        return [
            SignatureInfo(r.signature, r.slot, r.err, spl.format_memo_field(r.memos), r.block_time)
            for r in self.chain.signatures_for_address(
                address, before=window.before, until=window.until, limit=window.limit
            )
        ]

    async def request_airdrop(self, pubkey: Pubkey, lamports: int) -> str:
        return str(self.chain.airdrop(pubkey, lamports))

    async def advance_slots(self, slots: int) -> int:
        return self.chain.advance(slots)

    async def close(self) -> None:
        self.chain.close()
