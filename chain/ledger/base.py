"""The ``Ledger`` interface: one API over an in-process chain or any Solana JSON-RPC node.

Everything above this module (bootstrap, deposits, allowances, stake, payouts,
anchors, the market's settlement tasks) talks to a ``Ledger`` and never knows which
backend it has. ``chain.ledger.open.open_ledger(url, data_dir)`` is the factory the market calls with
``MarketSettings.ledger_url``:

* ``"inprocess"`` — a ``LocalChain`` (LiteSVM) inside this process, persisted under
  ``data_dir/ledger``; one process only (a lock file says so loudly);
* ``"memory"`` — the same, not persisted (tests, benchmarks);
* ``http(s)://…`` — any Solana JSON-RPC endpoint through solana-py's async client:
  ``aidp-ledger serve`` for multi-process development, devnet, mainnet.

Exactly-once payments
---------------------
A payment moves through ``planned → sent → confirmed`` in the caller's database:

1. ``prepare(instructions, payer, signers)`` builds and signs the transaction against a
   fresh blockhash. Signing is deterministic (ed25519), so the signature is known now,
   before anything touches the network. Record ``sent`` with ``signature``,
   ``blockhash`` and ``last_valid_block_height`` first.
2. ``submit(prepared)`` broadcasts it.
3. ``confirm(signature, last_valid_block_height)`` / ``status(...)`` answer one of
   ``confirmed`` · ``failed`` (landed with an error; nothing moved but the fee) ·
   ``expired`` (never seen, and its blockhash can no longer land: safe to re-plan) ·
   ``pending`` (never seen yet, still able to land: re-submit the *same* transaction —
   rebuild it with ``prepare(..., blockhash=...)`` — never a new one).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from solders.account import Account
from solders.hash import Hash
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.transaction import Transaction, VersionedTransaction

from chain import spl


class LedgerError(Exception):
    pass


class TransactionRejected(LedgerError):
    """Preflight refused the transaction: it did not land and paid no fee."""

    def __init__(self, message: str, err: Any = None, logs: Sequence[str] = ()):
        super().__init__(message)
        self.err, self.logs = err, list(logs)


class TransactionFailed(LedgerError):
    """The transaction landed with an error: only its fee was spent."""

    def __init__(self, signature: str, err: Any):
        super().__init__(f"transaction {signature} failed: {err}")
        self.signature, self.err = signature, err


class TransactionExpired(LedgerError):
    """Never landed and its blockhash has expired: it never will."""


class AllowanceExceeded(LedgerError):
    pass


class TxState(StrEnum):
    CONFIRMED = "confirmed"
    FAILED = "failed"
    EXPIRED = "expired"  # unknown and its blockhash expired: safe to re-plan
    PENDING = "pending"  # unknown and still able to land: wait or resubmit the same bytes


@dataclass(frozen=True)
class PreparedTx:
    """A signed transaction whose identity is fixed before it is sent."""

    signature: str
    blockhash: str
    last_valid_block_height: int
    raw: bytes = field(repr=False)

    @property
    def transaction(self) -> VersionedTransaction:
        return VersionedTransaction.from_bytes(self.raw)


@dataclass(frozen=True)
class TxStatus:
    state: TxState
    slot: int | None = None
    err: Any = None


@dataclass(frozen=True)
class TokenBalance:
    account: str
    mint: str
    owner: str
    amount: int
    decimals: int


@dataclass(frozen=True)
class TxInfo:
    """What getTransaction tells about a landed transaction."""

    signature: str
    slot: int
    block_time: int | None
    err: Any
    fee: int
    memos: list[str]
    logs: list[str]
    account_keys: list[str]
    pre_token_balances: list[TokenBalance]
    post_token_balances: list[TokenBalance]
    transaction: VersionedTransaction = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.err is None

    def token_delta(self, account: str | Pubkey) -> int:
        account = str(account)
        pre = sum(b.amount for b in self.pre_token_balances if b.account == account)
        post = sum(b.amount for b in self.post_token_balances if b.account == account)
        return post - pre

    def token_changes(self) -> dict[str, tuple[TokenBalance, int]]:
        """account → (its balance entry, change in base units), for every token account."""
        out: dict[str, tuple[TokenBalance, int]] = {}
        for b in self.pre_token_balances + self.post_token_balances:
            out.setdefault(b.account, (b, 0))
        return {a: (b, self.token_delta(a)) for a, (b, _) in out.items()}


@dataclass(frozen=True)
class SignatureWindow:
    """Which signatures of an address to list: strictly between ``until`` and ``before``
    (exclusive signatures, None for no bound), newest first, at most ``limit``."""

    before: str | None = None
    until: str | None = None
    limit: int = 1000


@dataclass(frozen=True)
class SignatureInfo:
    signature: str
    slot: int
    err: Any
    memo: str | None
    block_time: int | None


def tx_info_from_json(signature: str, d: dict[str, Any]) -> TxInfo:
    """Build a ``TxInfo`` from getTransaction's JSON (base64 encoding)."""
    tx_field = d["transaction"]
    raw = base64.b64decode(
        tx_field[0] if isinstance(tx_field, list) else tx_field["transaction"][0]
    )
    vtx = VersionedTransaction.from_bytes(raw)
    meta = d.get("meta") or {}
    # A v0 transaction's account indexes run on past its static keys into the accounts
    # loaded from lookup tables (writable, then read-only): anyone can send the deposit
    # account such a transaction, and it must parse, not stop the scanner.
    loaded = meta.get("loadedAddresses") or {}
    keys = [str(k) for k in vtx.message.account_keys]
    keys += list(loaded.get("writable") or []) + list(loaded.get("readonly") or [])

    def balances(entries: list[dict[str, Any]] | None) -> list[TokenBalance]:
        return [
            TokenBalance(
                account=keys[e["accountIndex"]],
                mint=e["mint"],
                owner=e.get("owner") or "",
                amount=int(e["uiTokenAmount"]["amount"]),
                decimals=int(e["uiTokenAmount"]["decimals"]),
            )
            for e in entries or []
        ]

    return TxInfo(
        signature=signature,
        slot=int(d["slot"]),
        block_time=d.get("blockTime"),
        err=meta.get("err"),
        fee=int(meta.get("fee", 0)),
        memos=spl.memos_of(vtx.message),
        logs=list(meta.get("logMessages") or []),
        account_keys=keys,
        pre_token_balances=balances(meta.get("preTokenBalances")),
        post_token_balances=balances(meta.get("postTokenBalances")),
        transaction=vtx,
    )


def build_transaction(
    instructions: Sequence[Instruction], payer: Keypair, signers: Sequence[Keypair], blockhash: Hash
) -> Transaction:
    """Deterministic: the same instructions, signers and blockhash give the same bytes.

    ``signers`` may hold more keys than needed; a missing one is a ``ValueError`` naming it.
    """
    payer_key = payer.pubkey()  # Keypair.pubkey() derives the key each call: once is enough
    msg = Message.new_with_blockhash(list(instructions), payer_key, blockhash)
    required = list(msg.account_keys[: msg.header.num_required_signatures])
    by_key = {k.pubkey(): k for k in signers}
    by_key[payer_key] = payer
    missing = [str(k) for k in required if k not in by_key]
    if missing:
        raise ValueError(f"transaction needs signatures of {', '.join(missing)}")
    return Transaction([by_key[k] for k in required], msg, blockhash)


class Ledger(ABC):
    """Async access to one Solana chain. Subclasses implement the primitive calls."""

    #: True where airdrops and clock control exist (local chains only).
    local: bool = False

    # ------------------------------------------------------------------ primitives

    @abstractmethod
    async def latest_blockhash(self) -> tuple[Hash, int]: ...

    @abstractmethod
    async def block_height(self) -> int: ...

    @abstractmethod
    async def slot(self) -> int: ...

    @abstractmethod
    async def get_account(self, pubkey: Pubkey) -> Account | None: ...

    @abstractmethod
    async def minimum_balance_for_rent_exemption(self, size: int) -> int: ...

    @abstractmethod
    async def send_raw(self, raw: bytes, *, preflight: bool = True) -> str:
        """Broadcast signed bytes; raises ``TransactionRejected`` when preflight fails."""

    @abstractmethod
    async def signature_statuses(
        self, signatures: Sequence[str]
    ) -> list[tuple[int, Any, str] | None]:
        """Per signature: (slot, err, confirmation status) or None when unknown."""

    @abstractmethod
    async def get_transaction(self, signature: str) -> TxInfo | None: ...

    async def signatures_for_address(
        self,
        address: Pubkey,
        *,
        before: str | None = None,
        until: str | None = None,
        limit: int = 1000,
    ) -> list[SignatureInfo]:
        """Newest first, at most ``limit`` (<= 1000), strictly between ``until`` and ``before``."""
        return await self.signature_page(address, SignatureWindow(before, until, limit))

    @abstractmethod
    async def signature_page(self, address: Pubkey, window: SignatureWindow) -> list[SignatureInfo]:
        """What ``signatures_for_address`` answers: the backend's one call for it."""

    async def request_airdrop(self, pubkey: Pubkey, lamports: int) -> str:
        raise LedgerError("airdrops exist only on local chains and devnet")

    async def advance_slots(self, slots: int) -> int:
        raise LedgerError("this chain's clock cannot be moved")

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ derived reads

    async def get_balance(self, pubkey: Pubkey) -> int:
        acc = await self.get_account(pubkey)
        return acc.lamports if acc else 0

    async def token_account(self, address: Pubkey) -> spl.TokenAccount | None:
        acc = await self.get_account(address)
        if (
            acc is None
            or acc.owner != spl.TOKEN_PROGRAM_ID
            or len(acc.data) != spl.TOKEN_ACCOUNT_SIZE
        ):
            return None
        return spl.parse_token_account(bytes(acc.data))

    async def token_balance(self, address: Pubkey) -> int:
        """Base units held by a token account (0 when it does not exist)."""
        ta = await self.token_account(address)
        return ta.amount if ta else 0

    async def mint_info(self, mint: Pubkey) -> spl.Mint | None:
        acc = await self.get_account(mint)
        if acc is None or acc.owner != spl.TOKEN_PROGRAM_ID or len(acc.data) != spl.MINT_SIZE:
            return None
        return spl.parse_mint(bytes(acc.data))

    # ------------------------------------------------------------------ sending

    async def prepare(
        self,
        instructions: Sequence[Instruction],
        payer: Keypair,
        signers: Sequence[Keypair] = (),
        *,
        blockhash: Hash | None = None,
        last_valid_block_height: int | None = None,
    ) -> PreparedTx:
        """Sign against a fresh blockhash (or the given one, to rebuild a sent transaction)."""
        if blockhash is None:
            blockhash, last_valid_block_height = await self.latest_blockhash()
        tx = build_transaction(instructions, payer, signers, blockhash)
        return PreparedTx(
            str(tx.signatures[0]), str(blockhash), int(last_valid_block_height or 0), bytes(tx)
        )

    async def submit(self, prepared: PreparedTx, *, preflight: bool = True) -> str:
        return await self.send_raw(prepared.raw, preflight=preflight)

    async def send(
        self,
        instructions: Sequence[Instruction],
        payer: Keypair,
        signers: Sequence[Keypair] = (),
        *,
        preflight: bool = True,
    ) -> PreparedTx:
        """Prepare and submit; returns before confirmation."""
        prepared = await self.prepare(instructions, payer, signers)
        await self.submit(prepared, preflight=preflight)
        return prepared

    async def status(self, signature: str, last_valid_block_height: int) -> TxStatus:
        (st,) = await self.signature_statuses([signature])
        if st is not None:
            slot, err, confirmation = st
            if confirmation in ("confirmed", "finalized"):
                return TxStatus(TxState.FAILED if err is not None else TxState.CONFIRMED, slot, err)
            return TxStatus(TxState.PENDING, slot, err)
        if await self.block_height() > last_valid_block_height:
            # re-check: it may have landed between the two calls
            (st,) = await self.signature_statuses([signature])
            if st is None:
                return TxStatus(TxState.EXPIRED)
            return await self.status(signature, last_valid_block_height)
        return TxStatus(TxState.PENDING)

    async def confirm(
        self,
        signature: str,
        last_valid_block_height: int,
        *,
        timeout: float = 90.0,
        poll: float = 0.25,
    ) -> TxStatus:
        """Wait until the transaction is confirmed, failed or expired (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            st = await self.status(signature, last_valid_block_height)
            if st.state is not TxState.PENDING or time.monotonic() >= deadline:
                return st
            await asyncio.sleep(poll)

    async def execute(
        self,
        instructions: Sequence[Instruction],
        payer: Keypair,
        signers: Sequence[Keypair] = (),
        *,
        preflight: bool = True,
        timeout: float = 90.0,
    ) -> PreparedTx:
        """Send, wait, and raise unless confirmed. For setup steps, not for payments."""
        prepared = await self.send(instructions, payer, signers, preflight=preflight)
        st = await self.confirm(
            prepared.signature, prepared.last_valid_block_height, timeout=timeout
        )
        if st.state is TxState.FAILED:
            raise TransactionFailed(prepared.signature, st.err)
        if st.state is TxState.EXPIRED:
            raise TransactionExpired(prepared.signature)
        if st.state is TxState.PENDING:
            raise LedgerError(f"transaction {prepared.signature} not confirmed in {timeout}s")
        return prepared

    async def drive(
        self,
        instructions: Sequence[Instruction],
        payer: Keypair,
        signers: Sequence[Keypair] = (),
        *,
        sent: PreparedTx | None,
        mark_sent: Callable[[PreparedTx], Any],
        timeout: float = 90.0,
    ) -> TxStatus:
        """Move one exactly-once transfer forward, from whatever state its record is in.

        ``sent`` is what the record holds (None while ``planned``): signature, blockhash and
        last valid block height (``raw`` may be empty; it is rebuilt). ``mark_sent`` (sync or
        async) must durably record a new ``PreparedTx`` before it is broadcast; if it raises,
        nothing is sent. Returns the status to record: confirmed / failed, expired (re-plan:
        call again with ``sent=None``) or pending (call again later). The instructions must
        be the ones originally planned, so a rebuild reproduces the recorded signature.

        ``TransactionRejected`` from the first broadcast of a new transaction propagates:
        it was not accepted, but it stays recorded as sent — the same bytes may yet be
        broadcast from another copy of the record — and is re-planned only once expired.
        """
        if sent is not None:
            st = await self.status(sent.signature, sent.last_valid_block_height)
            if st.state in (TxState.CONFIRMED, TxState.FAILED):
                return st
            if st.state is TxState.PENDING:  # may still land: resend the same bytes, never new ones
                again = await self.prepare(
                    instructions,
                    payer,
                    signers,
                    blockhash=Hash.from_string(sent.blockhash),
                    last_valid_block_height=sent.last_valid_block_height,
                )
                if again.signature != sent.signature:
                    raise LedgerError(
                        f"rebuilt transaction {again.signature} differs from recorded "
                        f"{sent.signature}: the planned instructions changed"
                    )
                try:
                    await self.submit(again)
                except TransactionRejected:
                    # landed meanwhile, its blockhash just expired, or it cannot run now
                    # (e.g. funds missing): status tells, without waiting out ``timeout``
                    # on bytes that were not accepted
                    return await self.status(sent.signature, sent.last_valid_block_height)
                return await self.confirm(
                    sent.signature, sent.last_valid_block_height, timeout=timeout
                )
            # expired: it can never land, so planning it again cannot pay twice
        prepared = await self.prepare(instructions, payer, signers)
        recorded = mark_sent(prepared)
        if inspect.isawaitable(recorded):
            await recorded
        await self.submit(prepared)
        return await self.confirm(
            prepared.signature, prepared.last_valid_block_height, timeout=timeout
        )

    async def airdrop(self, pubkey: Pubkey, lamports: int, *, timeout: float = 30.0) -> str:
        sig = await self.request_airdrop(pubkey, lamports)
        _, lvbh = await self.latest_blockhash()
        st = await self.confirm(sig, lvbh, timeout=timeout)
        if st.state is not TxState.CONFIRMED:
            raise LedgerError(f"airdrop {sig}: {st.state.value} {st.err or ''}")
        return sig
