"""Slashing on evidence: a case opened on a receipt, then a verdict signed by a quorum.

Two transactions, each small enough for Solana's 1,232 bytes at the program's bounds:

1. ``open_case`` (market authority): the Ed25519 precompile checks the node's signature
   on the receipt hash, and the program checks the receipt's Merkle proof against a root
   it anchored itself. The case holds the node's withdrawal for one challenge period.
2. ``slash`` (anyone): the precompile checks m distinct verifier signatures on the
   verdict (program, receipt, node, amount, refund, refund account, nonce); the program
   pays the refund and the rest to the treasury out of the vault, once per receipt.

``acquit`` closes a case early on a quorum's acquittal.
"""

from __future__ import annotations

from dataclasses import dataclass

from solders.instruction import Instruction
from solders.pubkey import Pubkey
from solders.signature import Signature

from chain import spl
from chain.aidp import program
from chain.aidp.config import ChainConfig
from chain.aidp.stake import stake_for
from chain.ledger.base import Ledger
from protocol.merkle import ProofStep

#: the program's ``SlashCase.state`` values
CASE_STATES = {0: "open", 1: "slashed", 2: "closed"}


@dataclass(frozen=True)
class Evidence:
    """What opens a case: the node's signed receipt and where it was anchored."""

    receipt_hash: bytes
    node: Pubkey
    node_signature: Signature
    root: bytes
    proof: list[ProofStep]

    @property
    def lefts(self) -> int:
        """The proof's sides as the program reads them: bit i set when step i's sibling
        sits on the left."""
        return sum(1 << i for i, step in enumerate(self.proof) if step.side == "left")


def open_case_instructions(cfg: ChainConfig, evidence: Evidence) -> list[Instruction]:
    pid = cfg.program_pk
    message = program.receipt_message(evidence.receipt_hash)
    node_signed = program.ed25519_instruction(
        [(evidence.node, evidence.node_signature, message)])
    opened = program.instruction(pid, "openCase", {
        "config": cfg.program_config, "authority": cfg.market_pk,
        "anchor": program.anchor_address(pid, evidence.root),
        "stake": stake_for(cfg, evidence.node).address_pk,
        "case": program.case_address(pid, evidence.receipt_hash),
        "instructions": program.INSTRUCTIONS_SYSVAR_ID,
        "systemProgram": program.SYSTEM_PROGRAM_ID},
        receiptHash=evidence.receipt_hash, lefts=evidence.lefts,
        proof=[bytes.fromhex(step.sibling) for step in evidence.proof])
    return [node_signed, opened]


@dataclass(frozen=True)
class Verdict:
    """A slash the verifiers sign: exactly the fields the program rebuilds."""

    receipt_hash: bytes
    node: Pubkey
    amount: int
    refund: int
    refund_account: Pubkey
    nonce: int

    def message(self, cfg: ChainConfig) -> bytes:
        return program.verdict_message(cfg.program_pk, self.receipt_hash, self.node,
                                       self.amount, self.refund, self.refund_account,
                                       self.nonce)


def slash_instructions(cfg: ChainConfig, verdict: Verdict,
                       signatures: list[tuple[Pubkey, Signature]]) -> list[Instruction]:
    """The verifiers' signatures (one shared message) and the slash they allow."""
    pid, stake = cfg.program_pk, stake_for(cfg, verdict.node)
    message = verdict.message(cfg)
    signed = program.ed25519_instruction([(key, sig, message) for key, sig in signatures])
    slashed = program.instruction(pid, "slash", {
        "config": cfg.program_config,
        "case": program.case_address(pid, verdict.receipt_hash),
        "stake": stake.address_pk, "vault": stake.vault_pk,
        "refund": verdict.refund_account, "treasury": cfg.treasury_pk,
        "instructions": program.INSTRUCTIONS_SYSVAR_ID,
        "tokenProgram": spl.TOKEN_PROGRAM_ID},
        amount=verdict.amount, refund=verdict.refund, nonce=verdict.nonce)
    return [signed, slashed]


def acquit_instructions(cfg: ChainConfig, receipt_hash: bytes, node: Pubkey, nonce: int,
                        signatures: list[tuple[Pubkey, Signature]]) -> list[Instruction]:
    """Close a case before its period ends on a quorum's acquittal (an empty list: close
    an expired case, which anyone may)."""
    pid = cfg.program_pk
    closed = program.instruction(pid, "closeCase", {
        "config": cfg.program_config, "case": program.case_address(pid, receipt_hash),
        "stake": stake_for(cfg, node).address_pk,
        "instructions": program.INSTRUCTIONS_SYSVAR_ID}, nonce=nonce)
    if not signatures:
        return [closed]
    message = program.acquittal_message(pid, receipt_hash, node, nonce)
    return [program.ed25519_instruction([(k, s, message) for k, s in signatures]), closed]


@dataclass(frozen=True)
class Case:
    receipt_hash: bytes
    operator: Pubkey
    root: bytes
    opened_at: int
    state: str
    amount: int


async def read_case(ledger: Ledger, cfg: ChainConfig, receipt_hash: bytes) -> Case | None:
    account = await ledger.get_account(program.case_address(cfg.program_pk, receipt_hash))
    if account is None or account.owner != cfg.program_pk:
        return None
    f = program.decode_account("SlashCase", bytes(account.data))
    return Case(f["receiptHash"], f["operator"], f["root"], f["openedAt"],
                CASE_STATES.get(f["state"], str(f["state"])), f["amount"])
