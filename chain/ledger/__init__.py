"""The ``Ledger`` interface (``base``) and its backends: ``inprocess`` (a ``LocalChain`` in
this process) and ``rpc`` (any Solana JSON-RPC node); ``open_ledger`` picks one by URL."""

from chain.ledger.base import Ledger, LedgerError
from chain.ledger.open import open_ledger

__all__ = ["Ledger", "LedgerError", "open_ledger"]
