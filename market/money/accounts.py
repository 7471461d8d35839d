"""Accounts and API keys (sync-session functions shared by the admin API and the CLI).

API keys are ``sk-aidp-`` + 32 random URL-safe characters. Only their sha256 is
stored; the key itself is returned once, at creation.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from market.errors import NotFound
from market.models import Account, ApiKey, Job, utcnow

KEY_PREFIX = "sk-aidp-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)  # 24 bytes -> 32 URL-safe characters


def create_account(session: Session, name: str, wallet: str | None = None) -> Account:
    account = Account(name=name, balance=0, held=0, wallet=wallet)
    session.add(account)
    session.flush()
    return account


def get_account(session: Session, account_id: str) -> Account:
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound(f"no account {account_id}")
    return account


def list_accounts(session: Session) -> list[Account]:
    return list(session.execute(select(Account).order_by(Account.created_at)).scalars())


def issue_key(session: Session, account_id: str, name: str | None = None) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the plaintext key (shown once, never stored)."""
    get_account(session, account_id)
    plaintext = generate_key()
    key = ApiKey(
        account_id=account_id,
        key_hash=hash_key(plaintext),
        prefix=plaintext[: len(KEY_PREFIX) + 4],
        name=name,
    )
    session.add(key)
    session.flush()
    return key, plaintext


def revoke_key(session: Session, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no API key {key_id}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    session.flush()
    return key


def list_keys(session: Session, account_id: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at)
    if account_id:
        query = query.where(ApiKey.account_id == account_id)
    return list(session.execute(query).scalars())


def account_dict(account: Account) -> dict[str, Any]:
    return {
        "object": "account",
        "id": account.id,
        "name": account.name,
        "balance": account.balance,
        "held": account.held,
        "available": account.balance - account.held,
        "wallet": account.wallet,
        "created_at": int(account.created_at.timestamp()),
    }


def key_dict(key: ApiKey, plaintext: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "object": "api_key",
        "id": key.id,
        "account_id": key.account_id,
        "name": key.name,
        "prefix": key.prefix,
        "created_at": int(key.created_at.timestamp()),
        "revoked": key.revoked_at is not None,
    }
    if plaintext is not None:
        out["key"] = plaintext
    return out


def usage(session: Session, account_id: str, limit: int = 50) -> dict[str, Any]:
    """Totals and the most recent jobs of one account."""
    get_account(session, account_id)
    totals = session.execute(
        select(
            func.count(Job.id),
            func.coalesce(func.sum(Job.prompt_tokens), 0),
            func.coalesce(func.sum(Job.completion_tokens), 0),
            func.coalesce(func.sum(Job.charged_amount), 0),
            func.coalesce(func.sum(Job.fee_amount), 0),
        ).where(Job.account_id == account_id)
    ).one()
    by_model = session.execute(
        select(
            Job.model,
            func.count(Job.id),
            func.coalesce(func.sum(Job.prompt_tokens), 0),
            func.coalesce(func.sum(Job.completion_tokens), 0),
            func.coalesce(func.sum(Job.charged_amount), 0),
        )
        .where(Job.account_id == account_id)
        .group_by(Job.model)
        .order_by(Job.model)
    ).all()
    jobs = session.execute(
        select(Job)
        .where(Job.account_id == account_id)
        .order_by(Job.created_at.desc())
        .limit(limit)
    ).scalars()
    return {
        "object": "usage",
        "account_id": account_id,
        "requests": int(totals[0]),
        "prompt_tokens": int(totals[1]),
        "completion_tokens": int(totals[2]),
        "total_tokens": int(totals[1]) + int(totals[2]),
        "charged": int(totals[3]),
        "fees": int(totals[4]),
        "by_model": [
            {"model": m, "requests": int(n), "prompt_tokens": int(p),
             "completion_tokens": int(c), "charged": int(ch)}
            for m, n, p, c, ch in by_model
        ],
        "data": [
            {
                "id": j.id,
                "model": j.model,
                "kind": j.kind,
                "status": j.status,
                "stream": j.stream,
                "prompt_tokens": j.prompt_tokens,
                "completion_tokens": j.completion_tokens,
                "charged": j.charged_amount,
                "fee": j.fee_amount,
                "hold": j.hold_amount,
                "failovers": j.failovers,
                "created_at": int(j.created_at.timestamp()),
                "finished_at": int(j.finished_at.timestamp()) if j.finished_at else None,
            }
            for j in jobs
        ],
    }
