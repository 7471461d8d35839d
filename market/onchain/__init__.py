"""The market's side of settlement on Solana (SPL Token, its multisig, Memo; no custom
program): exactly-once ``chain_transfers`` (``transfers``), deposits and allowances
(``deposits``, ``allowance``), stake (``stake``), payout rounds, slashes and proof
anchors (``settle``, ``proofs``), ``reconcile``, ``bootstrap`` (``aidp-market chain
init``) and unbonding. The Celery tasks live in ``market.worker``, the HTTP routes in
``market.api``, the chain calls themselves in ``chain/``.

The modules whose transfers ``transfers.drive`` sends register their handlers when
imported; importing the package imports them all, so a handler is always there.
"""

from market.onchain import allowance, bootstrap, settle, unbonding  # noqa: F401  (handlers)
