"""The Solana client side: SPL Token, Memo and the project's own ``aidp_market`` program.

* ``spl`` — byte-exact instruction builders, account parsers, memo texts.
* ``ledger/`` — the ``Ledger`` interface (the exactly-once send/status API: ``prepare`` →
  record ``sent`` → ``submit`` → ``confirm``), the in-process and JSON-RPC backends, and
  ``open_ledger(url, data_dir)``.
* ``localnet/`` — a persistent LiteSVM chain, its JSON-RPC server and ``aidp-ledger``.
* ``aidp/`` — what AIDP settlement moves: bootstrap, deposits + scanner, allowances, and
  through the program (``program``, ``deploy``, ``install``): stake vaults, slash cases,
  payout epochs, anchors (one module each).

Nothing here imports ``market``: settings arrive as explicit parameters.
"""
