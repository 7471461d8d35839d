"""Instruction builders and account layouts for the only programs we trust.

SPL Token (with its native m-of-n multisig), the Associated Token Account program,
Memo v2 and the System program. No custom on-chain program exists in this project, so
everything here is a thin, byte-exact encoding of documented instruction layouts; it
needs nothing beyond ``solders`` and produces identical bytes every time, which is
what makes transactions deterministic (same inputs + same blockhash = same signature).

Layouts: https://github.com/solana-program/token (program/src/instruction.rs,
state.rs), associated-token-account (instruction.rs), memo (v2).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from solders.instruction import AccountMeta, Instruction
from solders.message import Message, MessageV0
from solders.pubkey import Pubkey
from solders.system_program import (
    CreateAccountWithSeedParams,
    TransferParams,
    create_account_with_seed,
)
from solders.system_program import transfer as system_transfer

TOKEN_PROGRAM_ID = Pubkey.from_string("TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA")
ASSOCIATED_TOKEN_PROGRAM_ID = Pubkey.from_string("ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL")
MEMO_PROGRAM_ID = Pubkey.from_string("MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr")
SYSTEM_PROGRAM_ID = Pubkey.from_string("11111111111111111111111111111111")

MINT_SIZE = 82
TOKEN_ACCOUNT_SIZE = 165
MULTISIG_SIZE = 355
MAX_MULTISIG_SIGNERS = 11

# SPL Token instruction tags (TokenInstruction enum order).
_TRANSFER = 3
_APPROVE = 4
_REVOKE = 5
_TRANSFER_CHECKED = 12
_APPROVE_CHECKED = 13
_MINT_TO_CHECKED = 14
_INITIALIZE_ACCOUNT3 = 18
_INITIALIZE_MULTISIG2 = 19
_INITIALIZE_MINT2 = 20

# SPL Token custom error codes worth naming (TokenError enum order).
TOKEN_ERRORS = {
    1: "InsufficientFunds",
    3: "MintMismatch",
    4: "OwnerMismatch",
    7: "InvalidNumberOfProvidedSigners",
    8: "InvalidNumberOfRequiredSigners",
    17: "AccountFrozen",
    18: "MintDecimalsMismatch",
}


def _signers_metas(authority: Pubkey, multisig_signers: list[Pubkey]) -> list[AccountMeta]:
    """Authority account plus, for a multisig authority, the co-signing members."""
    metas = [AccountMeta(authority, is_signer=not multisig_signers, is_writable=False)]
    metas += [AccountMeta(s, is_signer=True, is_writable=False) for s in multisig_signers]
    return metas


def initialize_mint2(
    mint: Pubkey, decimals: int, mint_authority: Pubkey, freeze_authority: Pubkey | None = None
) -> Instruction:
    data = struct.pack("<BB", _INITIALIZE_MINT2, decimals) + bytes(mint_authority)
    data += (b"\x01" + bytes(freeze_authority)) if freeze_authority else b"\x00"
    return Instruction(TOKEN_PROGRAM_ID, data, [AccountMeta(mint, False, True)])


def initialize_account3(account: Pubkey, mint: Pubkey, owner: Pubkey) -> Instruction:
    data = bytes([_INITIALIZE_ACCOUNT3]) + bytes(owner)
    return Instruction(
        TOKEN_PROGRAM_ID, data, [AccountMeta(account, False, True), AccountMeta(mint, False, False)]
    )


def initialize_multisig2(multisig: Pubkey, signers: list[Pubkey], m: int) -> Instruction:
    if not 1 <= m <= len(signers) <= MAX_MULTISIG_SIGNERS:
        raise ValueError(f"need 1 <= m ({m}) <= n ({len(signers)}) <= {MAX_MULTISIG_SIGNERS}")
    metas = [AccountMeta(multisig, False, True)]
    metas += [AccountMeta(s, False, False) for s in signers]
    return Instruction(TOKEN_PROGRAM_ID, bytes([_INITIALIZE_MULTISIG2, m]), metas)


def mint_to_checked(
    mint: Pubkey, dest: Pubkey, authority: Pubkey, amount: int, decimals: int
) -> Instruction:
    data = struct.pack("<BQB", _MINT_TO_CHECKED, amount, decimals)
    metas = [AccountMeta(mint, False, True), AccountMeta(dest, False, True)]
    metas += _signers_metas(authority, [])
    return Instruction(TOKEN_PROGRAM_ID, data, metas)


def _checked(op: int, source: Pubkey, mint: Pubkey, third: AccountMeta, authority: Pubkey,
             amount: int, decimals: int, signers: list[Pubkey]) -> Instruction:
    """The layout ``TransferChecked`` and ``ApproveChecked`` share: op, amount, decimals;
    then source (writable), mint, the op's own account, the authority and its signers."""
    data = struct.pack("<BQB", op, amount, decimals)
    metas = [AccountMeta(source, False, True), AccountMeta(mint, False, False), third]
    metas += _signers_metas(authority, signers)
    return Instruction(TOKEN_PROGRAM_ID, data, metas)


def transfer_checked(
    source: Pubkey,
    mint: Pubkey,
    dest: Pubkey,
    authority: Pubkey,
    amount: int,
    decimals: int,
    multisig_signers: list[Pubkey] | None = None,
) -> Instruction:
    """Move ``amount`` base units; ``authority`` is the owner, a delegate or a multisig."""
    return _checked(_TRANSFER_CHECKED, source, mint, AccountMeta(dest, False, True), authority,
                    amount, decimals, multisig_signers or [])


def transfer_unchecked(source: Pubkey, dest: Pubkey, authority: Pubkey, amount: int) -> Instruction:
    """Plain ``Transfer`` (what many wallets send); kept so scanners are tested against it."""
    data = struct.pack("<BQ", _TRANSFER, amount)
    metas = [AccountMeta(source, False, True), AccountMeta(dest, False, True)]
    metas += _signers_metas(authority, [])
    return Instruction(TOKEN_PROGRAM_ID, data, metas)


def approve_checked(
    source: Pubkey, mint: Pubkey, delegate: Pubkey, owner: Pubkey, amount: int, decimals: int
) -> Instruction:
    return _checked(_APPROVE_CHECKED, source, mint, AccountMeta(delegate, False, False), owner,
                    amount, decimals, [])


def revoke(source: Pubkey, owner: Pubkey) -> Instruction:
    metas = [AccountMeta(source, False, True)] + _signers_metas(owner, [])
    return Instruction(TOKEN_PROGRAM_ID, bytes([_REVOKE]), metas)


def associated_token_address(owner: Pubkey, mint: Pubkey) -> Pubkey:
    return Pubkey.find_program_address(
        [bytes(owner), bytes(TOKEN_PROGRAM_ID), bytes(mint)], ASSOCIATED_TOKEN_PROGRAM_ID
    )[0]


def ata_bump(owner: Pubkey, mint: Pubkey) -> int:
    """The canonical bump of ``owner``'s associated token account (a program checking the
    address is handed it rather than searching for it)."""
    return Pubkey.find_program_address(
        [bytes(owner), bytes(TOKEN_PROGRAM_ID), bytes(mint)], ASSOCIATED_TOKEN_PROGRAM_ID
    )[1]


def create_ata_idempotent(payer: Pubkey, owner: Pubkey, mint: Pubkey) -> Instruction:
    """``CreateIdempotent``: a no-op when the ATA already exists, so retries are safe."""
    metas = [
        AccountMeta(payer, True, True),
        AccountMeta(associated_token_address(owner, mint), False, True),
        AccountMeta(owner, False, False),
        AccountMeta(mint, False, False),
        AccountMeta(SYSTEM_PROGRAM_ID, False, False),
        AccountMeta(TOKEN_PROGRAM_ID, False, False),
    ]
    return Instruction(ASSOCIATED_TOKEN_PROGRAM_ID, b"\x01", metas)


def memo(text: str, signers: list[Pubkey] | None = None) -> Instruction:
    """Memo v2; listed signers must sign, which attributes the memo to them."""
    data = text.encode("utf-8")
    if len(data) > 566:
        raise ValueError("memo too long for one transaction")
    metas = [AccountMeta(s, True, False) for s in signers or []]
    return Instruction(MEMO_PROGRAM_ID, data, metas)


def seeded_address(base: Pubkey, seed: str, owner: Pubkey = TOKEN_PROGRAM_ID) -> Pubkey:
    return Pubkey.create_with_seed(base, seed, owner)


def create_seeded_account(
    payer: Pubkey,
    base: Pubkey,
    seed: str,
    lamports: int,
    space: int,
    owner: Pubkey = TOKEN_PROGRAM_ID,
) -> Instruction:
    """System ``CreateAccountWithSeed``: a deterministic address, no throwaway keypair."""
    return create_account_with_seed(
        CreateAccountWithSeedParams(
            from_pubkey=payer,
            to_pubkey=seeded_address(base, seed, owner),
            base=base,
            seed=seed,
            lamports=lamports,
            space=space,
            owner=owner,
        )
    )


def sol_transfer(source: Pubkey, dest: Pubkey, lamports: int) -> Instruction:
    return system_transfer(TransferParams(from_pubkey=source, to_pubkey=dest, lamports=lamports))


def short_seed(prefix: str, *keys: Pubkey) -> str:
    """A create-with-seed seed (<= 32 chars) naming ``keys``: prefix + 128-bit digest."""
    digest = hashlib.sha256(b"".join(bytes(k) for k in keys)).hexdigest()[: 32 - len(prefix)]
    return prefix + digest


# ---------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class TokenAccount:
    mint: Pubkey
    owner: Pubkey
    amount: int
    delegate: Pubkey | None
    state: int  # 0 uninitialized, 1 initialized, 2 frozen
    delegated_amount: int
    close_authority: Pubkey | None


def parse_token_account(data: bytes) -> TokenAccount:
    if len(data) < TOKEN_ACCOUNT_SIZE:
        raise ValueError("not an SPL token account")
    mint, owner = Pubkey.from_bytes(data[0:32]), Pubkey.from_bytes(data[32:64])
    (amount,) = struct.unpack_from("<Q", data, 64)
    (has_delegate,) = struct.unpack_from("<I", data, 72)
    delegate = Pubkey.from_bytes(data[76:108]) if has_delegate else None
    state = data[108]
    (delegated,) = struct.unpack_from("<Q", data, 121)
    (has_close,) = struct.unpack_from("<I", data, 129)
    close = Pubkey.from_bytes(data[133:165]) if has_close else None
    return TokenAccount(mint, owner, amount, delegate, state, delegated, close)


@dataclass(frozen=True)
class Mint:
    mint_authority: Pubkey | None
    supply: int
    decimals: int
    is_initialized: bool
    freeze_authority: Pubkey | None


def parse_mint(data: bytes) -> Mint:
    if len(data) < MINT_SIZE:
        raise ValueError("not an SPL mint")
    (has_auth,) = struct.unpack_from("<I", data, 0)
    (supply,) = struct.unpack_from("<Q", data, 36)
    (has_freeze,) = struct.unpack_from("<I", data, 46)
    return Mint(
        Pubkey.from_bytes(data[4:36]) if has_auth else None,
        supply,
        data[44],
        bool(data[45]),
        Pubkey.from_bytes(data[50:82]) if has_freeze else None,
    )


@dataclass(frozen=True)
class Multisig:
    m: int
    n: int
    signers: list[Pubkey]


def parse_multisig(data: bytes) -> Multisig:
    if len(data) < MULTISIG_SIZE:
        raise ValueError("not an SPL multisig")
    m, n = data[0], data[1]
    signers = [Pubkey.from_bytes(data[3 + 32 * i : 35 + 32 * i]) for i in range(n)]
    return Multisig(m, n, signers)


def memos_of(message: Message | MessageV0) -> list[str]:
    """The texts of a message's Memo-program instructions, in order."""
    keys = list(message.account_keys)
    out = []
    for ix in message.instructions:
        if keys[ix.program_id_index] == MEMO_PROGRAM_ID:
            out.append(bytes(ix.data).decode("utf-8", errors="replace"))
    return out


def format_memo_field(memos: list[str]) -> str | None:
    """getSignaturesForAddress's ``memo``: ``[len] text`` per memo, joined by ``; ``."""
    if not memos:
        return None
    return "; ".join(f"[{len(m.encode())}] {m}" for m in memos)
