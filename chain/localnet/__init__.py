"""A local Solana chain: a persistent LiteSVM (``chain``) running the real SPL Token,
Associated Token Account and Memo programs, the JSON-RPC server over it (``server``) and
``aidp-ledger`` (``cli``). The in-process ledger backend drives the same ``LocalChain``."""
