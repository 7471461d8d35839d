"""``aidp-market chain init|status|reconcile|tick|allowance|sign-verdicts|claim``: on-chain
settlement.

    aidp-market chain init        # keys, mint, deposit + treasury accounts, demo wallets
    aidp-market chain status      # addresses, balances, transfers by state
    aidp-market chain reconcile   # DB vs chain to the base unit; exit 1 on a difference
    aidp-market chain tick        # run funding, settle and anchor steps once (no Celery)
    aidp-market chain sign-verdicts --keypair verifier.json   # a verifier host's signatures

The ledger is AIDP_CHAIN__LEDGER_URL: "inprocess" (a chain under AIDP_DATA_DIR/ledger, one
process at a time) or a JSON-RPC URL such as `aidp-ledger serve`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

EPILOG = """examples:
  aidp-market chain init
  AIDP_CHAIN__LEDGER_URL=http://127.0.0.1:8899 aidp-market chain reconcile
  aidp-market chain allowance acct_0123 --keypair wallet.json   # fund an account from an approve()
  aidp-market chain allowance acct_0123 --keypair wallet.json --sign --market https://market.example
                                         # the signed body a buyer POSTs to /v1/chain/allowance"""


def _sessions():  # type: ignore[no-untyped-def]
    from market.db import sync_session_factory
    from market.migrate import upgrade
    from market.settings import get_settings

    url = get_settings().db.url
    upgrade(url)
    return sync_session_factory(url, null_pool=True)


def _init(args: argparse.Namespace) -> int:
    from market.onchain.bootstrap import init
    from market.settings import get_settings

    settings = get_settings()
    result = asyncio.run(init(settings, _sessions(), demo_wallets=args.demo_wallets))
    cfg = result.cfg
    print(f"chain ready on {settings.chain.ledger_url}")
    rows = [("mint", f"{cfg.mint} ({cfg.decimals} decimals)"), ("market", cfg.market),
            ("program", cfg.program), ("deposit", cfg.deposit), ("treasury", cfg.treasury)]
    for label, value in rows + [("verifier", v) for v in result.verifiers]:
        print(f"  {label:<9} {value}")
    for pubkey, path in result.demo_wallets:
        print(f"  demo      {pubkey} ({path})")
    print("created:" if result.created else "nothing to do: everything was in place")
    for line in result.created:
        print(f"  {line}")
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    from market.money.journal import audit
    from market.onchain.reconcile import reconcile, render
    from market.onchain.runtime import open_runtime
    from market.settings import get_settings

    sessions = _sessions()

    async def run() -> list[Any]:
        async with open_runtime(get_settings()) as rt:
            return await reconcile(rt, sessions)

    lines = asyncio.run(run())
    print(render(lines))
    with sessions() as session:
        journal = audit(session)
    print()
    print(render_audit(journal))
    return 0 if all(line.ok for line in lines + journal) else 1


def render_audit(lines: list[Any]) -> str:
    head = ("check", "subject", "database", "journal", "difference", "status")
    rows = [head] + [(ln.item, ln.subject, str(ln.db), str(ln.journal), f"{ln.diff:+d}",
                      "ok" if ln.ok else "MISMATCH") for ln in lines]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
           for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    bad = sum(not ln.ok for ln in lines)
    out.append(f"{len(lines)} journal checks, {bad} mismatch{'es' if bad != 1 else ''}")
    return "\n".join(out)


def _status(args: argparse.Namespace) -> int:
    from sqlalchemy import func, select

    from market.models import ChainTransfer
    from market.onchain.runtime import open_runtime
    from market.onchain.settle import unpaid_settled
    from market.settings import get_settings

    sessions = _sessions()

    async def run() -> dict[str, Any]:
        async with open_runtime(get_settings()) as rt:
            cfg = rt.cfg
            with sessions() as session:
                states = session.execute(
                    select(ChainTransfer.kind, ChainTransfer.state, func.count(),
                           func.coalesce(func.sum(ChainTransfer.amount), 0))
                    .group_by(ChainTransfer.kind, ChainTransfer.state)
                ).all()
                unpaid = unpaid_settled(session)
            return {
                "ledger": rt.settings.chain.ledger_url,
                "mint": cfg.mint,
                "market": {"address": cfg.market,
                           "lamports": await rt.ledger.get_balance(cfg.market_pk)},
                "program": cfg.program,
                "verifiers_held": [str(v.pubkey()) for v in rt.verifiers],
                "deposit": {"address": cfg.deposit,
                            "balance": await rt.ledger.token_balance(cfg.deposit_pk)},
                "treasury": {"address": cfg.treasury,
                             "balance": await rt.ledger.token_balance(cfg.treasury_pk)},
                "transfers": [{"kind": k, "state": s, "count": n, "amount": int(a)}
                              for k, s, n, a in states],
                "unpaid_settled_receipts": {"count": unpaid[0], "node_earnings": unpaid[1]},
            }

    print(json.dumps(asyncio.run(run()), indent=2))
    return 0


def _tick(args: argparse.Namespace) -> int:
    from market.onchain.service import run_steps
    from market.settings import get_settings

    steps = args.steps or ["funding", "settle", "anchor"]
    unknown = sorted(set(steps) - {"funding", "settle", "anchor"})
    if unknown:
        print(f"error: unknown step(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    print(json.dumps(asyncio.run(run_steps(get_settings(), _sessions(), steps)), indent=2))
    return 0


def _allowance(args: argparse.Namespace) -> int:
    import time

    from market.onchain import allowance
    from market.settings import get_settings
    from protocol.keys import ALLOWANCE_DOMAIN, allowance_message, load_keypair, sign

    wallet = load_keypair(args.keypair)
    market_id = _market_id(args.market) if args.market else get_settings().market_id
    signed_at = int(time.time())
    message = allowance_message(market_id, args.account, str(wallet.pubkey()), signed_at)
    body = {"wallet": str(wallet.pubkey()), "signed_at": signed_at,
            "signature": sign(wallet, ALLOWANCE_DOMAIN, message)}
    if args.sign:
        print(json.dumps(body))
        return 0
    with _sessions().begin() as session:
        row = allowance.register(session, args.account, body["wallet"], market_id=market_id,
                                 signed_at=signed_at, signature=body["signature"])
        print(f"{row.account_id} is funded by the allowance of {row.wallet} "
              "(read from chain on the next funding step)")
    return 0


def _market_id(url: str) -> str:
    from urllib.parse import urlsplit

    from protocol.keys import canonical_host

    return canonical_host(urlsplit(url if "//" in url else f"//{url}").netloc)


def _stake_demo(args: argparse.Namespace) -> int:
    from market.onchain.bootstrap import stake_from_demo_wallet
    from market.settings import get_settings
    from protocol.keys import load_keypair

    node = load_keypair(args.node_keypair)
    staked = asyncio.run(stake_from_demo_wallet(get_settings(), node, args.amount,
                                                wallet=args.wallet))
    print(f"node {node.pubkey()} has {staked} base units staked")
    return 0


def _sign_verdicts(args: argparse.Namespace) -> int:
    from chain.aidp import ChainConfig
    from market.onchain.runtime import config_path
    from market.onchain.verdicts import sign_with
    from market.settings import get_settings
    from protocol.keys import load_keypair

    settings = get_settings()
    cfg = ChainConfig.load(args.config or config_path(settings))
    key = load_keypair(args.keypair)
    sessions = _sessions()
    confirm = None
    if args.reexecute:
        from market.verify.service import reproduces_fraud

        def confirm(receipt_id: str) -> bool:
            return reproduces_fraud(sessions, receipt_id, settings)

    signed = sign_with(cfg, settings.chain.max_slash_per_receipt, key, sessions, confirm)
    print(f"verifier {key.pubkey()} signed {signed} verdict{'s' if signed != 1 else ''}")
    return 0


def _claim(args: argparse.Namespace) -> int:
    from market.onchain.deposits import claim

    with _sessions().begin() as session:
        done = claim(session, args.signature, args.account)
    print("credited" if done else "already credited")
    return 0


def _guard(fn):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace) -> int:
        from chain.ledger.base import LedgerError
        from chain.localnet.chain import ChainError
        from market.errors import APIError
        from market.onchain.runtime import ChainNotInitialized

        try:
            return int(fn(args) or 0)
        except ChainNotInitialized as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except ChainError as exc:  # e.g. the in-process chain is held by another process
            print(f"error: {exc.message}", file=sys.stderr)
            return 2
        except LedgerError as exc:  # the chain could not be reached or refused a step
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except (APIError, LookupError) as exc:
            print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
            return 2

    return run


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    chain = subparsers.add_parser(
        "chain", help="on-chain settlement: init, status, reconcile, tick",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = chain.add_subparsers(dest="chain_command", metavar="SUBCOMMAND")
    chain.set_defaults(func=lambda _a: chain.print_help() or 2)

    p = sub.add_parser("init", help="create keys, mint, deposit and treasury accounts (idempotent)")
    p.add_argument("--demo-wallets", type=int, default=None,
                   help="local chains: demo wallets to fund (default AIDP_CHAIN__DEMO_WALLETS)")
    p.set_defaults(func=_guard(_init))

    p = sub.add_parser("status", help="addresses, balances and transfers by state (JSON)")
    p.set_defaults(func=_guard(_status))

    p = sub.add_parser("reconcile", help="compare DB and chain balances; exit 1 on any difference")
    p.set_defaults(func=_guard(_reconcile))

    p = sub.add_parser("tick", help="run the settlement steps once, without Celery")
    p.add_argument("steps", nargs="*", metavar="STEP",
                   help="funding, settle and/or anchor (default: all three, in that order)")
    p.set_defaults(func=_guard(_tick))

    p = sub.add_parser("allowance", help="fund an account from a wallet's approve() to the market",
                       description="Sign, with the wallet's own keypair, that its approval funds "
                       "ACCOUNT, and register it (or, with --sign, print the signed body for "
                       "POST /v1/chain/allowance).")
    p.add_argument("account", help="the market account id to fund (acct_…)")
    p.add_argument("--keypair", required=True,
                   help="the wallet's keypair file (solana-keygen format): it signs, it is "
                   "not sent")
    p.add_argument("--sign", action="store_true",
                   help="only print the signed registration body (JSON), register nothing")
    p.add_argument("--market", help="the market's public URL (default: AIDP_PUBLIC_URL)")
    p.set_defaults(func=_guard(_allowance))

    p = sub.add_parser("stake-demo", help="local chains: stake a node from a demo wallet")
    p.add_argument("node_keypair", help="the node's keypair file (it signs the deposit)")
    p.add_argument("--amount", type=int, required=True, help="AIDP base units to have staked")
    p.add_argument("--wallet", type=int, default=1, help="demo wallet number (default 1)")
    p.set_defaults(func=_guard(_stake_demo))

    p = sub.add_parser(
        "sign-verdicts", help="sign slash verdicts with one verifier key (no market key needed)",
        description="Sign, with a verifier key of the program's verifier set, the verdict of "
        "every receipt the verification worker judged fraudulent and this key has not signed "
        "yet; the settle step slashes once a quorum signed. Needs the database and the "
        "public chain config.json only, so a verifier key can live on its own host.")
    p.add_argument("--keypair", required=True, help="the verifier's keypair file")
    p.add_argument("--config", default=None,
                   help="the market's chain config.json (default: AIDP_DATA_DIR/chain/config.json)")
    p.add_argument("--reexecute", action="store_true",
                   help="re-execute each receipt on this host's verifier engine "
                   "(AIDP_VERIFY__ENGINE) and sign only the frauds it reproduces")
    p.set_defaults(func=_guard(_sign_verdicts))

    p = sub.add_parser("claim", help="credit an unclaimed deposit to an account")
    p.add_argument("signature", help="transaction signature of the deposit (chain_deposits)")
    p.add_argument("account", help="the market account id to credit")
    p.set_defaults(func=_guard(_claim))
