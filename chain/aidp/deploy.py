"""Deploying a program through the upgradeable BPF loader, as on any cluster: a buffer
account written in chunks, then ``DeployWithMaxDataLen``, which checks the ELF strictly
and makes the ``ProgramData`` account that names the upgrade authority.

The loader's instructions are bincode (a u32 tag, then the fields, vectors with a u64
length); only the three a deploy needs are built here. ``send`` is the caller's way of
landing one transaction (instructions, extra signers): a ledger, or LiteSVM in tests.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.system_program import CreateAccountParams, create_account

LOADER_ID = Pubkey.from_string("BPFLoaderUpgradeab1e11111111111111111111111")
RENT_SYSVAR = Pubkey.from_string("SysvarRent111111111111111111111111111111111")
CLOCK_SYSVAR = Pubkey.from_string("SysvarC1ock11111111111111111111111111111111")
SYSTEM_PROGRAM = Pubkey.default()
BUFFER_HEADER = 37  # enum tag u32 + Option<Pubkey> authority
PROGRAM_SIZE = 36  # enum tag u32 + the ProgramData address
PROGRAMDATA_HEADER = 45  # tag u32 + slot u64 + Option<Pubkey> upgrade authority
CHUNK = 900  # bytes of the ELF per Write transaction (fits 1,232 with its signatures)

Send = Callable[[list[Instruction], list[Keypair]], Any]
Rent = Callable[[int], int]


def programdata_address(program_id: Pubkey) -> Pubkey:
    return Pubkey.find_program_address([bytes(program_id)], LOADER_ID)[0]


def upgrade_authority(programdata: bytes) -> Pubkey | None:
    """The upgrade authority a ``ProgramData`` account names (None: immutable)."""
    tag, _slot, has = struct.unpack_from("<IQB", programdata)
    if tag != 3:
        raise ValueError("not a ProgramData account")
    return Pubkey.from_bytes(programdata[13:45]) if has else None


Step = tuple[list[Instruction], list[Keypair]]


def make_immutable(program_id: Pubkey, authority: Pubkey) -> Instruction:
    """The loader's ``SetAuthority`` to none: nobody can upgrade the program again (the
    market program takes funds only then: an upgrade could replace its every rule)."""
    return Instruction(LOADER_ID, struct.pack("<I", 4), [
        AccountMeta(programdata_address(program_id), False, True),
        AccountMeta(authority, True, False)])


def deploy_steps(elf: bytes, payer: Keypair, program: Keypair, buffer: Keypair,
                 buffer_rent: int, program_rent: int) -> list[Step]:
    """The transactions of a deploy, in order (instructions, signers beyond the payer)."""
    buffer_size = BUFFER_HEADER + len(elf)
    steps: list[Step] = [([create_account(CreateAccountParams(
        from_pubkey=payer.pubkey(), to_pubkey=buffer.pubkey(), lamports=buffer_rent,
        space=buffer_size, owner=LOADER_ID)),
        Instruction(LOADER_ID, struct.pack("<I", 0), [  # InitializeBuffer
            AccountMeta(buffer.pubkey(), False, True),
            AccountMeta(payer.pubkey(), False, False)])], [buffer])]
    for offset in range(0, len(elf), CHUNK):
        chunk = elf[offset:offset + CHUNK]
        steps.append(([Instruction(LOADER_ID, struct.pack("<IIQ", 1, offset, len(chunk))
                                   + chunk, [AccountMeta(buffer.pubkey(), False, True),
                                             AccountMeta(payer.pubkey(), True, False)])],
                      []))  # Write
    programdata = programdata_address(program.pubkey())
    steps.append(([create_account(CreateAccountParams(
        from_pubkey=payer.pubkey(), to_pubkey=program.pubkey(), lamports=program_rent,
        space=PROGRAM_SIZE, owner=LOADER_ID)),
        Instruction(LOADER_ID, struct.pack("<IQ", 2, len(elf)), [  # DeployWithMaxDataLen
            AccountMeta(payer.pubkey(), True, True),
            AccountMeta(programdata, False, True),
            AccountMeta(program.pubkey(), False, True),
            AccountMeta(buffer.pubkey(), False, True),
            AccountMeta(RENT_SYSVAR, False, False),
            AccountMeta(CLOCK_SYSVAR, False, False),
            AccountMeta(SYSTEM_PROGRAM, False, False),
            AccountMeta(payer.pubkey(), True, False)])], [program]))
    return steps


def deploy(elf: bytes, payer: Keypair, send: Send, rent: Rent,
           program: Keypair | None = None) -> Pubkey:
    """Deploy ``elf`` with ``payer`` as fee payer and upgrade authority, one transaction
    at a time through ``send``; returns the program id (``program``'s key)."""
    program = program or Keypair()
    for instructions, signers in deploy_steps(elf, payer, program, Keypair(),
                                              rent(BUFFER_HEADER + len(elf)),
                                              rent(PROGRAM_SIZE)):
        send(instructions, signers)
    return program.pubkey()


async def deploy_to(ledger: Any, elf: bytes, payer: Keypair,
                    program: Keypair | None = None) -> Pubkey:
    """The same through a ``chain.ledger`` backend (in-process or any RPC URL)."""
    program = program or Keypair()
    buffer_rent = await ledger.minimum_balance_for_rent_exemption(BUFFER_HEADER + len(elf))
    program_rent = await ledger.minimum_balance_for_rent_exemption(PROGRAM_SIZE)
    for instructions, signers in deploy_steps(elf, payer, program, Keypair(), buffer_rent,
                                              program_rent):
        await ledger.execute(instructions, payer, signers)
    return program.pubkey()


__all__ = ["LOADER_ID", "deploy", "deploy_steps", "deploy_to", "make_immutable",
           "programdata_address", "upgrade_authority"]
