"""The stake calls of ``aidp-node unbond`` / ``withdraw``: signed requests to the market.

Kept apart from the command line so the same calls serve a test's in-process client and
the CLI's own ``httpx`` one.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx
from solders.pubkey import Pubkey

from chain.aidp import ChainConfig, stake_for, withdraw_message
from protocol.canonical import canonical_json
from protocol.keys import UNBOND_DOMAIN, WITHDRAW_DOMAIN, sign

# what a stake command reports as a plain error rather than a traceback
ERRORS: tuple[type[Exception], ...] = (RuntimeError, httpx.HTTPError, ValueError, KeyError)
TIMEOUT_S = 120.0  # a withdrawal waits for the chain to confirm it


def _post(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST ``body``; the market's error envelope becomes a RuntimeError naming its code."""
    resp = client.post(url, json=body)
    data = resp.json()
    if resp.status_code != 200:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        raise RuntimeError(f"{resp.status_code} {err.get('code')}: {err.get('message')}")
    return dict(data)


def stake_unbond(client: Any, market: str, keypair: Any, amount: int) -> dict[str, Any]:
    """Ask the market to start unbonding ``amount`` base units (signed, UNBOND_DOMAIN)."""
    pubkey, now = str(keypair.pubkey()), int(time.time())
    body = {"pubkey": pubkey, "amount": amount, "requested_at": now}
    return _post(client, f"{market.rstrip('/')}/v1/stake/unbond",
                 {**body, "signature": sign(keypair, UNBOND_DOMAIN, canonical_json(body))})


def stake_withdraw(client: Any, market: str, keypair: Any) -> dict[str, Any]:
    """Withdraw unbonded stake: get the transaction message from the market, check it is
    exactly stake → this operator's AIDP account (rebuilt here from the market's public
    chain config), sign it, hand the signature back for the market to co-sign and send.

    The check matters: the operator's signature plus the market's is 2 of 3, so the node
    never signs a message it did not rebuild itself."""
    base, pubkey, now = market.rstrip("/"), str(keypair.pubkey()), int(time.time())
    cfg, stake = _stake_account(client.get(f"{base}/v1/chain").json(), keypair)
    body = {"pubkey": pubkey, "issued_at": now}
    offer = _post(client, f"{base}/v1/stake/withdraw",
                  {**body, "signature": sign(keypair, WITHDRAW_DOMAIN, canonical_json(body))})
    expected = withdraw_message(cfg, stake, int(offer["amount"]),
                                f"unbond-{int(offer['request_id'])}", offer["blockhash"])
    raw = base64.b64decode(offer["message"])
    if raw != bytes(expected):
        raise RuntimeError("the market's withdrawal message is not the expected transfer of "
                           "stake to this operator; refusing to sign it")
    return _post(client, f"{base}/v1/stake/withdraw/submit", {
        "pubkey": pubkey, "request_id": offer["request_id"], "blockhash": offer["blockhash"],
        "tx_signature": str(keypair.sign_message(raw))})


def _stake_account(info: dict[str, Any], keypair: Any) -> tuple[ChainConfig, Any]:
    """The chain config and this operator's stake account, from the market's public
    ``/v1/chain`` alone: what the withdrawal message is rebuilt from."""
    cfg = ChainConfig(mint=info["mint"], decimals=info["decimals"], market=info["market"],
                      deposit=info["deposit_account"], treasury=info["treasury"])
    return cfg, stake_for(cfg, keypair.pubkey(), Pubkey.from_string(info["arbiter"]))


def unbond(market: str, keypair: Any, amount: int) -> dict[str, Any]:
    """``stake_unbond`` over a fresh client: what ``aidp-node unbond`` runs."""
    with httpx.Client(timeout=TIMEOUT_S) as client:
        return stake_unbond(client, market, keypair, amount)


def withdraw(market: str, keypair: Any) -> dict[str, Any]:
    """``stake_withdraw`` over a fresh client: what ``aidp-node withdraw`` runs."""
    with httpx.Client(timeout=TIMEOUT_S) as client:
        return stake_withdraw(client, market, keypair)
