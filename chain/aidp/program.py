"""The client side of the ``aidp_market`` program (``programs/aidp_market``): its
instructions built and its accounts decoded from the IDL beside the program's source.

Anchor's conventions are plain data (instruction discriminator sha256("global:<snake
name>")[:8], account discriminator sha256("account:<Name>")[:8], Borsh little-endian),
so the IDL alone says how to talk to the program: this module encodes the IDL's
argument types and decodes its account types for any instruction or account the IDL
names, and adds the PDA derivations. (``anchorpy`` 0.21, the IDL client on PyPI, pins
older solana-py and solders than the market's: it cannot be installed beside them, so it
serves the independent reader ``programs/audit.py`` from an environment of its own.)
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from solders.instruction import AccountMeta, Instruction
from solders.pubkey import Pubkey
from solders.signature import Signature

from protocol.keys import ACQUIT_DOMAIN, RECEIPT_DOMAIN, VERDICT_DOMAIN

IDL_PATH = Path(__file__).resolve().parents[2] / "programs" / "aidp_market" / "idl.json"
SYSTEM_PROGRAM_ID = Pubkey.default()
ED25519_PROGRAM_ID = Pubkey.from_string("Ed25519SigVerify111111111111111111111111111")
INSTRUCTIONS_SYSVAR_ID = Pubkey.from_string("Sysvar1nstructions1111111111111111111111111")
_PRIMITIVES = {"u8": "<B", "u16": "<H", "u32": "<I", "u64": "<Q", "i64": "<q", "bool": "<?"}


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def instruction_discriminator(name: str) -> bytes:
    return hashlib.sha256(f"global:{snake(name)}".encode()).digest()[:8]


def account_discriminator(name: str) -> bytes:
    return hashlib.sha256(f"account:{name}".encode()).digest()[:8]


@cache
def idl(path: Path = IDL_PATH) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


class ProgramError(ValueError):
    """Arguments or account data that do not fit the IDL."""


# ---- Borsh, as the IDL's types say --------------------------------------------------------


def encode(kind: Any, value: Any) -> bytes:
    if isinstance(kind, str):
        if kind in _PRIMITIVES:
            return struct.pack(_PRIMITIVES[kind], value)
        if kind == "publicKey":
            return bytes(value if isinstance(value, Pubkey) else Pubkey.from_string(value))
        raise ProgramError(f"unknown type {kind!r}")
    if "vec" in kind:
        items = list(value)
        return struct.pack("<I", len(items)) + b"".join(encode(kind["vec"], v) for v in items)
    if "array" in kind:
        inner, length = kind["array"]
        if inner == "u8" and isinstance(value, bytes | bytearray):
            if len(value) != length:
                raise ProgramError(f"expected {length} bytes, got {len(value)}")
            return bytes(value)
        items = list(value)
        if len(items) != length:
            raise ProgramError(f"expected {length} items, got {len(items)}")
        return b"".join(encode(inner, v) for v in items)
    raise ProgramError(f"unknown type {kind!r}")


def _decode(kind: Any, data: bytes, at: int) -> tuple[Any, int]:
    if isinstance(kind, str):
        if kind in _PRIMITIVES:
            fmt = _PRIMITIVES[kind]
            return struct.unpack_from(fmt, data, at)[0], at + struct.calcsize(fmt)
        if kind == "publicKey":
            return Pubkey.from_bytes(data[at:at + 32]), at + 32
        raise ProgramError(f"unknown type {kind!r}")
    if "array" in kind:
        inner, length = kind["array"]
        if inner == "u8":
            return bytes(data[at:at + length]), at + length
        items = []
        for _ in range(length):
            item, at = _decode(inner, data, at)
            items.append(item)
        return items, at
    if "vec" in kind:
        (count,), at = struct.unpack_from("<I", data, at), at + 4
        items = []
        for _ in range(count):
            item, at = _decode(kind["vec"], data, at)
            items.append(item)
        return items, at
    raise ProgramError(f"unknown type {kind!r}")


# accounts whose fixed fields are followed by variable data (the IDL's docs say what)
_TRAILING = {"Payouts": "bitmap"}


def decode_account(name: str, data: bytes) -> dict[str, Any]:
    """An account's fields by the IDL (raises ProgramError for another account type);
    the bytes after an account's fixed fields come as ``_TRAILING[name]``."""
    if data[:8] != account_discriminator(name):
        raise ProgramError(f"not a {name} account")
    spec = next(a for a in idl()["accounts"] if a["name"] == name)
    fields: dict[str, Any] = {}
    at = 8
    for field in spec["type"]["fields"]:
        fields[field["name"]], at = _decode(field["type"], data, at)
    if name in _TRAILING:
        fields[_TRAILING[name]] = bytes(data[at:])
    elif at != len(data):
        raise ProgramError(f"{name}: {len(data) - at} bytes beyond its fields")
    return fields


def account_size(name: str) -> int:
    """Bytes of a fixed-size account of the IDL (discriminator included)."""
    spec = next(a for a in idl()["accounts"] if a["name"] == name)
    sizes = {"u8": 1, "u16": 2, "u32": 4, "u64": 8, "i64": 8, "bool": 1, "publicKey": 32}

    def size(kind: Any) -> int:
        if isinstance(kind, str):
            return sizes[kind]
        inner, length = kind["array"]
        return size(inner) * int(length)

    return 8 + sum(size(f["type"]) for f in spec["type"]["fields"])


def instruction(program_id: Pubkey, name: str, accounts: dict[str, Pubkey],
                **args: Any) -> Instruction:
    """The instruction ``name`` with its accounts (by the IDL's names) and arguments."""
    spec = next((i for i in idl()["instructions"] if i["name"] == name), None)
    if spec is None:
        raise ProgramError(f"the program has no instruction {name!r}")
    data = instruction_discriminator(name)
    for arg in spec["args"]:
        if arg["name"] not in args:
            raise ProgramError(f"{name}: argument {arg['name']!r} missing")
        data += encode(arg["type"], args[arg["name"]])
    metas = [AccountMeta(accounts[a["name"]], a["isSigner"], a["isMut"])
             for a in spec["accounts"]]
    return Instruction(program_id, data, metas)


# ---- addresses ---------------------------------------------------------------------------


def config_address(program_id: Pubkey) -> Pubkey:
    return Pubkey.find_program_address([b"config"], program_id)[0]


def anchor_address(program_id: Pubkey, root: bytes) -> Pubkey:
    return Pubkey.find_program_address([b"anchor", root], program_id)[0]


def stake_address(program_id: Pubkey, operator: Pubkey) -> Pubkey:
    return Pubkey.find_program_address([b"stake", bytes(operator)], program_id)[0]


def vault_address(program_id: Pubkey, operator: Pubkey) -> Pubkey:
    return Pubkey.find_program_address([b"vault", bytes(operator)], program_id)[0]


def case_address(program_id: Pubkey, receipt_hash: bytes) -> Pubkey:
    return Pubkey.find_program_address([b"case", receipt_hash], program_id)[0]


def payouts_address(program_id: Pubkey, epoch: int) -> Pubkey:
    return Pubkey.find_program_address([b"payout", struct.pack("<Q", epoch)], program_id)[0]


def payout_vault_address(program_id: Pubkey, epoch: int) -> Pubkey:
    return Pubkey.find_program_address([b"payout_vault", struct.pack("<Q", epoch)],
                                       program_id)[0]


def payout_leaf(index: int, node: Pubkey, amount: int) -> bytes:
    """One payout leaf as the program hashes it (``protocol.merkle`` over its hex)."""
    return struct.pack("<I", index) + bytes(node) + struct.pack("<Q", amount)


# ---- evidence ----------------------------------------------------------------------------


def receipt_message(receipt_hash: bytes) -> bytes:
    """What a node signs for a receipt (``protocol.receipt.sign_receipt``)."""
    return RECEIPT_DOMAIN + receipt_hash


def verdict_message(program_id: Pubkey, receipt_hash: bytes, node: Pubkey, amount: int,
                    refund: int, refund_account: Pubkey, nonce: int) -> bytes:
    """What each verifier signs to ask for a slash; the program rebuilds it byte for byte
    (it names the program: a verdict is worth nothing at another deployment)."""
    return (VERDICT_DOMAIN + bytes(program_id) + receipt_hash + bytes(node)
            + struct.pack("<QQ", amount, refund) + bytes(refund_account)
            + struct.pack("<Q", nonce))


def acquittal_message(program_id: Pubkey, receipt_hash: bytes, node: Pubkey,
                      nonce: int) -> bytes:
    """What each verifier signs to close a case before its period ends."""
    return (ACQUIT_DOMAIN + bytes(program_id) + receipt_hash + bytes(node)
            + struct.pack("<Q", nonce))


def ed25519_instruction(signed: list[tuple[Pubkey, Signature, bytes]]) -> Instruction:
    """One Ed25519 precompile instruction verifying every (key, signature, message), with
    each distinct message written once (verifiers sign one verdict: it is shared)."""
    header = 2 + 14 * len(signed)
    body = bytearray()
    messages: dict[bytes, int] = {}
    offsets = bytearray(struct.pack("<BB", len(signed), 0))
    for key, signature, message in signed:
        signature_at = header + len(body)
        body += bytes(signature)
        key_at = header + len(body)
        body += bytes(key)
        if message not in messages:
            messages[message] = header + len(body)
            body += message
        offsets += struct.pack("<HHHHHHH", signature_at, 0xFFFF, key_at, 0xFFFF,
                               messages[message], len(message), 0xFFFF)
    return Instruction(ED25519_PROGRAM_ID, bytes(offsets + body), [])


@dataclass(frozen=True)
class MarketConfig:
    authority: Pubkey
    mint: Pubkey
    treasury: Pubkey
    fee_bps: int
    quorum: int
    verifiers: list[Pubkey]
    min_stake: int
    unbonding_period: int
    max_slash_per_receipt: int
    challenge_period: int

    @classmethod
    def decode(cls, data: bytes) -> MarketConfig:
        f = decode_account("MarketConfig", data)
        return cls(f["authority"], f["mint"], f["treasury"], f["feeBps"], f["quorum"],
                   f["verifiers"][:f["verifierCount"]], f["minStake"], f["unbondingPeriod"],
                   f["maxSlashPerReceipt"], f["challengePeriod"])


__all__ = ["MarketConfig", "ProgramError", "account_discriminator", "account_size",
           "anchor_address", "config_address", "decode_account", "encode", "idl",
           "instruction", "instruction_discriminator", "stake_address", "vault_address",
           "case_address", "ed25519_instruction", "receipt_message", "verdict_message",
           "payout_leaf", "payout_vault_address", "payouts_address", "acquittal_message"]
