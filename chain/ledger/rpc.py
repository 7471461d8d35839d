"""``Ledger`` over Solana JSON-RPC through solana-py's async client.

Works against ``aidp-ledger serve``, a local test validator, devnet or mainnet. Reads use
``confirmed`` commitment; the expiry check in ``Ledger.status`` uses the ``finalized``
block height, so "expired" is only answered once the blockhash can no longer land.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx
from solana.exceptions import SolanaRpcException
from solana.rpc.async_api import AsyncClient
from solana.rpc.commitment import Confirmed, Finalized
from solana.rpc.core import RPCException
from solana.rpc.models import TxOpts
from solders.account import Account
from solders.hash import Hash
from solders.pubkey import Pubkey
from solders.rpc.responses import SendTransactionPreflightFailureMessage
from solders.signature import Signature

from chain.ledger.base import (
    Ledger,
    LedgerError,
    SignatureInfo,
    SignatureWindow,
    TransactionRejected,
    TxInfo,
    tx_info_from_json,
)


class RpcLedger(Ledger):
    def __init__(self, url: str, *, timeout: float = 30.0, local: bool | None = None):
        self.url = url
        self.client = AsyncClient(url, commitment=Confirmed, timeout=timeout)
        # airdrops and clock control: assume available on loopback endpoints
        self.local = (
            local
            if local is not None
            else any(h in url for h in ("127.0.0.1", "localhost", "[::1]"))
        )

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except RPCException as exc:
            raise LedgerError(f"{self.url}: {exc}") from None
        except SolanaRpcException as exc:
            raise LedgerError(f"{self.url}: {exc.__cause__ or exc}") from None

    async def latest_blockhash(self) -> tuple[Hash, int]:
        resp = await self._call(self.client.get_latest_blockhash(Confirmed))
        return resp.value.blockhash, resp.value.last_valid_block_height

    async def block_height(self) -> int:
        return (await self._call(self.client.get_block_height(Finalized))).value

    async def slot(self) -> int:
        return (await self._call(self.client.get_slot(Confirmed))).value

    async def get_account(self, pubkey: Pubkey) -> Account | None:
        return (await self._call(self.client.get_account_info(pubkey, Confirmed))).value

    async def minimum_balance_for_rent_exemption(self, size: int) -> int:
        return (await self._call(self.client.get_minimum_balance_for_rent_exemption(size))).value

    async def get_balance(self, pubkey: Pubkey) -> int:
        return (await self._call(self.client.get_balance(pubkey, Confirmed))).value

    async def send_raw(self, raw: bytes, *, preflight: bool = True) -> str:
        opts = TxOpts(skip_preflight=not preflight, preflight_commitment=Confirmed)
        try:
            resp = await self.client.send_raw_transaction(raw, opts)
        except RPCException as exc:
            msg = exc.args[0] if exc.args else None
            if isinstance(msg, SendTransactionPreflightFailureMessage):
                data = json.loads(msg.data.to_json())
                raise TransactionRejected(
                    msg.message, data.get("err"), data.get("logs") or []
                ) from None
            raise TransactionRejected(str(getattr(msg, "message", msg))) from None
        except SolanaRpcException as exc:
            raise LedgerError(f"{self.url}: {exc.__cause__ or exc}") from None
        return str(resp.value)

    async def signature_statuses(
        self, signatures: Sequence[str]
    ) -> list[tuple[int, Any, str] | None]:
        out: list[tuple[int, Any, str] | None] = []
        for i in range(0, len(signatures), 256):
            chunk = [Signature.from_string(s) for s in signatures[i : i + 256]]
            resp = await self._call(
                self.client.get_signature_statuses(chunk, search_transaction_history=True)
            )
            for st in resp.value:
                if st is None:
                    out.append(None)
                    continue
                d = json.loads(st.to_json())
                out.append((d["slot"], d.get("err"), d.get("confirmationStatus") or "processed"))
        return out

    async def get_transaction(self, signature: str) -> TxInfo | None:
        resp = await self._call(
            self.client.get_transaction(
                Signature.from_string(signature),
                encoding="base64",
                commitment=Confirmed,
                max_supported_transaction_version=0,
            )
        )
        if resp.value is None:
            return None
        d = json.loads(resp.value.to_json())
        return tx_info_from_json(signature, d)

    async def signature_page(self, address: Pubkey, window: SignatureWindow) -> list[SignatureInfo]:
        resp = await self._call(
            self.client.get_signatures_for_address(
                address,
                before=_signature(window.before),
                until=_signature(window.until),
                limit=window.limit,
                commitment=Confirmed,
            )
        )
        out = []
        for s in resp.value:
            d = json.loads(s.to_json())
            out.append(
                SignatureInfo(
                    d["signature"], d["slot"], d.get("err"), d.get("memo"), d.get("blockTime")
                )
            )
        return out

    async def request_airdrop(self, pubkey: Pubkey, lamports: int) -> str:
        resp = await self._call(self.client.request_airdrop(pubkey, lamports, Confirmed))
        return str(resp.value)

    async def advance_slots(self, slots: int) -> int:
        """aidp-ledger only (``aidp_advanceSlots``); other nodes answer method-not-found."""
        async with httpx.AsyncClient() as http:
            resp = await http.post(
                self.url,
                json={"jsonrpc": "2.0", "id": 1, "method": "aidp_advanceSlots", "params": [slots]},
            )
        body = resp.json()
        if "error" in body:
            raise LedgerError(f"{self.url}: {body['error'].get('message')}")
        return int(body["result"])

    async def close(self) -> None:
        await self.client.close()


def _signature(text: str | None) -> Signature | None:
    """A window bound as solana-py wants it (None: unbounded)."""
    return Signature.from_string(text) if text else None
