"""The on-chain layer: SPL Token, its native multisig and Memo — no custom program.

* ``spl`` — byte-exact instruction builders and account parsers.
* ``ledger`` — the ``Ledger`` interface (the exactly-once send/status API: ``prepare`` →
  record ``sent`` → ``submit`` → ``confirm``) and the in-process backend.
* ``ledgers`` — ``open_ledger(url, data_dir)``: a backend for a ledger URL.
* ``localchain`` — a persistent LiteSVM chain (in-process backend and aidp-ledger's engine).
* ``rpc`` — the JSON-RPC backend through solana-py's async client.
* ``settlement`` — bootstrap, deposits + scanner, allowances, stake multisig, payouts, anchors.
* ``server`` / ``cli`` — ``aidp-ledger serve``.

Nothing here imports ``market``: settings arrive as explicit parameters.
"""
