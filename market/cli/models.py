"""``aidp-market models list|add|remove``: the models this market lists, straight on the
database. Nodes may only offer listed ids with a listed weight hash; the market counts
each model's prompts with the vocabulary its listing names (``market.listing``). A
running market picks changes up within seconds."""

from __future__ import annotations

import argparse

from market import listing
from market.cli.accounts import _with_session
from market.errors import BadRequest


def _list(session, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    return [{"id": m.id, "sha256": sorted(m.sha256), "vocabulary": m.vocabulary,
             "context_length": m.context_length}
            for _, m in sorted(listing.read_all(session).items())]


def _add(session, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    entry = listing.validate_listing(args.id, args.sha256, args.vocabulary, args.context_length)
    try:
        listing.load_vocabulary(entry.vocabulary)
    except Exception as exc:  # noqa: BLE001 - the operator's input
        raise BadRequest(f"vocabulary {entry.vocabulary!r} cannot be read: {exc}") from None
    listing.upsert(session, entry)
    return {"listed": entry.id, "sha256": sorted(entry.sha256)}


def _remove(session, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if not listing.remove(session, args.id):
        raise BadRequest(f"model {args.id!r} is not listed")
    return {"removed": args.id}


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    models = subparsers.add_parser(
        "models", help="the models this market lists (accepted weights, vocabulary)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  aidp-market models add Llama-3.2-1B-Instruct --sha256 9f86d0… "
               "--vocabulary gguf:/models/llama-3.2-1b.Q4_K_M.gguf --context-length 8192")
    sub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    models.set_defaults(func=lambda _a: models.print_help() or 2)
    p = sub.add_parser("list", help="every listed model (JSON)")
    p.set_defaults(func=_with_session(_list))
    p = sub.add_parser("add", help="list a model, or change its listing")
    p.add_argument("id", help="the model id buyers ask for")
    p.add_argument("--sha256", action="append", required=True, metavar="HEX",
                   help="an accepted weights hash (repeat for several builds)")
    p.add_argument("--vocabulary", required=True,
                   help="gguf:<path to the weights' GGUF> (its vocabulary and chat template)")
    p.add_argument("--context-length", type=int, default=8192,
                   help="the longest context a node may register for it (default 8192)")
    p.set_defaults(func=_with_session(_add))
    p = sub.add_parser("remove", help="stop listing a model (its nodes are refused)")
    p.add_argument("id")
    p.set_defaults(func=_with_session(_remove))

