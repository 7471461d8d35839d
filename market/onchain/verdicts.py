"""Verifier signatures on slash verdicts: what lets the program take stake.

The program slashes only when ``verifier_quorum`` distinct keys of its verifier set
signed the same verdict (program, receipt, node, amount, refund, refund account, nonce).
Each market process signs with the verifier keys it holds (``verifier-<n>.json``), once per
receipt and key, for every receipt the verification worker judged fraudulent (state
``slashed``, a ``slash:<receipt>`` journal entry). A public deployment gives each verifier
its own host and its own re-execution; the signature rows are the same either way.

The verdict's fields are fixed by what the market already decided: the journal's amount
capped by the program's ``max_slash_per_receipt``, a refund of 0 (the buyer's refund is
money that never left the deposit account: a slashed receipt is never paid out), and the
journal entry's id as the nonce.
"""

from __future__ import annotations

import logging

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from chain import aidp
from market.models import LedgerEntry, Node, Receipt
from market.onchain.models import ChainVerdict
from market.onchain.runtime import ChainRuntime

log = logging.getLogger("market.onchain")


def _unsigned(session: Session, verifier: str) -> list[tuple[LedgerEntry, str, str]]:
    """(slash entry, receipt hash, node pubkey) this verifier has not signed yet."""
    signed = select(ChainVerdict.receipt_id).where(ChainVerdict.verifier == verifier)
    return [tuple(r) for r in session.execute(  # type: ignore[misc]
        select(LedgerEntry, Receipt.receipt_hash, Node.pubkey)
        .join(Receipt, Receipt.id == LedgerEntry.receipt_id)
        .join(Node, Node.id == LedgerEntry.node_id)
        .where(LedgerEntry.kind == "slash", LedgerEntry.amount > 0,
               Receipt.state == "slashed", LedgerEntry.receipt_id.not_in(signed))
        .order_by(LedgerEntry.id)).all()]


def verdict_for(cfg: aidp.ChainConfig, max_slash: int, entry: LedgerEntry,
                receipt_hash: str, node: str) -> aidp.Verdict:
    return aidp.Verdict(
        receipt_hash=bytes.fromhex(receipt_hash), node=Pubkey.from_string(node),
        amount=min(entry.amount, max_slash), refund=0,
        refund_account=Pubkey.from_string(cfg.deposit), nonce=entry.id)


def sign_pending(rt: ChainRuntime, sessions: sessionmaker[Session]) -> int:
    """Sign with every verifier key this market process holds (see :func:`sign_with`)."""
    return sum(sign_with(rt.cfg, rt.settings.chain.max_slash_per_receipt, key, sessions)
               for key in rt.verifiers)


def sign_with(cfg: aidp.ChainConfig, max_slash: int, key: Keypair,
              sessions: sessionmaker[Session]) -> int:
    """Sign every fraudulent receipt ``key`` has not signed yet; returns the signatures
    added. Needs no market key: a verifier host holds its own key, the public chain
    config and the database (``aidp-market chain sign-verdicts``). A concurrent signer
    with the same key loses on the unique (receipt, verifier) pair and adds nothing."""
    verifier = str(key.pubkey())
    try:
        with sessions.begin() as session:
            todo = _unsigned(session, verifier)
            for entry, receipt_hash, node in todo:
                verdict = verdict_for(cfg, max_slash, entry, receipt_hash, node)
                session.add(ChainVerdict(
                    receipt_id=entry.receipt_id, verifier=verifier, amount=verdict.amount,
                    refund=verdict.refund, refund_account=str(verdict.refund_account),
                    nonce=verdict.nonce, signature=str(key.sign_message(verdict.message(cfg)))))
    except IntegrityError:
        log.info("verifier %s: a concurrent signer got there first", verifier)
        return 0
    return len(todo)
