"""``aidp-market up`` / ``down``: a whole local network (see market/devnet.py)."""

from __future__ import annotations

import argparse


def _up(args: argparse.Namespace) -> int:
    from market import devnet

    devnet.up(foreground=args.foreground, ledger_port=args.ledger_port)
    return 0


def _down(args: argparse.Namespace) -> int:
    from market import devnet

    devnet.down()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    up = subparsers.add_parser(
        "up", help="start ledger, market, worker, beat and a CPU node; print how to call it",
        description="Start a whole local network on embedded defaults: aidp-ledger, the "
        "AIDP mint and accounts (chain init), the market API (AIDP_HOST:AIDP_PORT, default "
        "127.0.0.1:8000), a Celery worker and beat on a SQLite broker, and one node serving "
        "SmolLM2-135M-Instruct with llama.cpp. Creates a demo buyer and prints its API key "
        "with a curl and a Python example. Data and logs live under AIDP_DATA_DIR "
        "(default ./.aidp); `aidp-market down` stops everything.",
    )
    up.add_argument("--foreground", action="store_true",
                    help="stay attached; Ctrl-C stops everything (default: run in background)")
    up.add_argument("--ledger-port", type=int, default=8899,
                    help="port of the local Solana JSON-RPC ledger (default 8899)")
    up.set_defaults(func=_up)
    down = subparsers.add_parser("down", help="stop what `up` started")
    down.set_defaults(func=_down)
