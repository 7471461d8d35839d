"""``aidp-market accounts|keys|credit|usage``: buyer administration, straight on the
database (sync sessions; no server needed)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from market.db import Database
from market.errors import APIError
from market.migrate import upgrade
from market.models import new_id
from market.money import accounts, billing
from market.settings import get_settings


def _with_session(fn: Callable[[Session, argparse.Namespace], Any]) -> Callable[..., int]:
    def run(args: argparse.Namespace) -> int:
        url = get_settings().db.url
        upgrade(url)
        db = Database(url)
        try:
            with db.session() as session:
                result = fn(session, args)
        except APIError as exc:
            print(f"error: {exc.message}")
            return 1
        finally:
            db.sync_engine.dispose()
        if result is not None:
            print(json.dumps(result, indent=2, default=str))
        return 0

    return run


def _account_create(s: Session, a: argparse.Namespace) -> Any:
    return accounts.account_dict(accounts.create_account(s, a.name, a.wallet))


def _account_list(s: Session, a: argparse.Namespace) -> Any:
    return [accounts.account_dict(x) for x in accounts.list_accounts(s)]


def _account_show(s: Session, a: argparse.Namespace) -> Any:
    return accounts.account_dict(accounts.get_account(s, a.account))


def _key_create(s: Session, a: argparse.Namespace) -> Any:
    key, plaintext = accounts.issue_key(s, a.account, a.name)
    out = accounts.key_dict(key, plaintext)
    out["note"] = "store this key now: it is shown once and only its hash is kept"
    return out


def _key_list(s: Session, a: argparse.Namespace) -> Any:
    return [accounts.key_dict(k) for k in accounts.list_keys(s, a.account)]


def _key_revoke(s: Session, a: argparse.Namespace) -> Any:
    return accounts.key_dict(accounts.revoke_key(s, a.key_id))


def _credit(s: Session, a: argparse.Namespace) -> Any:
    applied = billing.credit_account(s, a.account, a.amount, a.reference or new_id("credit"))
    out = accounts.account_dict(accounts.get_account(s, a.account))
    out["credit_applied"] = applied
    return out


def _usage(s: Session, a: argparse.Namespace) -> Any:
    return accounts.usage(s, a.account, a.limit)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    acc = subparsers.add_parser("accounts", help="create, list and show buyer accounts")
    acc_sub = acc.add_subparsers(dest="accounts_command", metavar="ACTION", required=True)
    p = acc_sub.add_parser("create", help="create an account")
    p.add_argument("name")
    p.add_argument("--wallet", help="the buyer's Solana wallet (for on-chain deposits)")
    p.set_defaults(func=_with_session(_account_create))
    p = acc_sub.add_parser("list", help="list accounts")
    p.set_defaults(func=_with_session(_account_list))
    p = acc_sub.add_parser("show", help="show one account (balance, held)")
    p.add_argument("account")
    p.set_defaults(func=_with_session(_account_show))

    keys = subparsers.add_parser("keys", help="issue, list and revoke API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = keys_sub.add_parser("create", help="issue a key (printed once)")
    p.add_argument("--account", required=True)
    p.add_argument("--name")
    p.set_defaults(func=_with_session(_key_create))
    p = keys_sub.add_parser("list", help="list keys (prefixes only)")
    p.add_argument("--account")
    p.set_defaults(func=_with_session(_key_list))
    p = keys_sub.add_parser("revoke", help="revoke a key by its id")
    p.add_argument("key_id")
    p.set_defaults(func=_with_session(_key_revoke))

    p = subparsers.add_parser("credit", help="credit an account (development funding)")
    p.add_argument("account")
    p.add_argument("amount", type=int, help="AIDP base units")
    p.add_argument("--reference", help="idempotency reference (never credited twice)")
    p.set_defaults(func=_with_session(_credit))

    p = subparsers.add_parser("usage", help="an account's usage: totals and recent jobs")
    p.add_argument("account")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=_with_session(_usage))
