"""Secrets a market generates for itself at first start, kept in its database.

The sampling key decides which receipts are re-executed: whoever knows it knows
which receipts nobody will check. It is therefore random, made once per market, and
never derived from anything an operator types or a node can see. Every process of
one market (API, Celery worker, beat) reads the same value from the shared database;
the first to ask creates it, and a race between two first askers keeps one value.
"""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from market.models import MarketSecret, utcnow

SAMPLING_KEY = "verify_sampling_key"


def get_or_create(session: Session, name: str, nbytes: int = 32) -> str:
    """The secret ``name`` (hex), created with ``nbytes`` random bytes if missing."""
    value = session.execute(select(MarketSecret.value).where(MarketSecret.name == name)).scalar()
    if value is not None:
        return str(value)
    try:
        with session.begin_nested():
            session.add(MarketSecret(name=name, value=secrets.token_hex(nbytes),
                                     created_at=utcnow()))
    except IntegrityError:
        pass  # another process created it first: use theirs
    return str(session.execute(
        select(MarketSecret.value).where(MarketSecret.name == name)
    ).scalar_one())
