"""``aidp-node stake | unbond | withdraw | claim``: the operator and the ``aidp_market``
program, with no market key in between.

The market publishes where its program lives (``GET /v1/chain``: program id, mint, RPC
URL); every transaction here is built locally from those addresses and signed by the
operator's keypair alone, then sent to the chain's RPC. The market cannot move stake, so
it is not asked to: it is only read, for its public config and (``claim``) the node's
payout leaves with their Merkle proofs, which the program checks against the root it
holds before paying.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from chain import aidp
from chain.aidp import ChainConfig
from chain.ledger.base import Ledger, LedgerError
from chain.ledger.open import open_ledger
from protocol.merkle import ProofStep

# what a stake command reports as a plain error rather than a traceback
ERRORS: tuple[type[Exception], ...] = (RuntimeError, httpx.HTTPError, ValueError, KeyError,
                                       LedgerError)
TIMEOUT_S = 30.0
T = TypeVar("T")


def _get(client: httpx.Client, url: str) -> dict[str, Any]:
    """GET ``url``; the market's error envelope becomes a RuntimeError naming its code."""
    resp = client.get(url)
    data = resp.json()
    if resp.status_code != 200:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        raise RuntimeError(f"{resp.status_code} {err.get('code')}: {err.get('message')}")
    return dict(data)


def chain_config(info: dict[str, Any]) -> ChainConfig:
    """The addresses stake and claims are built from, out of the market's ``/v1/chain``."""
    if not info.get("program"):
        raise RuntimeError("the market settles without the aidp_market program")
    return ChainConfig(mint=info["mint"], decimals=info["decimals"], market=info["market"],
                       deposit=info["deposit_account"], treasury=info["treasury"],
                       program=info["program"])


@dataclasses.dataclass(frozen=True)
class Operator:
    """One operator's view: its key, the market's chain config and where to send."""

    keypair: Keypair
    cfg: ChainConfig
    rpc_url: str
    market_url: str

    @property
    def pubkey(self) -> Pubkey:
        return self.keypair.pubkey()


def _client(client: httpx.Client | None) -> httpx.Client:
    return client if client is not None else httpx.Client(timeout=TIMEOUT_S)


def operator(market: str, keypair: Keypair, rpc_url: str | None = None,
             client: httpx.Client | None = None) -> Operator:
    """The operator's view of ``market``'s program (``client``: the HTTP client to read
    the market with, a fresh one by default)."""
    base = market.rstrip("/")
    http = _client(client)
    try:
        info = _get(http, f"{base}/v1/chain")
    finally:
        if client is None:
            http.close()
    rpc = rpc_url or info.get("rpc_url")
    if not rpc:
        raise RuntimeError("the market names no RPC URL: pass --rpc")
    return Operator(keypair, chain_config(info), rpc, base)


def _on_chain(op: Operator, action: Callable[[Ledger], Awaitable[T]]) -> T:
    import asyncio

    async def run() -> T:
        ledger = open_ledger(op.rpc_url)
        try:
            return await action(ledger)
        finally:
            await ledger.close()

    return asyncio.run(run())


def status(op: Operator) -> dict[str, Any]:
    """The operator's stake as the program holds it."""
    stake = aidp.stake_for(op.cfg, op.pubkey)

    async def read(ledger: Ledger) -> dict[str, Any]:
        info = await aidp.read_stake(ledger, op.cfg, op.pubkey)
        body: dict[str, Any] = {"operator": str(op.pubkey), "stake_account": stake.address,
                                "vault": stake.vault, "registered": info is not None}
        if info is not None:
            body.update(dataclasses.asdict(info), bonded=info.bonded)
        return body

    return _on_chain(op, read)


def stake(op: Operator, amount: int) -> dict[str, Any]:
    """Bond ``amount`` base units (registering the stake first when it has none)."""
    if amount <= 0:
        raise ValueError("--amount must be a positive number of base units")

    async def send(ledger: Ledger) -> str:
        registered = await aidp.read_stake(ledger, op.cfg, op.pubkey) is not None
        ixs = aidp.stake_instructions(op.cfg, op.pubkey, amount, register=not registered)
        return (await ledger.execute(ixs, op.keypair)).signature

    return {"signature": _on_chain(op, send), **status(op)}


def unbond(op: Operator, amount: int) -> dict[str, Any]:
    """Start the unbonding period for ``amount`` base units."""
    if amount <= 0:
        raise ValueError("--amount must be a positive number of base units")

    async def send(ledger: Ledger) -> str:
        ixs = aidp.request_unbond_instructions(op.cfg, op.pubkey, amount)
        return (await ledger.execute(ixs, op.keypair)).signature

    return {"signature": _on_chain(op, send), **status(op)}


def withdraw(op: Operator) -> dict[str, Any]:
    """Take the unbonded stake back, once its period has passed and no case holds it."""
    async def send(ledger: Ledger) -> tuple[str, int]:
        before = await ledger.token_balance(op.cfg.ata(op.pubkey))
        sig = (await ledger.execute(aidp.withdraw_instructions(op.cfg, op.pubkey),
                                    op.keypair)).signature
        return sig, await ledger.token_balance(op.cfg.ata(op.pubkey)) - before

    signature, amount = _on_chain(op, send)
    return {"signature": signature, "withdrawn": amount, **status(op)}


def claim(op: Operator, client: httpx.Client | None = None) -> dict[str, Any]:
    """Claim every unclaimed payout leaf of this node from the program (the operator pays
    the fees); a leaf someone already claimed is skipped."""
    http = _client(client)
    try:
        leaves = _get(http, f"{op.market_url}/v1/chain/payouts/{op.pubkey}")["unclaimed"]
    finally:
        if client is None:
            http.close()

    async def send(ledger: Ledger) -> list[dict[str, Any]]:
        done = []
        for item in leaves:
            posted = await aidp.read_epoch(ledger, op.cfg, int(item["epoch"]))
            if posted is None or posted.is_claimed(int(item["index"])):
                continue
            leaf = aidp.PayoutLeaf(int(item["index"]), str(op.pubkey), int(item["amount"]))
            proof = [ProofStep(p["sibling"], p["side"]) for p in item["proof"]]
            ixs = aidp.claim_instructions(op.cfg, int(item["epoch"]), leaf, proof, op.pubkey)
            signature = (await ledger.execute(ixs, op.keypair)).signature
            done.append({"epoch": item["epoch"], "index": item["index"],
                         "amount": item["amount"], "signature": signature})
        return done

    claimed = _on_chain(op, send)
    return {"claimed": claimed, "amount": sum(int(c["amount"]) for c in claimed)}
