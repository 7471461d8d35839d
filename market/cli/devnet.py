"""``aidp-market up`` / ``down``: a whole local network (see market/devnet.py)."""

from __future__ import annotations

import argparse


def _up(args: argparse.Namespace) -> int:
    from market import devnet  # imported lazily: heavy, and written by another engineer

    if hasattr(devnet, "main"):
        return int(devnet.main(args.rest) or 0)
    devnet.up(foreground=args.foreground, ledger_port=args.ledger_port)
    return 0


def _down(args: argparse.Namespace) -> int:
    from market import devnet

    devnet.down()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    up = subparsers.add_parser(
        "up", help="start ledger, market, worker, beat and a CPU node; print how to call it"
    )
    up.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops all")
    up.add_argument("--ledger-port", type=int, default=8899)
    up.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    up.set_defaults(func=_up)
    down = subparsers.add_parser("down", help="stop what `up` started")
    down.set_defaults(func=_down)
