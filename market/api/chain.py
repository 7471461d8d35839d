"""Public chain endpoints.

* ``GET /v1/receipts/{receipt_hash}/proof`` (no key): the receipt's Merkle inclusion
  proof against the root anchored on chain —
  ``{receipt_hash, anchor: {root, tx_signature, slot} | null, proof: [{sibling, side}]}``.
  Leaves are the anchor's receipt hashes sorted ascending, the order the anchoring task
  built the tree in; ``protocol.merkle.verify_inclusion`` (or the explorer's JS) checks it.
* ``GET /v1/chain`` (no key): where and how to pay — mint, deposit account, memo format.
* ``POST /v1/chain/allowance`` (API key): ``{"wallet", "signed_at", "signature"}``
  registers the wallet whose ``approve`` to the market funds this account (read from
  chain by the worker). ``signature`` is the wallet's own (base58, ed25519) over
  ``ALLOWANCE_DOMAIN + allowance_message(market, account, wallet, signed_at)``
  (``protocol.keys``; ``aidp-market chain allowance --sign`` makes one): an API key alone
  cannot claim somebody else's approval.
* ``POST /v1/stake/unbond``, ``POST /v1/stake/withdraw``, ``POST /v1/stake/withdraw/submit``
  (no key: signed by the node operator's keypair): unbonding and co-signed withdrawal of
  node stake, see ``market.onchain.unbonding``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field
from sqlalchemy.orm import Session

from chain.ledger.base import LedgerError
from chain.localnet.chain import ChainError
from market.api.schemas import RequestBody
from market.errors import NotFound, UpstreamFailed
from market.gateway.auth import Buyer, authenticate, market_state
from market.onchain import allowance, unbonding
from market.onchain.proofs import proof_view
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
        cfg, market, arbiter = load_identity(settings)
    except ChainNotInitialized:
        raise NotFound("Chain settlement is not initialized on this market.",
                       code="chain_not_initialized") from None
    return {
        "mint": cfg.mint, "decimals": cfg.decimals, "market": cfg.market,
        "deposit_account": cfg.deposit, "treasury": cfg.treasury,
        "arbiter": str(arbiter.pubkey()), "rpc_url": settings.chain.explorer_rpc_url,
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


class UnbondBody(RequestBody):
    pubkey: str
    amount: int
    requested_at: int
    signature: str


class WithdrawBody(RequestBody):
    pubkey: str
    issued_at: int
    signature: str


class WithdrawSubmitBody(RequestBody):
    pubkey: str
    request_id: int
    blockhash: str
    tx_signature: str


@contextlib.asynccontextmanager
async def _stake_runtime(request: Request) -> AsyncIterator[tuple[ChainRuntime, Any]]:
    """The chain runtime and the sync sessionmaker for a stake call; chain trouble becomes
    a clear error. These calls are rare (an operator taking stake back) and do short sync
    DB work on the market's sync engine, like the settlement worker does."""
    state = market_state(request)
    try:
        async with open_runtime(state.settings) as rt:
            yield rt, state.db.sync_sessions
    except ChainNotInitialized:
        raise NotFound("Chain settlement is not initialized on this market.",
                       code="chain_not_initialized") from None
    except (LedgerError, ChainError, OSError) as exc:
        raise UpstreamFailed(f"The chain cannot be reached right now: {exc}",
                             code="chain_unavailable") from None


async def _stake_call(request: Request, action: Callable[..., Awaitable[Any]],
                      body: RequestBody) -> Any:
    """Run one ``market.onchain.unbonding`` step with the body's declared fields as its
    keyword arguments: each stake body declares exactly the signed parameters of its step
    (never ``now``, which stays the market's clock)."""
    fields = {name: getattr(body, name) for name in type(body).model_fields}
    async with _stake_runtime(request) as (rt, sessions):
        return await action(rt, sessions, **fields)


@router.post("/v1/stake/unbond")
async def stake_unbond(body: UnbondBody, request: Request) -> Any:
    return await _stake_call(request, unbonding.request_unbond, body)


@router.post("/v1/stake/withdraw")
async def stake_withdraw(body: WithdrawBody, request: Request) -> Any:
    return await _stake_call(request, unbonding.prepare_withdraw, body)


@router.post("/v1/stake/withdraw/submit")
async def stake_withdraw_submit(body: WithdrawSubmitBody, request: Request) -> Any:
    return await _stake_call(request, unbonding.submit_withdraw, body)
