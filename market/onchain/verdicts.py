"""Verifier signatures on slash verdicts: what lets the program take stake.

The program slashes only when ``verifier_quorum`` distinct keys of its verifier set
signed the same verdict (program, receipt, node, amount, refund, refund account, nonce).
Each market process signs with the verifier keys it holds (``verifier-<n>.json``), once per
receipt and key, for every receipt the verification worker judged fraudulent (state
``slashed``, a ``slash:<receipt>`` journal entry). A public deployment gives each verifier
its own host and its own re-execution; the signature rows are the same either way.

A verifier on its own host runs ``aidp-market chain sign-verdicts --keypair K
--reexecute``: it re-executes each receipt on its own engine and signs only the frauds it
reproduces, so a quorum means that many independent judgements. The verdict's fields are
fixed by what the market already decided: the journal's amount
capped by the program's ``max_slash_per_receipt``, a refund of 0 (the buyer's refund is
money that never left the deposit account: a slashed receipt is never paid out), and the
journal entry's id as the nonce.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Pending:
    """A fraudulent receipt a verifier has not signed: the journal's slash and its names."""

    entry_id: int
    receipt_id: str
    amount: int
    receipt_hash: str
    node: str


#: a verifier's own judgement of a receipt before it signs (True: it also finds fraud)
Confirm = Callable[[str], bool]


def _unsigned(session: Session, verifier: str) -> list[Pending]:
    signed = select(ChainVerdict.receipt_id).where(ChainVerdict.verifier == verifier)
    return [Pending(*r) for r in session.execute(
        select(LedgerEntry.id, LedgerEntry.receipt_id, LedgerEntry.amount, Receipt.receipt_hash,
               Node.pubkey)
        .join(Receipt, Receipt.id == LedgerEntry.receipt_id)
        .join(Node, Node.id == LedgerEntry.node_id)
        .where(LedgerEntry.kind == "slash", LedgerEntry.amount > 0,
               Receipt.state == "slashed", LedgerEntry.receipt_id.not_in(signed))
        .order_by(LedgerEntry.id)).all()]


def verdict_for(cfg: aidp.ChainConfig, max_slash: int, pending: Pending) -> aidp.Verdict:
    return aidp.Verdict(
        receipt_hash=bytes.fromhex(pending.receipt_hash), node=Pubkey.from_string(pending.node),
        amount=min(pending.amount, max_slash), refund=0,
        refund_account=Pubkey.from_string(cfg.deposit), nonce=pending.entry_id)


def sign_pending(rt: ChainRuntime, sessions: sessionmaker[Session]) -> int:
    """Sign with every verifier key this market process holds (see :func:`sign_with`)."""
    return sum(sign_with(rt.cfg, rt.settings.chain.max_slash_per_receipt, key, sessions)
               for key in rt.verifiers)


def sign_with(cfg: aidp.ChainConfig, max_slash: int, key: Keypair,
              sessions: sessionmaker[Session], confirm: Confirm | None = None) -> int:
    """Sign every fraudulent receipt ``key`` has not signed yet; returns the signatures
    added. Needs no market key: a verifier host holds its own key, the public chain
    config and the database (``aidp-market chain sign-verdicts``). With ``confirm`` the
    verifier signs only what its own judgement (a re-execution on its own engine) also
    finds fraudulent, outside any transaction. A concurrent signer with the same key
    loses on the unique (receipt, verifier) pair and adds nothing."""
    verifier = str(key.pubkey())
    with sessions() as session:
        todo = _unsigned(session, verifier)
    added = 0
    for pending in todo:
        if confirm is not None and not confirm(pending.receipt_id):
            log.warning("verifier %s does not find receipt %s fraudulent: not signed",
                        verifier, pending.receipt_id)
            continue
        verdict = verdict_for(cfg, max_slash, pending)
        try:
            with sessions.begin() as session:
                session.add(ChainVerdict(
                    receipt_id=pending.receipt_id, verifier=verifier, amount=verdict.amount,
                    refund=verdict.refund, refund_account=str(verdict.refund_account),
                    nonce=verdict.nonce, signature=str(key.sign_message(verdict.message(cfg)))))
            added += 1
        except IntegrityError:
            log.info("verifier %s: a concurrent signer got there first", verifier)
    return added
