"""The Solana client side: SPL Token, its native multisig and Memo — no custom program.

* ``spl`` — byte-exact instruction builders, account parsers, memo texts.
* ``ledger/`` — the ``Ledger`` interface (the exactly-once send/status API: ``prepare`` →
  record ``sent`` → ``submit`` → ``confirm``), the in-process and JSON-RPC backends, and
  ``open_ledger(url, data_dir)``.
* ``localnet/`` — a persistent LiteSVM chain, its JSON-RPC server and ``aidp-ledger``.
* ``aidp/`` — what AIDP settlement moves: bootstrap, deposits + scanner, allowances, stake
  multisig, payouts, anchors (one module each).

Nothing here imports ``market``: settings arrive as explicit parameters.
"""
