"""An independent reader of the ``aidp_market`` program, built with anchorpy from the IDL
alone: no code of the market's, so what it prints is what the chain says.

    python programs/audit.py --rpc URL --program ID config
    python programs/audit.py --rpc URL --program ID stakes          # every NodeStake
    python programs/audit.py --rpc URL --program ID stake OPERATOR
    python programs/audit.py --rpc URL --program ID epoch N         # a payout epoch
    python programs/audit.py --rpc URL --program ID case RECEIPT_HASH
    python programs/audit.py --rpc URL --program ID anchor ROOT
    python programs/audit.py --rpc URL --program ID claim --keypair K --epoch N \\
        --index I --amount A --lefts L --proof HEX,HEX,...         # pay a leaf, as anyone

It runs in its own environment (``make`` creates ``.venv-anchorpy``: anchorpy 0.21 pins
solana-py and solders older than the market's), against ``aidp-ledger`` or any Solana
RPC. Each command prints one JSON object; field names are the IDL's (anchorpy's snake
case), keys and byte arrays as base58 and hex.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
from pathlib import Path
from typing import Any

from anchorpy import Context, Idl, Program, Provider, Wallet
from solana.rpc.async_api import AsyncClient
from solana.rpc.types import TxOpts
from solders.keypair import Keypair
from solders.pubkey import Pubkey

IDL_PATH = Path(__file__).resolve().parent / "aidp_market" / "idl.json"
TOKEN_PROGRAM = Pubkey.from_string("TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA")
ASSOCIATED_TOKEN_PROGRAM = Pubkey.from_string("ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL")


def plain(value: Any) -> Any:
    """anchorpy's decoded values as JSON: keys in base58, 32-byte arrays in hex."""
    if isinstance(value, Pubkey):
        return str(value)
    if isinstance(value, (list, tuple)):
        if len(value) == 32 and all(isinstance(x, int) for x in value):
            return bytes(value).hex()
        return [plain(x) for x in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if hasattr(value, "__dict__"):
        return {k: plain(v) for k, v in vars(value).items() if not k.startswith("_")}
    return value


def pda(program_id: Pubkey, *seeds: bytes) -> Pubkey:
    return Pubkey.find_program_address(list(seeds), program_id)[0]


def ata(owner: Pubkey, mint: Pubkey) -> tuple[Pubkey, int]:
    """The owner's associated token account and its bump (``claim`` is handed the bump)."""
    return Pubkey.find_program_address(
        [bytes(owner), bytes(TOKEN_PROGRAM), bytes(mint)], ASSOCIATED_TOKEN_PROGRAM)


async def fetch(program: Program, name: str, address: Pubkey) -> dict[str, Any]:
    account = await program.account[name].fetch(address)
    return {"address": str(address), **plain(account)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    idl = Idl.from_json(IDL_PATH.read_text())
    keypair = Keypair.from_bytes(bytes(json.loads(Path(args.keypair).read_text()))) \
        if getattr(args, "keypair", None) else Keypair()
    client = AsyncClient(args.rpc)
    program = Program(idl, Pubkey.from_string(args.program),
                      Provider(client, Wallet(keypair), TxOpts(preflight_commitment="confirmed")))
    pid = program.program_id
    try:
        if args.command == "config":
            return await fetch(program, "MarketConfig", pda(pid, b"config"))
        if args.command == "stakes":
            found = await program.account["NodeStake"].all()
            return {"stakes": [{"address": str(x.public_key), **plain(x.account)}
                               for x in found]}
        if args.command == "stake":
            operator = Pubkey.from_string(args.operator)
            return await fetch(program, "NodeStake", pda(pid, b"stake", bytes(operator)))
        if args.command == "epoch":
            return await fetch(program, "Payouts", pda(pid, b"payout", struct.pack("<Q", args.n)))
        if args.command == "case":
            return await fetch(program, "SlashCase", pda(pid, b"case", bytes.fromhex(args.hash)))
        if args.command == "anchor":
            return await fetch(program, "ReceiptAnchor",
                               pda(pid, b"anchor", bytes.fromhex(args.root)))
        return await claim(program, args)
    finally:
        await program.close()


async def claim(program: Program, args: argparse.Namespace) -> dict[str, Any]:
    """Pay one leaf into the node's associated token account (which must exist)."""
    pid, node = program.program_id, Pubkey.from_string(args.node)
    config = await program.account["MarketConfig"].fetch(pda(pid, b"config"))
    epoch = struct.pack("<Q", args.epoch)
    proof = [list(bytes.fromhex(h)) for h in args.proof.split(",") if h]
    destination, bump = ata(node, config.mint)
    signature = await program.rpc["claim"](
        args.index, node, args.amount, args.lefts, bump, proof,
        ctx=Context(accounts={
            "payouts": pda(pid, b"payout", epoch),
            "payout_vault": pda(pid, b"payout_vault", epoch),
            "destination": destination, "token_program": TOKEN_PROGRAM}))
    await program.provider.connection.confirm_transaction(signature, commitment="confirmed")
    return {"claimed": True, "signature": str(signature)}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--rpc", required=True, help="Solana JSON-RPC URL")
    ap.add_argument("--program", required=True, help="the aidp_market program id")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("config", help="the MarketConfig")
    sub.add_parser("stakes", help="every NodeStake (getProgramAccounts)")
    sub.add_parser("stake", help="one operator's NodeStake").add_argument("operator")
    sub.add_parser("epoch", help="a payout epoch's Payouts account").add_argument("n", type=int)
    sub.add_parser("case", help="the SlashCase of a receipt").add_argument("hash")
    sub.add_parser("anchor", help="the ReceiptAnchor of a root").add_argument("root")
    c = sub.add_parser("claim", help="pay one payout leaf (anyone may)")
    c.add_argument("--keypair", required=True, help="fee payer (solana-keygen JSON)")
    for name, kind in (("epoch", int), ("index", int), ("amount", int), ("lefts", int)):
        c.add_argument(f"--{name}", type=kind, required=True)
    c.add_argument("--node", required=True, help="the leaf's node key")
    c.add_argument("--proof", default="", help="the sibling hashes, hex, comma-separated")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        print(json.dumps(asyncio.run(run(args))))
    except Exception as exc:  # noqa: BLE001 - the tool's answer is one line either way
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
