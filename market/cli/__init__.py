"""``aidp-market``: the marketplace's command line.

Each command group lives in its own module with a ``register(subparsers)`` function
that adds its argparse sub-commands (each sets ``func=callable(args) -> int | None``).
To add a group, write the module and append its name to :data:`COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

# Command-group modules, in --help order. Modules not present yet are skipped.
COMMAND_MODULES: list[str] = [
    "market.cli.serve",  # serve, migrate
    "market.cli.accounts",  # accounts, keys, credit, usage
    "market.cli.models",  # models list / add / remove
    "market.cli.devnet",  # up, down
    "market.cli.worker",  # worker, beat (verification engineer)
    "market.cli.chain",  # chain init / reconcile (settlement engineer)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aidp-market",
        description="Neural Cloud marketplace: API server, accounts and keys, local network.",
        epilog="Settings come from AIDP_* environment variables (e.g. AIDP_DB__URL); "
        "see market/settings.py.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    result = func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
