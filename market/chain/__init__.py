"""The market's side of settlement on Solana (SPL Token, its multisig, Memo; no custom
program): exactly-once ``chain_transfers`` (``transfers``), deposits and allowances
(``deposits``, ``allowance``), stake (``stake``), payout rounds, slashes and proof
anchors (``settle``), ``reconcile``, ``bootstrap`` (``aidp-market chain init``), the Celery
tasks (``tasks``, scheduled by ``schedule``) and the public proof API (``api``).
The chain calls themselves live in ``programs/``."""
