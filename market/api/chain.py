"""Public chain endpoints.

* ``GET /v1/receipts/{receipt_hash}/proof`` (no key): the receipt's Merkle inclusion
  proof against the root anchored on chain —
  ``{receipt_hash, anchor: {root, tx_signature, slot} | null, proof: [{sibling, side}]}``.
  Leaves are the anchor's receipt hashes sorted ascending, the order the anchoring task
  built the tree in; ``protocol.merkle.verify_inclusion`` (or the explorer's JS) checks it.
* ``GET /v1/chain`` (no key): where and how to pay — mint, deposit account, memo format —
  and the ``aidp_market`` program settlement runs through.
* ``POST /v1/chain/allowance`` (API key): ``{"wallet", "signed_at", "signature"}``
  registers the wallet whose ``approve`` to the market funds this account (read from
  chain by the worker). ``signature`` is the wallet's own (base58, ed25519) over
  ``ALLOWANCE_DOMAIN + allowance_message(market, account, wallet, signed_at)``
  (``protocol.keys``; ``aidp-market chain allowance --sign`` makes one): an API key alone
  cannot claim somebody else's approval.
* ``GET /v1/stake/{pubkey}`` (no key): an operator's stake in the program (the market
  cannot move it: the operator stakes, unbonds and withdraws with the program directly).
* ``GET /v1/chain/payouts/{pubkey}`` (no key): a node's unclaimed payout leaves with their
  proofs, so it can claim from the program without the market.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field
from solders.pubkey import Pubkey
from sqlalchemy.orm import Session

from chain import aidp
from chain.ledger.base import LedgerError
from chain.localnet.chain import ChainError
from market.api.schemas import RequestBody
from market.errors import BadRequest, NotFound, UpstreamFailed
from market.gateway.auth import Buyer, authenticate, market_state
from market.onchain import allowance
from market.onchain.proofs import payouts_view, proof_view
from market.onchain.runtime import ChainNotInitialized, ChainRuntime, load_identity, open_runtime

router = APIRouter()


@router.get("/v1/receipts/{receipt_hash}/proof")
async def receipt_proof(receipt_hash: str, request: Request) -> Any:
    async with market_state(request).db.async_sessions() as session:
        return await session.run_sync(proof_view, receipt_hash)


@router.get("/v1/chain")
async def chain_info(request: Request) -> Any:
    settings = market_state(request).settings
    try:
        cfg, market, _verifiers = load_identity(settings)
    except ChainNotInitialized:
        raise NotFound("Chain settlement is not initialized on this market.",
                       code="chain_not_initialized") from None
    return {
        "mint": cfg.mint, "decimals": cfg.decimals, "market": cfg.market,
        "deposit_account": cfg.deposit, "treasury": cfg.treasury,
        "program": cfg.program, "program_config": str(cfg.program_config),
        "verifier_quorum": settings.chain.verifier_quorum,
        "rpc_url": settings.chain.explorer_rpc_url,
        "deposit_memo": "aidp:deposit:v1:<account id>",
        "allowance_delegate": str(market.pubkey()),
    }


class AllowanceBody(RequestBody):
    wallet: str = Field(max_length=64)
    signed_at: int = Field(ge=0, le=2**40)
    signature: str = Field(max_length=128)


@router.post("/v1/chain/allowance")
async def register_allowance(body: AllowanceBody, request: Request,
                             buyer: Buyer = Depends(authenticate)) -> Any:
    market_id = market_state(request).settings.market_id

    def apply(session: Session) -> dict[str, Any]:
        row = allowance.register(session, buyer.account_id, body.wallet, market_id=market_id,
                                 signed_at=body.signed_at, signature=body.signature)
        return {"account_id": row.account_id, "wallet": row.wallet, "credited": row.credited,
                "active": row.active}

    async with market_state(request).db.async_sessions() as session:
        async with session.begin():
            return await session.run_sync(apply)


@contextlib.asynccontextmanager
async def _chain_runtime(request: Request) -> AsyncIterator[ChainRuntime]:
    """The chain runtime for a read of program state; chain trouble becomes a clear error."""
    try:
        async with open_runtime(market_state(request).settings) as rt:
            yield rt
    except ChainNotInitialized:
        raise NotFound("Chain settlement is not initialized on this market.",
                       code="chain_not_initialized") from None
    except (LedgerError, ChainError, OSError) as exc:
        raise UpstreamFailed(f"The chain cannot be reached right now: {exc}",
                             code="chain_unavailable") from None


def _pubkey(value: str) -> Pubkey:
    try:
        return Pubkey.from_string(value)
    except ValueError:
        raise BadRequest(f"{value!r} is not a base58 public key.", param="pubkey",
                             code="invalid_pubkey") from None


@router.get("/v1/stake/{pubkey}")
async def stake_view(pubkey: str, request: Request) -> Any:
    """A node operator's stake as the program holds it (its vault, bonded, unbonding,
    open cases); the operator moves it with ``aidp-node stake|unbond|withdraw``."""
    operator = _pubkey(pubkey)
    async with _chain_runtime(request) as rt:
        stake = rt.stake_of(operator)
        info = await aidp.read_stake(rt.ledger, rt.cfg, operator)
    body: dict[str, Any] = {"operator": pubkey, "stake_account": stake.address,
                            "vault": stake.vault, "registered": info is not None}
    if info is not None:
        body.update(dataclasses.asdict(info), bonded=info.bonded)
    return body


@router.get("/v1/chain/payouts/{pubkey}")
async def node_payouts(pubkey: str, request: Request) -> Any:
    """The node's unclaimed payout leaves with their Merkle proofs (``claim`` input)."""
    node = str(_pubkey(pubkey))
    async with market_state(request).db.async_sessions() as session:
        return await session.run_sync(payouts_view, node)
