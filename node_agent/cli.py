"""``aidp-node``: run a node, make a keypair, check the machine.

    aidp-node keygen                       # write ~/.config/solana/id.json (solana-keygen format)
    aidp-node doctor                       # GPUs (NVML), engines, models found here
    aidp-node run --market http://127.0.0.1:8000 --model SmolLM2-135M-Instruct
    aidp-node stake --market URL [--amount N]   # bond N base units in the program (or show)
    aidp-node unbond --market URL --amount N    # start unbonding N base units of stake
    aidp-node withdraw --market URL             # after the unbonding period: take it back
    aidp-node claim --market URL                # claim unpaid payout leaves from the program

The ``run`` flags are made from the fields of ``NodeSettings`` (node_agent/settings.py),
one each, so a setting's default, type and help are written once, there. This module only
parses; running a node is node_agent.serve's, the report node_agent.doctor's, the stake
calls node_agent.stake's.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from node_agent import __version__
from node_agent.settings import NodeSettings
from protocol.keys import DEFAULT_KEYPAIR_PATH

# short names operators' commands already use, accepted next to the names made from fields
ALIASES: dict[str, tuple[str, ...]] = {"market_url": ("--market",), "n_ctx": ("--ctx",)}
_VALUE_TYPES = (int, float, str, Path)
_METAVARS: dict[Any, str] = {int: "N", float: "N", Path: "PATH"}


def _say(message: str) -> None:
    print(message, flush=True)


# ---- commands ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """``run``: settings from the flags given over AIDP_NODE_*, then serve until a signal."""
    from pydantic import ValidationError

    from inference.base import EngineError
    from node_agent.serve import serve
    from protocol.runtime import run_event_loop

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            print(f"error: {field}: {err['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run_event_loop(serve(settings))
    except EngineError as exc:
        print(f"error: the {settings.engine} engine could not start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_keygen(args: argparse.Namespace) -> int:
    """``keygen``: a new keypair, never over an existing one unless --force."""
    from solders.keypair import Keypair

    from protocol.keys import load_keypair, save_keypair

    try:
        path = save_keypair(Keypair(), args.outfile, overwrite=args.force)
    except FileExistsError as exc:
        print(f"error: {exc} (use --force to replace it)", file=sys.stderr)
        return 1
    _say(f"Wrote new keypair to {path}")
    _say(f"pubkey: {load_keypair(path).pubkey()}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """``doctor``: the machine report, as JSON or as text."""
    from node_agent.doctor import doctor_report, report_lines

    report = doctor_report(NodeSettings())
    _say(json.dumps(report, indent=2) if args.json else "\n".join(report_lines(report)))
    return 0


def cmd_stake(args: argparse.Namespace) -> int:
    """``stake`` / ``unbond`` / ``withdraw`` / ``claim``: signed by the operator alone and
    sent to the program; 1 when the chain or the market refuses."""
    from node_agent import stake
    from protocol.keys import load_keypair

    try:
        op = stake.operator(args.market, load_keypair(args.keypair), args.rpc)
        if args.command == "stake":
            out = stake.stake(op, args.amount) if args.amount else stake.status(op)
        elif args.command == "unbond":
            out = stake.unbond(op, args.amount)
        elif args.command == "withdraw":
            out = stake.withdraw(op)
        else:
            out = stake.claim(op)
    except stake.ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _say(json.dumps(out, indent=2))
    return 0


# ---- run flags, made from NodeSettings --------------------------------------------------


def env_name(field: str) -> str:
    """The variable a setting is read from: AIDP_NODE_MARKET_URL for market_url."""
    return f"{NodeSettings.model_config.get('env_prefix', '')}{field}".upper()


def flag_names(field: str) -> list[str]:
    """``--market-url`` for market_url, then the field's aliases."""
    return [f"--{field.replace('_', '-')}", *ALIASES.get(field, ())]


def _value_type(annotation: Any) -> Any:
    """The annotation without its ``| None``: what the flag's value converts to."""
    if get_origin(annotation) in (Union, UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
    return annotation


def _shown(default: Any) -> str:
    """A default as --help shows it: ``unset`` for None, ``""`` for the empty string."""
    if default is None:
        return "unset"
    return '""' if default == "" else str(default)


def _flag_help(name: str, field: FieldInfo) -> str:
    default = _shown(field.get_default(call_default_factory=True))
    text = f"{field.description or name} (default: {default}; env {env_name(name)})"
    return text.replace("%", "%%")  # argparse formats help with %


def _flag_kwargs(name: str, field: FieldInfo) -> dict[str, Any]:
    """argparse's type, choices or action for the field's annotation; a type it cannot
    take fails here, when the parser is built, not when an operator uses the flag."""
    kind = _value_type(field.annotation)
    kwargs: dict[str, Any] = {"dest": name, "help": _flag_help(name, field)}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif get_origin(kind) is Literal:
        choices = get_args(kind)
        kwargs.update(choices=choices, type=type(choices[0]))
    elif kind in _VALUE_TYPES:
        kwargs.update(type=kind, metavar=_METAVARS.get(kind))
    else:
        raise TypeError(f"NodeSettings.{name}: no command-line flag for {field.annotation!r}")
    return kwargs


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per NodeSettings field. The parser must have ``argument_default=SUPPRESS``:
    a flag not given is then absent, and the environment's value stands."""
    for name, field in NodeSettings.model_fields.items():
        parser.add_argument(*flag_names(name), **_flag_kwargs(name, field))


def settings_from_args(args: argparse.Namespace) -> NodeSettings:
    """NodeSettings from the flags given only: the rest come from AIDP_NODE_*, .env or the
    defaults, as they would without the command line."""
    given = vars(args)
    flags = {name: given[name] for name in NodeSettings.model_fields if name in given}
    return NodeSettings(**flags)


# ---- parser -----------------------------------------------------------------------------


class _WrapAtSpaces(argparse.HelpFormatter):
    """Help wrapped at spaces only: package names and paths keep their hyphens whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aidp-node",
        description="Neural Cloud node agent: serve LLM inference to the market and earn AIDP.",
        epilog="Quick start: aidp-node keygen && aidp-node run --market http://127.0.0.1:8000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"aidp-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_keygen(sub)
    _add_stake(sub)
    doctor = sub.add_parser("doctor", help="show detected GPUs, engines and models")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def _add_run(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="connect to a market and serve a model",
        description="Load a model, dial out to the market's node link (no open port needed), "
        "serve jobs and sign a receipt for each. SIGTERM drains: no new jobs, running ones "
        "finish, then exit. A flag not given takes its AIDP_NODE_* variable (or .env), else "
        "the default shown.",
        argument_default=argparse.SUPPRESS,
        formatter_class=_WrapAtSpaces,
    )
    add_settings_flags(run)
    run.set_defaults(func=cmd_run)


def _add_keygen(sub: Any) -> None:
    keygen = sub.add_parser(
        "keygen", help="write a new Solana keypair (solana-keygen's JSON format)"
    )
    keygen.add_argument(
        "--outfile",
        "-o",
        type=Path,
        default=DEFAULT_KEYPAIR_PATH,
        help=f"where to write it (default {DEFAULT_KEYPAIR_PATH})",
    )
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    keygen.set_defaults(func=cmd_keygen)


def _add_stake(sub: Any) -> None:
    for name, helptext in (
        ("stake", ("bond AIDP in this node's stake vault of the market's program "
                   "(without --amount: show the stake)")),
        ("unbond", "start unbonding part of this node's stake (the program's period)"),
        ("withdraw", ("take unbonded stake back once the unbonding period has passed and "
                      "no case against the node is open")),
        ("claim", "claim this node's unpaid payout leaves from the program yourself"),
    ):
        cmd = sub.add_parser(name, help=helptext, description=helptext + ". Signed by the "
                             "operator keypair alone: the market publishes its program's "
                             "addresses and cannot move stake.")
        cmd.add_argument("--market", required=True, help="market URL, e.g. https://market.example")
        cmd.add_argument("--keypair", type=Path, default=DEFAULT_KEYPAIR_PATH,
                         help=f"the operator keypair (default {DEFAULT_KEYPAIR_PATH})")
        cmd.add_argument("--rpc", default=None,
                         help="Solana JSON-RPC URL (default: the one the market names)")
        if name in ("stake", "unbond"):
            cmd.add_argument("--amount", type=int, required=name == "unbond", default=0,
                             help="AIDP base units")
        cmd.set_defaults(func=cmd_stake)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
