"""The ``aidp_market`` program on LiteSVM, built from source here (clang-19 and
``programs/link.py``): every instruction's success path and each refusal Anchor would
have generated (signer, owner, PDA, discriminator, duplicate accounts, arguments), and
the IDL against the code (sizes, discriminators)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.litesvm import LiteSVM
from solders.message import Message
from solders.pubkey import Pubkey
from solders.system_program import CreateAccountParams, TransferParams, create_account, transfer
from solders.transaction import VersionedTransaction

from chain import spl
from chain.aidp import program as client
from chain.aidp.deploy import deploy, make_immutable, programdata_address
from programs.link import LinkError, link

ERRORS = {e["name"]: e["code"] for e in client.idl()["errors"]}




class Chain:
    """One LiteSVM with the program deployed, a payer, an AIDP-like mint and treasury."""

    def __init__(self, program: bytes) -> None:
        self.svm = LiteSVM()
        self.authority = self.funded(10**11)
        # the real deploy path (the loader checks the ELF as a cluster does); the deployer
        # is the upgrade authority, the only one who may initialise the program
        self.program_id = deploy(program, self.authority, self._deploy_step,
                                 self.svm.minimum_balance_for_rent_exemption)
        self.svm.warp_to_slot(self.svm.get_clock().slot + 1)
        self.mint = self.new_mint(self.authority)
        self.treasury = self.token_account(self.mint, self.authority.pubkey())
        self.config = client.config_address(self.program_id)

    def _deploy_step(self, instructions: list[Any], signers: list[Keypair]) -> None:
        self.ok(self.send(instructions, self.authority, *signers))

    def funded(self, lamports: int = 10**10) -> Keypair:
        key = Keypair()
        self.svm.airdrop(key.pubkey(), lamports)
        return key

    def send(self, instructions: list[Any], payer: Keypair, *signers: Keypair) -> Any:
        message = Message.new_with_blockhash(instructions, payer.pubkey(),
                                             self.svm.latest_blockhash())
        tx = VersionedTransaction(message, [payer, *signers])
        result = self.svm.send_transaction(tx)
        self.svm.expire_blockhash()
        return result

    def new_mint(self, authority: Keypair) -> Pubkey:
        mint = Keypair()
        rent = self.svm.minimum_balance_for_rent_exemption(82)
        self.ok(self.send([create_account(CreateAccountParams(
            from_pubkey=authority.pubkey(), to_pubkey=mint.pubkey(), lamports=rent, space=82,
            owner=spl.TOKEN_PROGRAM_ID)), spl.initialize_mint2(mint.pubkey(), 6,
                                                                authority.pubkey())],
            authority, mint))
        return mint.pubkey()

    def token_account(self, mint: Pubkey, owner: Pubkey) -> Pubkey:
        account = Keypair()
        rent = self.svm.minimum_balance_for_rent_exemption(165)
        self.ok(self.send([create_account(CreateAccountParams(
            from_pubkey=self.authority.pubkey(), to_pubkey=account.pubkey(), lamports=rent,
            space=165, owner=spl.TOKEN_PROGRAM_ID)),
            spl.initialize_account3(account.pubkey(), mint, owner)], self.authority, account))
        return account.pubkey()

    @staticmethod
    def ok(result: Any) -> Any:
        assert not hasattr(result, "err"), (result.err(), result.meta().logs())
        return result

    @staticmethod
    def code(result: Any) -> int | None:
        """The program's error code (None: it succeeded)."""
        if not hasattr(result, "err"):
            return None
        text = str(result.err())
        marker = "InstructionErrorCustom("
        assert marker in text, text
        return int(text.split(marker)[1].split(")")[0])

    def initialize(self, signer: Keypair | None = None, **changes: Any) -> Any:
        signer = signer or self.authority
        verifiers = changes.pop("verifiers", [Keypair().pubkey() for _ in range(5)])
        args = {"feeBps": 1000, "quorum": 3, "verifiers": verifiers, "minStake": 10_000_000,
                "unbondingPeriod": 7 * 86400, "maxSlashPerReceipt": 5_000_000,
                "challengePeriod": 86400}
        accounts = {"config": self.config, "authority": signer.pubkey(), "mint": self.mint,
                    "treasury": self.treasury, "systemProgram": client.SYSTEM_PROGRAM_ID,
                    "programData": programdata_address(self.program_id)}
        accounts.update(changes.pop("accounts", {}))
        args.update(changes)
        ix = client.instruction(self.program_id, "initialize", accounts, **args)
        return self.send([ix], signer)

    def anchor(self, root: bytes, leaves: int = 4, signer: Keypair | None = None,
               **accounts: Pubkey) -> Any:
        signer = signer or self.authority
        metas = {"config": self.config, "authority": signer.pubkey(),
                 "anchor": client.anchor_address(self.program_id, root),
                 "systemProgram": client.SYSTEM_PROGRAM_ID, **accounts}
        ix = client.instruction(self.program_id, "anchorRoot", metas, root=root,
                                leafCount=leaves)
        return self.send([ix], signer)

    def make_immutable(self) -> None:
        """Give up the upgrade authority: the program takes funds only then."""
        self.ok(self.send([make_immutable(self.program_id, self.authority.pubkey())],
                          self.authority))

    def ata(self, owner: Pubkey) -> Pubkey:
        self.ok(self.send([spl.create_ata_idempotent(self.authority.pubkey(), owner,
                                                     self.mint)], self.authority))
        return spl.associated_token_address(owner, self.mint)

    def data(self, address: Pubkey) -> bytes:
        account = self.svm.get_account(address)
        assert account is not None
        return bytes(account.data)


@pytest.fixture
def chain(aidp_program: bytes) -> Chain:
    return Chain(aidp_program)


def test_initialize_writes_the_config_the_idl_describes(chain: Chain) -> None:
    verifiers = [Keypair().pubkey() for _ in range(5)]
    result = chain.ok(chain.initialize(verifiers=verifiers))
    data = chain.data(chain.config)
    assert len(data) == client.account_size("MarketConfig")  # the C layout is the IDL's
    config = client.MarketConfig.decode(data)
    assert config.authority == chain.authority.pubkey() and config.mint == chain.mint
    assert config.treasury == chain.treasury and config.verifiers == verifiers
    assert (config.fee_bps, config.quorum, config.min_stake) == (1000, 3, 10_000_000)
    assert config.unbonding_period == 7 * 86400 and config.max_slash_per_receipt == 5_000_000
    assert config.challenge_period == 86400
    owner = chain.svm.get_account(chain.config).owner
    assert owner == chain.program_id
    assert result.compute_units_consumed() < 20_000


def test_a_config_is_created_once_by_the_deployer(chain: Chain) -> None:
    front_runner = chain.funded()
    assert chain.code(chain.initialize(front_runner)) == ERRORS["Unauthorized"]
    fake = Keypair().pubkey()  # a ProgramData look-alike
    assert chain.code(chain.initialize(accounts={"programData": fake})) == \
        ERRORS["InvalidAccount"]
    chain.ok(chain.initialize())
    assert chain.code(chain.initialize()) == ERRORS["AlreadyExists"]


def test_accounts_are_funded_with_exactly_their_rent_exemption(chain: Chain) -> None:
    """The program reads the Rent sysvar's threshold (an f64) without floating point: the
    accounts it creates hold the runtime's own rent-exempt minimum, no more."""
    chain.ok(chain.initialize())
    chain.ok(chain.anchor(b"\x05" * 32))
    for address in (chain.config, client.anchor_address(chain.program_id, b"\x05" * 32)):
        account = chain.svm.get_account(address)
        assert account.lamports == chain.svm.minimum_balance_for_rent_exemption(
            len(account.data))


def test_lamports_sent_to_the_config_address_first_do_not_block_it(chain: Chain) -> None:
    griefer = chain.funded()
    lamports = chain.svm.minimum_balance_for_rent_exemption(0)  # the least it may hold
    chain.ok(chain.send([transfer(TransferParams(from_pubkey=griefer.pubkey(),
                                                 to_pubkey=chain.config, lamports=lamports))],
                        griefer))
    chain.ok(chain.initialize())
    assert client.MarketConfig.decode(chain.data(chain.config)).quorum == 3


@pytest.mark.parametrize("change, error", [
    ({"quorum": 6}, "InvalidArgument"),  # more than the verifiers
    ({"quorum": 0}, "InvalidArgument"),
    ({"feeBps": 10_001}, "InvalidArgument"),
    ({"unbondingPeriod": -1}, "InvalidArgument"),
    ({"unbondingPeriod": 11 * 365 * 86400}, "InvalidArgument"),
    ({"challengePeriod": 0}, "InvalidArgument"),
    ({"challengePeriod": 31 * 86400}, "InvalidArgument"),
    ({"quorum": 5, "verifiers": [Pubkey.new_unique() for _ in range(8)]}, "InvalidArgument"),
    ({"verifiers": []}, "InvalidArgument"),
    ({"verifiers": [Pubkey.new_unique()] * 9}, "InvalidArgument"),  # over 8
])
def test_initialize_refuses_arguments_out_of_range(chain: Chain, change: dict,
                                                   error: str) -> None:
    assert chain.code(chain.initialize(**change)) == ERRORS[error]


def test_initialize_refuses_twice_the_same_verifier(chain: Chain) -> None:
    same = Keypair().pubkey()
    assert chain.code(chain.initialize(verifiers=[same, same], quorum=2)) == \
        ERRORS["InvalidArgument"]


def test_initialize_refuses_accounts_that_are_not_what_they_claim(chain: Chain) -> None:
    other_mint = chain.new_mint(chain.authority)
    foreign_treasury = chain.token_account(other_mint, chain.authority.pubkey())
    cases = [
        {"config": Keypair().pubkey()},  # not the config PDA
        {"treasury": foreign_treasury},  # a token account of another mint
        {"mint": chain.funded().pubkey()},  # not a mint at all (system-owned)
        {"treasury": other_mint},  # a mint where a token account belongs
        {"systemProgram": spl.TOKEN_PROGRAM_ID},
    ]
    for accounts in cases:
        assert chain.code(chain.initialize(accounts=accounts)) == ERRORS["InvalidAccount"], \
            accounts
    assert chain.code(chain.initialize(accounts={"treasury": chain.mint,
                                                 "mint": chain.mint})) == \
        ERRORS["DuplicateAccount"]


def test_a_root_is_anchored_once_by_the_authority_only(chain: Chain) -> None:
    chain.ok(chain.initialize())
    root = bytes(range(32))
    result = chain.ok(chain.anchor(root, leaves=7))
    data = chain.data(client.anchor_address(chain.program_id, root))
    assert len(data) == client.account_size("ReceiptAnchor")
    anchor = client.decode_account("ReceiptAnchor", data)
    assert anchor["root"] == root and anchor["leafCount"] == 7
    assert anchor["slot"] == chain.svm.get_clock().slot
    assert result.compute_units_consumed() < 20_000
    assert chain.code(chain.anchor(root)) == ERRORS["AlreadyExists"]
    assert chain.code(chain.anchor(bytes(32), signer=chain.funded())) == ERRORS["Unauthorized"]
    assert chain.code(chain.anchor(bytes(32), leaves=0)) == ERRORS["InvalidArgument"]


def test_anchor_root_refuses_substituted_accounts(chain: Chain) -> None:
    chain.ok(chain.initialize())
    root = b"\x07" * 32
    # a config look-alike: another program's account, or an account of this program's
    # of another type (an anchor where the config belongs)
    chain.ok(chain.anchor(b"\x01" * 32))
    look_alike = client.anchor_address(chain.program_id, b"\x01" * 32)
    assert chain.code(chain.anchor(root, config=look_alike)) == ERRORS["InvalidAccount"]
    assert chain.code(chain.anchor(root, config=chain.treasury)) == ERRORS["InvalidAccount"]
    assert chain.code(chain.anchor(root, anchor=Keypair().pubkey())) == ERRORS["InvalidAccount"]
    assert chain.code(chain.anchor(root, anchor=chain.config)) == ERRORS["DuplicateAccount"]


def test_every_instruction_of_the_idl_reaches_its_handler(chain: Chain) -> None:
    """The IDL and the program agree on every instruction: each discriminator is
    dispatched (no accounts: its handler refuses them, not the dispatcher), and every
    account type the IDL names is one the tests above decoded at its size."""
    for spec in client.idl()["instructions"]:
        ix = Instruction(chain.program_id, client.instruction_discriminator(spec["name"]), [])
        code = chain.code(chain.send([ix], chain.authority))
        assert code not in (None, ERRORS["UnknownInstruction"]), spec["name"]
    names = {a["name"] for a in client.idl()["accounts"]}
    assert names == {"MarketConfig", "NodeStake", "ReceiptAnchor", "SlashCase", "Payouts"}
    assert {e["code"] for e in client.idl()["errors"]} == set(range(6000, 6000 + len(ERRORS)))
    import re

    source = (Path(client.IDL_PATH).parent / "aidp_market.c").read_text()
    defined = {name: int(code) for name, code in
               re.findall(r"#define ERR_([A-Z_]+) (\d+)", source)}
    assert defined == {client.snake(name).upper(): code for name, code in ERRORS.items()}


def test_an_instruction_the_idl_does_not_name_is_refused(chain: Chain) -> None:
    ix = Instruction(chain.program_id, b"\x00" * 8, [])
    assert chain.code(chain.send([ix], chain.authority)) == ERRORS["UnknownInstruction"]
    short = Instruction(chain.program_id, b"\x01", [])
    assert chain.code(chain.send([short], chain.authority)) == ERRORS["UnknownInstruction"]


# ---- stake ---------------------------------------------------------------------------------

PERIOD = 7 * 86400


class Staking:
    """An initialised market (3 of 5 verifiers), an operator with 1,000 tokens of the
    mint, and helpers."""

    def __init__(self, chain: Chain, quorum: int = 3, verifiers: int = 5) -> None:
        self.chain = chain
        self.verifiers = [Keypair() for _ in range(verifiers)]
        chain.ok(chain.initialize(unbondingPeriod=PERIOD, quorum=quorum,
                                  verifiers=[v.pubkey() for v in self.verifiers]))
        chain.make_immutable()
        self.operator = chain.funded()
        self.wallet = chain.token_account(chain.mint, self.operator.pubkey())
        chain.ok(chain.send([spl.mint_to_checked(chain.mint, self.wallet,
                                                 chain.authority.pubkey(), 1_000, 6)],
                            chain.authority))
        self.stake = client.stake_address(chain.program_id, self.operator.pubkey())
        self.vault = client.vault_address(chain.program_id, self.operator.pubkey())

    def call(self, name: str, signer: Keypair | None = None, **changes: Any) -> Any:
        signer = signer or self.operator
        accounts = {"config": self.chain.config, "operator": signer.pubkey(),
                    "stake": self.stake, "vault": self.vault, "mint": self.chain.mint,
                    "source": self.wallet, "destination": self.wallet,
                    "tokenProgram": spl.TOKEN_PROGRAM_ID,
                    "systemProgram": client.SYSTEM_PROGRAM_ID,
                    "programData": programdata_address(self.chain.program_id)}
        args = {k: changes.pop(k) for k in list(changes) if k == "amount"}
        accounts.update(changes)
        ix = client.instruction(self.chain.program_id, name, accounts, **args)
        return self.chain.send([ix], signer)

    def tokens(self, account: Pubkey) -> int:
        return spl.parse_token_account(self.chain.data(account)).amount

    def state(self) -> dict[str, Any]:
        return client.decode_account("NodeStake", self.chain.data(self.stake))

    def later(self, seconds: int) -> None:
        clock = self.chain.svm.get_clock()
        clock.unix_timestamp = clock.unix_timestamp + seconds
        self.chain.svm.set_clock(clock)


@pytest.fixture
def staking(chain: Chain) -> Staking:
    return Staking(chain)


def test_stake_sits_in_a_vault_only_the_program_controls(staking: Staking) -> None:
    chain = staking.chain
    chain.ok(staking.call("registerStake"))
    vault = spl.parse_token_account(chain.data(staking.vault))
    assert vault.owner == staking.stake and vault.mint == chain.mint  # authority: the PDA
    chain.ok(staking.call("stake", amount=600))
    assert staking.tokens(staking.vault) == 600 and staking.tokens(staking.wallet) == 400
    assert staking.state()["staked"] == 600
    assert chain.code(staking.call("registerStake")) == ERRORS["AlreadyExists"]
    # the market authority has no way to move it: not as the operator, not by token
    # transfer (the vault's authority is a PDA only the program signs for)
    market = chain.authority
    assert chain.code(staking.call("withdraw", signer=market)) == ERRORS["Unauthorized"]
    assert chain.code(staking.call("requestUnbond", signer=market, amount=1)) == \
        ERRORS["Unauthorized"]
    steal = spl.transfer_unchecked(staking.vault, chain.treasury, market.pubkey(), 600)
    assert hasattr(chain.send([steal], market), "err")
    assert staking.tokens(staking.vault) == 600


def test_unbonding_waits_its_period_then_the_operator_alone_withdraws(staking: Staking) -> None:
    chain = staking.chain
    chain.ok(staking.call("registerStake"))
    chain.ok(staking.call("stake", amount=500))
    assert chain.code(staking.call("withdraw")) == ERRORS["Insufficient"]  # nothing unbonding
    assert chain.code(staking.call("requestUnbond", amount=501)) == ERRORS["Insufficient"]
    chain.ok(staking.call("requestUnbond", amount=200))
    assert chain.code(staking.call("withdraw")) == ERRORS["NotYet"]
    staking.later(PERIOD - 10)
    assert chain.code(staking.call("withdraw")) == ERRORS["NotYet"]
    staking.later(10)
    other_mint_account = chain.token_account(chain.new_mint(chain.authority),
                                             staking.operator.pubkey())
    assert chain.code(staking.call("withdraw", destination=other_mint_account)) == \
        ERRORS["InvalidAccount"]
    chain.ok(staking.call("withdraw"))
    assert staking.tokens(staking.vault) == 300 and staking.tokens(staking.wallet) == 700
    state = staking.state()
    assert (state["staked"], state["unbonding"]) == (300, 0)
    assert chain.code(staking.call("withdraw")) == ERRORS["Insufficient"]  # once


def test_one_operators_stake_is_not_anothers(staking: Staking) -> None:
    chain = staking.chain
    chain.ok(staking.call("registerStake"))
    chain.ok(staking.call("stake", amount=100))
    intruder = chain.funded()
    # signing as itself with the victim's accounts
    assert chain.code(staking.call("requestUnbond", signer=intruder, amount=1)) == \
        ERRORS["Unauthorized"]
    # the victim's stake with another vault, or a look-alike account as the stake
    fake_vault = chain.token_account(chain.mint, staking.operator.pubkey())
    assert chain.code(staking.call("stake", amount=1, vault=fake_vault)) == \
        ERRORS["InvalidAccount"]
    assert chain.code(staking.call("stake", amount=1, stake=chain.config)) == \
        ERRORS["InvalidAccount"]
    assert chain.code(staking.call("stake", amount=0)) == ERRORS["InvalidArgument"]
    # registering at addresses that are not the operator's PDAs
    assert chain.code(staking.call("registerStake", signer=intruder)) == \
        ERRORS["InvalidAccount"]


# ---- slashing on evidence -----------------------------------------------------------------


class Case:
    """A node with 500 staked, a batch of receipts anchored, one of them the node's."""

    def __init__(self, staking: Staking, leaves: int = 6, index: int = 3) -> None:
        from protocol import merkle

        self.staking, self.chain = staking, staking.chain
        self.chain.ok(staking.call("registerStake"))
        self.chain.ok(staking.call("stake", amount=500))
        self.hashes = [os.urandom(32).hex() for _ in range(leaves)]
        self.receipt = bytes.fromhex(self.hashes[index])
        self.root = bytes.fromhex(merkle.merkle_root(self.hashes))
        self.proof = merkle.inclusion_proof(self.hashes, index)
        self.chain.ok(self.chain.anchor(self.root, leaves=leaves))
        self.buyer = self.chain.token_account(self.chain.mint, self.chain.funded().pubkey())
        self.address = client.case_address(self.chain.program_id, self.receipt)

    def sibling(self, index: int) -> Case:
        """Another receipt of the same node in the same anchored batch."""
        from copy import copy

        from protocol import merkle

        other = copy(self)
        other.receipt = bytes.fromhex(self.hashes[index])
        other.proof = merkle.inclusion_proof(self.hashes, index)
        other.address = client.case_address(self.chain.program_id, other.receipt)
        return other

    def node_signature(self, signer: Keypair | None = None) -> Instruction:
        key = signer or self.staking.operator
        message = client.receipt_message(self.receipt)
        return client.ed25519_instruction([(key.pubkey(), key.sign_message(message), message)])

    def open(self, evidence: Instruction | None = None, root: bytes | None = None,
             signer: Keypair | None = None) -> Any:
        signer = signer or self.chain.authority
        proof = self.proof
        lefts = sum(1 << i for i, step in enumerate(proof) if step.side == "left")
        ix = client.instruction(self.chain.program_id, "openCase", {
            "config": self.chain.config, "authority": signer.pubkey(),
            "anchor": client.anchor_address(self.chain.program_id, root or self.root),
            "stake": self.staking.stake, "case": self.address,
            "instructions": client.INSTRUCTIONS_SYSVAR_ID,
            "systemProgram": client.SYSTEM_PROGRAM_ID},
            receiptHash=self.receipt, lefts=lefts,
            proof=[bytes.fromhex(step.sibling) for step in proof])
        evidence = self.node_signature() if evidence is None else evidence
        return self.chain.send([evidence, ix] if evidence else [ix], signer)

    def verdict(self, amount: int, refund: int, nonce: int = 1,
                account: Pubkey | None = None, program: Pubkey | None = None) -> bytes:
        return client.verdict_message(program or self.chain.program_id, self.receipt,
                                      self.staking.operator.pubkey(), amount, refund,
                                      account or self.buyer, nonce)

    def signatures(self, signers: list[Keypair], message: bytes) -> Instruction:
        return client.ed25519_instruction([(k.pubkey(), k.sign_message(message), message)
                                           for k in signers])

    def slash(self, amount: int, refund: int, signers: list[Keypair] | None = None,
              nonce: int = 1, refund_account: Pubkey | None = None,
              message: bytes | None = None, submitter: Keypair | None = None) -> Any:
        signers = self.staking.verifiers[:3] if signers is None else signers
        message = message or self.verdict(amount, refund, nonce, refund_account)
        ix = client.instruction(self.chain.program_id, "slash", {
            "config": self.chain.config, "case": self.address, "stake": self.staking.stake,
            "vault": self.staking.vault, "refund": refund_account or self.buyer,
            "treasury": self.chain.treasury, "instructions": client.INSTRUCTIONS_SYSVAR_ID,
            "tokenProgram": spl.TOKEN_PROGRAM_ID}, amount=amount, refund=refund, nonce=nonce)
        instructions = [self.signatures(signers, message), ix] if signers else [ix]
        return self.chain.send(instructions, submitter or self.chain.funded())

    def close(self, signers: list[Keypair] | None = None, nonce: int = 1) -> Any:
        """Close the case on an acquittal by ``signers`` (a quorum, by default)."""
        signers = self.staking.verifiers[:3] if signers is None else signers
        message = client.acquittal_message(self.chain.program_id, self.receipt,
                                           self.staking.operator.pubkey(), nonce)
        ix = client.instruction(self.chain.program_id, "closeCase", {
            "config": self.chain.config, "case": self.address, "stake": self.staking.stake,
            "instructions": client.INSTRUCTIONS_SYSVAR_ID}, nonce=nonce)
        instructions = [self.signatures(signers, message), ix] if signers else [ix]
        return self.chain.send(instructions, self.chain.funded())

    def state(self) -> dict[str, Any]:
        return client.decode_account("SlashCase", self.chain.data(self.address))


@pytest.fixture
def case(staking: Staking) -> Case:
    return Case(staking)


def test_a_quorum_of_verifiers_slashes_a_receipt_the_node_signed_and_anchored(
        case: Case) -> None:
    chain, staking = case.chain, case.staking
    opened = chain.ok(case.open())
    assert case.state()["operator"] == staking.operator.pubkey()
    assert staking.state()["openCases"] == 1
    treasury_before = staking.tokens(chain.treasury)
    # anyone may submit it: the evidence, not the submitter, moves the stake
    result = chain.ok(case.slash(amount=300, refund=200))
    assert staking.tokens(case.buyer) == 200
    assert staking.tokens(chain.treasury) - treasury_before == 100
    assert staking.tokens(staking.vault) == 200
    state = staking.state()
    assert (state["staked"], state["slashed"], state["openCases"]) == (200, 300, 0)
    assert (case.state()["state"], case.state()["amount"]) == (1, 300)
    assert chain.code(case.slash(amount=1, refund=0)) == ERRORS["CaseClosed"]  # once
    assert chain.code(case.open()) == ERRORS["AlreadyExists"]  # one case per receipt
    assert opened.compute_units_consumed() < 60_000
    assert result.compute_units_consumed() < 60_000


def test_a_slash_needs_a_quorum_of_distinct_verifiers_on_the_exact_verdict(case: Case) -> None:
    chain, verifiers = case.chain, case.staking.verifiers
    chain.ok(case.open())
    no = ERRORS["NoEvidence"]
    assert chain.code(case.slash(300, 200, signers=verifiers[:2])) == no  # short by one
    assert chain.code(case.slash(300, 200, signers=[verifiers[0]] * 3)) == no  # one, thrice
    outsiders = [Keypair(), Keypair()]
    assert chain.code(case.slash(300, 200, signers=verifiers[:2] + outsiders)) == no
    assert chain.code(case.slash(300, 200, signers=[])) == no  # no precompile at all
    # the verdict names amount, refund, refund account and nonce: none can be changed
    assert chain.code(case.slash(300, 250, message=case.verdict(300, 200))) == no
    assert chain.code(case.slash(400, 200, message=case.verdict(300, 200))) == no
    thief = chain.token_account(chain.mint, chain.funded().pubkey())
    assert chain.code(case.slash(300, 200, refund_account=thief,
                                 message=case.verdict(300, 200))) == no
    assert chain.code(case.slash(300, 200, nonce=2, message=case.verdict(300, 200))) == no
    assert case.staking.state()["staked"] == 500  # nothing moved
    chain.ok(case.slash(300, 200, signers=verifiers[2:5]))  # any 3 of the 5


def test_a_forged_signature_fails_the_transaction(case: Case) -> None:
    chain = case.chain
    message = client.receipt_message(case.receipt)
    forged = client.ed25519_instruction([(case.staking.operator.pubkey(),
                                          Keypair().sign_message(message), message)])
    result = case.open(evidence=forged)
    assert hasattr(result, "err") and "InstructionErrorCustom" in str(result.err())
    assert chain.svm.get_account(case.address) is None


def test_a_case_needs_the_nodes_signature_and_an_anchored_root(case: Case) -> None:
    chain = case.chain
    no = ERRORS["NoEvidence"]
    assert chain.code(case.open(evidence=case.node_signature(Keypair()))) == no  # not the node
    assert chain.code(case.open(evidence=False)) == no  # no signature at all
    other_root = os.urandom(32)
    chain.ok(chain.anchor(other_root))
    assert chain.code(case.open(root=other_root)) == no  # the proof is for another root
    assert chain.code(case.open(signer=chain.funded())) == ERRORS["Unauthorized"]
    chain.ok(case.open())


def test_an_open_case_holds_the_stake_until_decided_or_expired(case: Case) -> None:
    chain, staking = case.chain, case.staking
    chain.ok(staking.call("requestUnbond", amount=500))
    staking.later(PERIOD)  # unbonded, but a case opens before the operator withdraws
    chain.ok(case.open())
    assert chain.code(staking.call("withdraw")) == ERRORS["NotYet"]  # the case holds it
    verifiers = staking.verifiers
    assert chain.code(case.close(signers=[])) == ERRORS["NoEvidence"]  # no acquittal
    assert chain.code(case.close(signers=verifiers[:2])) == ERRORS["NoEvidence"]  # 2 of 3
    chain.ok(case.close())
    assert chain.code(case.slash(300, 0)) == ERRORS["CaseClosed"]
    chain.ok(staking.call("withdraw"))
    assert staking.tokens(staking.wallet) == 1_000


def test_an_undecided_case_expires(case: Case) -> None:
    chain, staking = case.chain, case.staking
    chain.ok(staking.call("requestUnbond", amount=500))
    staking.later(PERIOD)
    chain.ok(case.open())
    assert chain.code(staking.call("withdraw")) == ERRORS["NotYet"]
    staking.later(86400)  # the challenge period: nobody decided, nothing holds the stake
    assert chain.code(case.slash(300, 0)) == ERRORS["Expired"]
    chain.ok(staking.call("withdraw"))


def test_a_slash_is_capped_by_the_config_and_the_stake(case: Case) -> None:
    chain, staking = case.chain, case.staking
    chain.ok(case.open())
    assert chain.code(case.slash(5_000_001, 0)) == ERRORS["InvalidArgument"]  # over the cap
    assert chain.code(case.slash(100, 101)) == ERRORS["InvalidArgument"]  # refund > amount
    chain.ok(case.slash(4_000, 4_000))  # more than staked: the stake is what there is
    assert staking.tokens(case.buyer) == 500 and staking.state()["staked"] == 0


def test_the_largest_evidence_fits_one_transaction(chain: Chain) -> None:
    """A 4-of-8 verdict (the largest quorum) and a 19-level inclusion proof (524,288
    receipts an anchor) each fit Solana's 1,232-byte transaction."""
    staking = Staking(chain, quorum=4, verifiers=8)
    big = Case(staking, leaves=5, index=4)
    chain.ok(big.open())
    chain.ok(big.slash(300, 200, signers=staking.verifiers[4:8]))
    slash_tx = VersionedTransaction(Message.new_with_blockhash(
        [big.signatures(staking.verifiers[:4], big.verdict(1, 1)), client.instruction(
            chain.program_id, "slash", {name: Pubkey.new_unique() for name in (
                "config", "case", "stake", "vault", "refund", "treasury", "instructions",
                "tokenProgram")}, amount=1, refund=1, nonce=1)],
        chain.authority.pubkey(), chain.svm.latest_blockhash()), [chain.authority])
    assert len(bytes(slash_tx)) <= 1232
    deep = client.instruction(chain.program_id, "openCase", {name: Pubkey.new_unique() for name
                              in ("config", "anchor", "stake", "case", "instructions",
                                  "systemProgram")} | {"authority": chain.authority.pubkey()},
                              receiptHash=bytes(32), lefts=0, proof=[bytes(32)] * 19)
    open_tx = VersionedTransaction(Message.new_with_blockhash(
        [big.node_signature(), deep], chain.authority.pubkey(), chain.svm.latest_blockhash()),
        [chain.authority])
    assert len(bytes(open_tx)) <= 1232


def test_funds_enter_only_an_immutable_program(chain: Chain) -> None:
    """While the deployer can upgrade the program, it could replace every rule (a vault's
    included): no stake is registered and no payout posted until it gives that up."""
    chain.ok(chain.initialize())
    operator = chain.funded()
    register = client.instruction(chain.program_id, "registerStake", {
        "config": chain.config, "operator": operator.pubkey(),
        "stake": client.stake_address(chain.program_id, operator.pubkey()),
        "vault": client.vault_address(chain.program_id, operator.pubkey()),
        "mint": chain.mint, "tokenProgram": spl.TOKEN_PROGRAM_ID,
        "systemProgram": client.SYSTEM_PROGRAM_ID,
        "programData": programdata_address(chain.program_id)})
    assert chain.code(chain.send([register], operator)) == ERRORS["Upgradeable"]
    chain.make_immutable()
    chain.ok(chain.send([register], operator))


def test_a_mint_with_a_freeze_authority_is_refused(chain: Chain) -> None:
    """Whoever could freeze a vault could block both withdrawal and slashing."""
    mint = Keypair()
    rent = chain.svm.minimum_balance_for_rent_exemption(82)
    chain.ok(chain.send([create_account(CreateAccountParams(
        from_pubkey=chain.authority.pubkey(), to_pubkey=mint.pubkey(), lamports=rent,
        space=82, owner=spl.TOKEN_PROGRAM_ID)), spl.initialize_mint2(
            mint.pubkey(), 6, chain.authority.pubkey(), chain.authority.pubkey())],
        chain.authority, mint))
    treasury = chain.token_account(mint.pubkey(), chain.authority.pubkey())
    assert chain.code(chain.initialize(accounts={"mint": mint.pubkey(),
                                                 "treasury": treasury})) == \
        ERRORS["InvalidAccount"]


def test_a_verdict_for_another_deployment_is_not_one_here(case: Case) -> None:
    case.chain.ok(case.open())
    elsewhere = case.verdict(300, 200, program=Pubkey.new_unique())
    assert case.chain.code(case.slash(300, 200, message=elsewhere)) == ERRORS["NoEvidence"]


def test_cases_hold_the_stake_at_most_a_challenge_period_past_unbonding(case: Case) -> None:
    """An authority opening case after case (on honest receipts) cannot hold it for ever."""
    chain, staking = case.chain, case.staking
    chain.ok(staking.call("requestUnbond", amount=500))
    staking.later(PERIOD - 3600)
    chain.ok(case.open())  # holds until a day from now
    staking.later(3600)
    assert chain.code(staking.call("withdraw")) == ERRORS["NotYet"]
    staking.later(80_000)
    chain.ok(case.sibling(4).open())  # would hold a day more
    assert chain.code(staking.call("withdraw")) == ERRORS["NotYet"]
    staking.later(86400 - 80_000)  # the unbonding period plus one challenge period
    chain.ok(staking.call("withdraw"))
    assert staking.state()["openCases"] == 2  # still open, no longer holding


def test_an_expired_case_is_closed_by_anyone(case: Case) -> None:
    case.chain.ok(case.open())
    case.staking.later(86400)
    case.chain.ok(case.close(signers=[]))
    assert case.state()["state"] == 2 and case.staking.state()["openCases"] == 0


# ---- payouts ------------------------------------------------------------------------------


class Epoch:
    """Payouts for some nodes, posted as a Merkle root and funded from the authority."""

    def __init__(self, chain: Chain, amounts: list[int], epoch: int = 1) -> None:
        from protocol import merkle

        self.chain, self.epoch = chain, epoch
        chain.ok(chain.initialize())
        chain.make_immutable()
        self.source = chain.token_account(chain.mint, chain.authority.pubkey())
        chain.ok(chain.send([spl.mint_to_checked(chain.mint, self.source,
                                                 chain.authority.pubkey(), 10_000, 6)],
                            chain.authority))
        self.nodes = [Keypair() for _ in amounts]
        self.amounts = amounts
        self.accounts = [chain.ata(n.pubkey()) for n in self.nodes]
        self.leaves = [client.payout_leaf(i, n.pubkey(), a).hex()
                       for i, (n, a) in enumerate(zip(self.nodes, amounts, strict=True))]
        self.root = bytes.fromhex(merkle.merkle_root(self.leaves))
        self.payouts = client.payouts_address(chain.program_id, epoch)
        self.vault = client.payout_vault_address(chain.program_id, epoch)

    def post(self, total: int | None = None, signer: Keypair | None = None) -> Any:
        signer = signer or self.chain.authority
        ix = client.instruction(self.chain.program_id, "postPayouts", {
            "config": self.chain.config, "authority": signer.pubkey(),
            "payouts": self.payouts, "payoutVault": self.vault, "source": self.source,
            "mint": self.chain.mint, "tokenProgram": spl.TOKEN_PROGRAM_ID,
            "systemProgram": client.SYSTEM_PROGRAM_ID,
            "programData": programdata_address(self.chain.program_id)},
            epoch=self.epoch, root=self.root,
            total=sum(self.amounts) if total is None else total, leafCount=len(self.leaves))
        return self.chain.send([ix], signer)

    def claim(self, index: int, amount: int | None = None, node: Pubkey | None = None,
              destination: Pubkey | None = None, proof_of: int | None = None,
              bump: int | None = None) -> Any:
        from protocol import merkle

        proof = merkle.inclusion_proof(self.leaves, index if proof_of is None else proof_of)
        ix = client.instruction(self.chain.program_id, "claim", {
            "payouts": self.payouts, "payoutVault": self.vault,
            "destination": destination or self.accounts[index],
            "tokenProgram": spl.TOKEN_PROGRAM_ID}, index=index,
            node=node or self.nodes[index].pubkey(),
            amount=self.amounts[index] if amount is None else amount,
            lefts=sum(1 << i for i, step in enumerate(proof) if step.side == "left"),
            ataBump=spl.ata_bump(node or self.nodes[index].pubkey(), self.chain.mint)
            if bump is None else bump,
            proof=[bytes.fromhex(step.sibling) for step in proof])
        return self.chain.send([ix], self.chain.funded())  # anyone may submit it

    def tokens(self, account: Pubkey) -> int:
        return spl.parse_token_account(self.chain.data(account)).amount

    def close(self, signer: Keypair | None = None, vault: Pubkey | None = None) -> Any:
        signer = signer or self.chain.authority
        ix = client.instruction(self.chain.program_id, "closeEpoch", {
            "config": self.chain.config, "authority": signer.pubkey(),
            "payouts": self.payouts, "payoutVault": vault or self.vault,
            "tokenProgram": spl.TOKEN_PROGRAM_ID})
        return self.chain.send([ix], signer)


def test_a_fully_claimed_epoch_closes_and_returns_its_rent(chain: Chain) -> None:
    """Not while a leaf is unpaid (no node loses its claim), not by anyone but the
    authority, not with another vault; once every leaf is paid, both accounts close and
    their rent goes back to the authority."""
    epoch = Epoch(chain, [100, 200])
    chain.ok(epoch.post())
    chain.ok(epoch.claim(0))
    assert chain.code(epoch.close()) == ERRORS["Insufficient"]  # leaf 1 is unpaid
    chain.ok(epoch.claim(1))
    assert chain.code(epoch.close(signer=chain.funded())) == ERRORS["Unauthorized"]
    assert chain.code(epoch.close(vault=epoch.source)) == ERRORS["InvalidAccount"]
    rent = chain.svm.get_account(epoch.payouts).lamports + chain.svm.get_account(
        epoch.vault).lamports
    before = chain.svm.get_balance(chain.authority.pubkey())
    result = chain.ok(epoch.close())
    assert chain.svm.get_account(epoch.payouts) is None or chain.svm.get_account(
        epoch.payouts).lamports == 0
    assert chain.svm.get_account(epoch.vault) is None or chain.svm.get_account(
        epoch.vault).lamports == 0
    assert chain.svm.get_balance(chain.authority.pubkey()) == before + rent - 5000
    assert result.compute_units_consumed() < 15_000
    assert chain.code(epoch.claim(0)) == ERRORS["InvalidAccount"]  # nothing left to claim from


def test_each_node_claims_its_payout_once_without_the_market(chain: Chain) -> None:
    epoch = Epoch(chain, [120, 30, 50, 800, 1])
    chain.ok(epoch.post())
    assert epoch.tokens(epoch.vault) == 1001
    assert chain.code(epoch.post()) == ERRORS["AlreadyExists"]  # an epoch is posted once
    for index in (3, 0, 4, 1, 2):
        result = chain.ok(epoch.claim(index))
        assert epoch.tokens(epoch.accounts[index]) == epoch.amounts[index]
        assert result.compute_units_consumed() < 15_000
    assert epoch.tokens(epoch.vault) == 0
    assert chain.code(epoch.claim(3)) == ERRORS["Claimed"]
    state = client.decode_account("Payouts", chain.data(epoch.payouts))
    assert state["claimed"] == state["total"] == 1001 and state["bitmap"] == b"\x1f"


def test_a_claim_must_be_the_leaf_as_posted(chain: Chain) -> None:
    epoch = Epoch(chain, [100, 200, 300])
    chain.ok(epoch.post())
    no = ERRORS["NoEvidence"]
    assert chain.code(epoch.claim(0, amount=101)) == no  # more than its leaf
    assert chain.code(epoch.claim(0, proof_of=1)) == no  # another leaf's proof
    thief = Keypair()
    thief_account = chain.ata(thief.pubkey())
    assert chain.code(epoch.claim(1, node=thief.pubkey(), destination=thief_account)) == no
    # the right leaf, to an account the node does not own, or one someone else opened
    # in the node's name (not its associated account)
    assert chain.code(epoch.claim(1, destination=thief_account)) == ERRORS["InvalidAccount"]
    planted = chain.token_account(chain.mint, epoch.nodes[1].pubkey())
    assert chain.code(epoch.claim(1, destination=planted)) == ERRORS["InvalidAccount"]
    canonical = spl.ata_bump(epoch.nodes[1].pubkey(), chain.mint)
    assert chain.code(epoch.claim(1, bump=canonical - 1)) == ERRORS["InvalidAccount"]
    assert chain.code(epoch.claim(7, proof_of=0, node=epoch.nodes[0].pubkey(), amount=100,
                                  destination=epoch.accounts[0])) == ERRORS["InvalidArgument"]
    chain.ok(epoch.claim(1))


def test_only_the_authority_posts_and_the_total_bounds_the_claims(chain: Chain) -> None:
    epoch = Epoch(chain, [100, 200])
    assert chain.code(epoch.post(signer=chain.funded())) == ERRORS["Unauthorized"]
    chain.ok(epoch.post(total=250))  # funded for less than its leaves
    chain.ok(epoch.claim(1))
    assert chain.code(epoch.claim(0)) == ERRORS["Insufficient"]
    assert epoch.tokens(epoch.vault) == 50


# ---- the linker ---------------------------------------------------------------------------


def _compile(tmp_path: Path, source: str) -> Path:
    if not shutil.which("clang-19"):
        pytest.skip("clang-19 is not installed")
    (tmp_path / "x.c").write_text(source)
    obj = tmp_path / "x.o"
    subprocess.run(["clang-19", "-target", "bpf", "-mcpu=v2", "-O2", "-ffreestanding",
                    "-nostdlib", "-c", str(tmp_path / "x.c"), "-o", str(obj)], check=True)
    return obj


def test_the_linker_refuses_writable_globals_and_unknown_symbols(tmp_path: Path) -> None:
    obj = _compile(tmp_path, "unsigned long counter = 1;\n"
                   "unsigned long entrypoint(const unsigned char *in) { return counter++; }\n")
    with pytest.raises(LinkError, match="writable globals"):
        link([obj], tmp_path / "x.so")
    obj = _compile(tmp_path, "void not_a_syscall(void);\n"
                   "unsigned long entrypoint(const unsigned char *in) "
                   "{ not_a_syscall(); return 0; }\n")
    with pytest.raises(LinkError, match="not_a_syscall"):
        link([obj], tmp_path / "x.so")
