"""The market's side of settlement on Solana, through the ``aidp_market`` program (stake
vaults, receipt anchors, slashes on evidence, payout epochs and claims) and SPL Token:
exactly-once ``chain_transfers`` (``transfers``), deposits and allowances (``deposits``,
``allowance``), stake as the program holds it (``stake``), payout epochs, cases, slashes
and anchors (``settle``), verifier signatures on verdicts (``verdicts``), proofs anyone can
check (``proofs``), ``reconcile`` and ``bootstrap`` (``aidp-market chain init``: deploy and
initialise the program). The Celery tasks live in ``market.worker``, the HTTP routes in
``market.api``, the chain calls themselves in ``chain/``.

``transfers.drive`` is given the table of handlers (``handlers.HANDLERS``: how each kind
of transfer is built and what confirming it records); each kind's module exports its part.
"""
