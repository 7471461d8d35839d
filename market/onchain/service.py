"""The settlement steps the Celery tasks (and ``aidp-market chain tick``) run.

Each step is idempotent and safe to run concurrently with itself: rows are claimed with
guarded updates and unique keys, so a second worker finds nothing left to do.

* :func:`funding_step` — deposit scan + allowance sync (every few seconds);
* :func:`settle_step` — resolve in-flight transfers, record claims nodes made themselves,
  sign verdicts, open cases and slash on chain, stake sync, allowance pulls, a payout
  epoch and its claims, closing fully claimed epochs (their rent back);
* :func:`anchor_step` — resolve the in-flight anchor, anchor new receipts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from chain.ledger.base import Ledger
from market.onchain import allowance, deposits, settle, stake, transfers, verdicts
from market.onchain.handlers import HANDLERS
from market.onchain.runtime import ChainRuntime, open_runtime
from market.settings import MarketSettings

T = TypeVar("T")


async def funding_step(rt: ChainRuntime, sessions: sessionmaker[Session]) -> dict[str, Any]:
    scan = await deposits.scan(rt, sessions)
    synced = await allowance.sync(rt, sessions)
    return {"deposits_credited": len(scan.credited), "deposits_unclaimed": len(scan.unclaimed),
            "allowances_synced": synced.synced, "allowance_changes": synced.changed}


async def settle_step(rt: ChainRuntime, sessions: sessionmaker[Session]) -> dict[str, Any]:
    out: dict[str, Any] = {"claimed_elsewhere": await settle.record_claims_made_elsewhere(
        rt, sessions)}
    with sessions() as session:
        in_flight = transfers.active_ids(session, settle.PAYOUT_KINDS)
    out["resolved"] = (await transfers.drive(rt, sessions, in_flight, HANDLERS)).as_dict()
    out["verdicts_signed"] = verdicts.sign_pending(rt, sessions)
    quorum = rt.settings.chain.verifier_quorum
    cases = await settle.plan_cases(rt, sessions, quorum)
    out["cases"] = (await transfers.drive(rt, sessions, cases, HANDLERS)).as_dict()
    slashes = await settle.plan_slashes(rt, sessions, quorum)
    out["slashes"] = (await transfers.drive(rt, sessions, slashes, HANDLERS)).as_dict()
    out["stakes_changed"] = len(await stake.sync(rt, sessions))
    pulls = await allowance.plan_pulls(rt, sessions)
    out["pulls"] = (await transfers.drive(rt, sessions, pulls, HANDLERS)).as_dict()
    with sessions.begin() as session:
        payouts = settle.plan_payout_round(session, rt, limit=rt.settings.chain.batch)
    out["payouts"] = (await transfers.drive(rt, sessions, payouts, HANDLERS)).as_dict()
    with sessions() as session:  # the epochs just posted planned their claims
        claims = settle.active_claims(session)
    out["claims"] = (await transfers.drive(rt, sessions, claims, HANDLERS)).as_dict()
    with sessions.begin() as session:  # fully claimed epochs give their rent back
        closes = settle.plan_closes(session, rt)
    out["closed"] = (await transfers.drive(rt, sessions, closes, HANDLERS)).as_dict()
    return out


async def anchor_step(rt: ChainRuntime, sessions: sessionmaker[Session]) -> dict[str, Any]:
    with sessions() as session:
        in_flight = transfers.active_ids(session, ["anchor"])
    if in_flight:  # finish the reserved batch first: anchors land in order
        return {"resolved": (await transfers.drive(rt, sessions, in_flight, HANDLERS)).as_dict()}
    with sessions.begin() as session:
        planned = settle.plan_anchor(session, rt, limit=rt.settings.chain.batch)
    if planned is None:
        return {"anchored": 0}
    return {"anchor": (await transfers.drive(rt, sessions, [planned], HANDLERS)).as_dict()}


STEPS: dict[str, Callable[[ChainRuntime, sessionmaker[Session]], Awaitable[dict[str, Any]]]] = {
    "funding": funding_step,
    "settle": settle_step,
    "anchor": anchor_step,
}


async def run_steps(settings: MarketSettings, sessions: sessionmaker[Session],
                    names: list[str], *, ledger: Ledger | None = None) -> dict[str, Any]:
    async with open_runtime(settings, ledger) as rt:
        return {name: await STEPS[name](rt, sessions) for name in names}


def run_sync(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]
