"""The market's side of settlement on Solana (SPL Token, its multisig, Memo; no custom
program): exactly-once ``chain_transfers`` (``transfers``), deposits and allowances
(``deposits``, ``allowance``), stake (``stake``), payout rounds, slashes and proof
anchors (``settle``, ``proofs``), ``reconcile``, ``bootstrap`` (``aidp-market chain
init``) and unbonding. The Celery tasks live in ``market.worker``, the HTTP routes in
``market.api``, the chain calls themselves in ``chain/``.

``transfers.drive`` is given the table of handlers (``handlers.HANDLERS``: how each kind
of transfer is built and what confirming it records); each kind's module exports its part.
"""
