"""A persistent single-node Solana chain over LiteSVM, for development and tests.

LiteSVM executes real SBF programs (SPL Token, ATA, Memo) but has no blocks, no
history and no disk. ``LocalChain`` adds exactly what a client of a validator sees:

* a clock: one slot every ``slot_ms`` of wall time (400 ms, like mainnet), block
  height = slot, the Clock sysvar's unix time 400 ms a slot from genesis; explicit
  ``advance()`` for tests;
* blockhashes derived from (genesis seed, slot), each valid for 150 blocks, checked
  here (LiteSVM's own check only knows one blockhash); a transaction with an expired or
  unknown blockhash never lands, which is what makes "unknown and expired" a safe
  answer for re-planning a payment;
* preflight (simulate first, reject without landing) or skip-preflight semantics;
  failed transactions that pass signature/fee checks land and pay their fee;
* a transaction log (signature, slot, time, wire bytes, meta with balances and token
  balances, logs) and an address index for ``getSignaturesForAddress``;
* persistence: every account a transaction can write is snapshotted into SQLite after
  the transaction; a restart restores them into a fresh LiteSVM with ``set_account``.

One lock serialises all access, so the chain can be shared by threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from solders.account import Account
from solders.hash import Hash
from solders.keypair import Keypair
from solders.litesvm import LiteSVM
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import Transaction, VersionedTransaction
from solders.transaction_metadata import FailedTransactionMetadata

from chain import spl
from chain.localnet.records import (
    ChainError,
    PreflightFailure,
    TxRecord,
    ui_amount,
    writable_indices,
)

BLOCKHASH_VALIDITY = 150  # blocks a blockhash stays usable, as on mainnet
DEFAULT_SLOT_MS = 400
LAMPORTS_PER_SIGNATURE = 5000
FAUCET_LAMPORTS = 10**18
GENESIS_SLOT = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    pubkey TEXT PRIMARY KEY, lamports INTEGER NOT NULL, data BLOB NOT NULL,
    owner TEXT NOT NULL, executable INTEGER NOT NULL, rent_epoch INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS txs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, signature TEXT NOT NULL UNIQUE,
    slot INTEGER NOT NULL, block_time INTEGER NOT NULL, raw BLOB NOT NULL,
    err TEXT, meta TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tx_accounts (
    pubkey TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (pubkey, seq)) WITHOUT ROWID;
"""


class LocalChain:
    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        slot_ms: int = DEFAULT_SLOT_MS,
    ):
        self._lock = threading.RLock()
        self.slot_ms = slot_ms
        self.data_dir = Path(data_dir) if data_dir is not None else None
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._lockfile = _exclusive_lock(self.data_dir / "ledger.lock")
            db_path = str(self.data_dir / "ledger.sqlite3")
        else:
            self._lockfile = None
            db_path = ":memory:"
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if "seed" not in meta:
            meta = {
                "seed": os.urandom(32).hex(),
                "genesis_time": repr(time.time()),
                "offset": "0",
            }
            self._db.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
        self._seed = bytes.fromhex(meta["seed"])
        self._genesis_time = float(meta["genesis_time"])
        self._offset = int(meta["offset"])
        self.genesis_hash = Hash(hashlib.sha256(b"aidp-ledger/genesis" + self._seed).digest())
        self.faucet = Keypair.from_seed(hashlib.sha256(b"aidp-ledger/faucet" + self._seed).digest())
        self.faucet_pubkey = self.faucet.pubkey()
        self._decimals: dict[Pubkey, int] = {}
        self._issued: dict[Hash, int] = {}
        self.svm = LiteSVM().with_blockhash_check(False)
        self._svm_slot = -1
        restored = 0
        # executable accounts last: LiteSVM loads a program when its account is set, and an
        # upgradeable program's code lives in its programdata account, which must be there
        for pk, lamports, data, owner, executable, rent_epoch in self._db.execute(
            "SELECT pubkey, lamports, data, owner, executable, rent_epoch FROM accounts "
            "ORDER BY executable"
        ):
            if lamports:
                self.svm.set_account(
                    Pubkey.from_string(pk),
                    Account(
                        lamports,
                        bytes(data),
                        Pubkey.from_string(owner),
                        bool(executable),
                        rent_epoch,
                    ),
                )
                restored += 1
        self.restored_accounts = restored
        # the clock never runs backwards, not even across a restart after the host clock
        # was set back: a blockhash reported expired must stay expired
        self._floor = int(self._db.execute("SELECT COALESCE(MAX(slot), 0) FROM txs").fetchone()[0])
        self.svm.set_account(
            self.faucet_pubkey, Account(FAUCET_LAMPORTS, b"", spl.SYSTEM_PROGRAM_ID, False, 0)
        )
        self._tick()

    # ------------------------------------------------------------------ clock & hashes

    def _tick(self) -> int:
        if self.slot_ms > 0:
            elapsed = int((time.time() - self._genesis_time) * 1000 // self.slot_ms)
        else:
            elapsed = 0
        slot = max(GENESIS_SLOT + max(elapsed, 0) + self._offset, self._svm_slot, self._floor)
        if slot != self._svm_slot:
            self.svm.warp_to_slot(slot)
            self._set_clock_time(slot)
            self._svm_slot = slot
        return slot

    def _set_clock_time(self, slot: int) -> None:
        """The Clock sysvar's unix time follows the slots (genesis time plus 400 ms a
        slot), so programs that keep periods (unbonding, challenge periods) see time pass
        as on a real cluster, and ``advance`` moves it forward for tests."""
        clock = self.svm.get_clock()
        clock.unix_timestamp = int(self._genesis_time
                                   + (slot - GENESIS_SLOT) * DEFAULT_SLOT_MS / 1000)
        self.svm.set_clock(clock)

    def slot(self) -> int:
        with self._lock:
            return self._tick()

    block_height = slot  # no skipped slots on a single node

    def advance(self, slots: int) -> int:
        """Move the clock forward (tests: expire blockhashes without waiting)."""
        with self._lock:
            self._offset += int(slots)
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'offset'", (str(self._offset),))
            return self._tick()

    def _blockhash_at(self, slot: int) -> Hash:
        return Hash(hashlib.sha256(self._seed + slot.to_bytes(8, "little")).digest())

    def latest_blockhash(self) -> tuple[Hash, int]:
        with self._lock:
            slot = self._tick()
            bh = self._blockhash_at(slot)
            self._issued[bh] = slot
            if len(self._issued) > 4 * BLOCKHASH_VALIDITY:
                self._issued = {
                    h: s for h, s in self._issued.items() if s + BLOCKHASH_VALIDITY >= slot
                }
            return bh, slot + BLOCKHASH_VALIDITY

    def blockhash_slot(self, blockhash: Hash) -> int | None:
        """Slot of a still-valid blockhash, None when unknown or expired."""
        with self._lock:
            current = self._tick()
            slot = self._issued.get(blockhash)
            if slot is None:  # e.g. issued before a restart: search the validity window
                for s in range(current, max(current - BLOCKHASH_VALIDITY, 0) - 1, -1):
                    if self._blockhash_at(s) == blockhash:
                        slot = s
                        break
            if slot is None or slot + BLOCKHASH_VALIDITY < current:
                return None
            return slot

    # ------------------------------------------------------------------ accounts

    def get_account(self, pubkey: Pubkey) -> Account | None:
        with self._lock:
            acc = self.svm.get_account(pubkey)
            return acc if acc is not None and acc.lamports > 0 else None

    def balance(self, pubkey: Pubkey) -> int:
        acc = self.get_account(pubkey)
        return acc.lamports if acc else 0

    def rent_exempt(self, size: int) -> int:
        with self._lock:
            return self.svm.minimum_balance_for_rent_exemption(size)

    def _decimals_of(self, mint: Pubkey) -> int:
        if mint not in self._decimals:
            acc = self.svm.get_account(mint)
            self._decimals[mint] = spl.parse_mint(bytes(acc.data)).decimals if acc else 0
        return self._decimals[mint]

    def token_balance_entry(self, index: int, pubkey: Pubkey) -> dict[str, Any] | None:
        acc = self.svm.get_account(pubkey)
        if (
            acc is None
            or acc.owner != spl.TOKEN_PROGRAM_ID
            or len(acc.data) != spl.TOKEN_ACCOUNT_SIZE
        ):
            return None
        ta = spl.parse_token_account(bytes(acc.data))
        return {
            "accountIndex": index,
            "mint": str(ta.mint),
            "owner": str(ta.owner),
            "programId": str(spl.TOKEN_PROGRAM_ID),
            "uiTokenAmount": ui_amount(ta.amount, self._decimals_of(ta.mint)),
        }

    def token_amount(self, pubkey: Pubkey) -> tuple[int, int] | None:
        """(amount, decimals) of a token account, None when it is not one."""
        with self._lock:
            entry = self.token_balance_entry(0, pubkey)
            if entry is None:
                return None
            return int(entry["uiTokenAmount"]["amount"]), entry["uiTokenAmount"]["decimals"]

    def program_accounts(self, program_id: Pubkey) -> list[tuple[Pubkey, Account]]:
        """Every live account ``program_id`` owns (the RPC's getProgramAccounts)."""
        with self._lock:
            return [(pk, acc) for pk, acc in self.svm.get_program_accounts(program_id)
                    if acc.lamports > 0]

    def token_accounts_by_owner(
        self, owner: Pubkey, mint: Pubkey | None = None
    ) -> list[tuple[Pubkey, Account]]:
        with self._lock:
            out = []
            for pk, acc in self.svm.get_program_accounts(spl.TOKEN_PROGRAM_ID):
                if len(acc.data) != spl.TOKEN_ACCOUNT_SIZE or acc.lamports == 0:
                    continue
                ta = spl.parse_token_account(bytes(acc.data))
                if ta.owner == owner and (mint is None or ta.mint == mint):
                    out.append((pk, acc))
            return out

    def _snapshot(self, pubkeys: list[Pubkey]) -> None:
        rows = []
        for pk in pubkeys:
            acc = self.svm.get_account(pk)
            if acc is None:
                rows.append((str(pk), 0, b"", str(spl.SYSTEM_PROGRAM_ID), 0, 0))
            else:
                rows.append(
                    (
                        str(pk),
                        acc.lamports,
                        bytes(acc.data),
                        str(acc.owner),
                        int(acc.executable),
                        acc.rent_epoch,
                    )
                )
        self._db.executemany("INSERT OR REPLACE INTO accounts VALUES (?, ?, ?, ?, ?, ?)", rows)

    # ------------------------------------------------------------------ transactions

    def send(
        self, tx: bytes | Transaction | VersionedTransaction, *, preflight: bool = True
    ) -> Signature:
        """Execute a signed transaction. Raises ``PreflightFailure`` (nothing landed) when
        ``preflight`` and it would fail; without preflight a failing transaction lands (and
        pays its fee) when its fee payer can pay, and is silently dropped otherwise."""
        raw = bytes(tx)
        vtx = VersionedTransaction.from_bytes(raw)
        sig = vtx.signatures[0]
        msg = vtx.message
        with self._lock:
            slot = self._tick()
            if self._db.execute("SELECT 1 FROM txs WHERE signature = ?", (str(sig),)).fetchone():
                if preflight:
                    raise PreflightFailure("AlreadyProcessed", [])
                return sig
            if self.blockhash_slot(msg.recent_blockhash) is None:
                if preflight:
                    raise PreflightFailure("BlockhashNotFound", [])
                return sig  # a validator drops it: it can never land
            if preflight:
                sim = self.svm.simulate_transaction(vtx)
                if isinstance(sim, FailedTransactionMetadata):
                    meta = sim.meta()
                    raise PreflightFailure(
                        _err_json(sim), list(meta.logs()), meta.compute_units_consumed()
                    )
            keys = list(msg.account_keys)
            writable = [keys[i] for i in writable_indices(msg)]
            before = {k: self.svm.get_account(k) for k in writable}
            pre = [self._lamports(k) for k in keys]
            pre_tok = [e for i, k in enumerate(keys) if (e := self.token_balance_entry(i, k))]
            res = self.svm.send_transaction(vtx)
            post = [self._lamports(k) for k in keys]
            failed = isinstance(res, FailedTransactionMetadata)
            if failed and post[0] >= pre[0]:  # rejected before execution: no fee, not landed
                if preflight:
                    raise PreflightFailure(_err_json(res), list(res.meta().logs()))
                return sig
            meta_obj = res.meta() if failed else res
            err = _err_json(res) if failed else None
            post_tok = [e for i, k in enumerate(keys) if (e := self.token_balance_entry(i, k))]
            meta = {
                "err": err,
                "status": {"Err": err} if failed else {"Ok": None},
                "fee": meta_obj.fee(),
                "preBalances": pre,
                "postBalances": post,
                "innerInstructions": [],
                "logMessages": list(meta_obj.logs()),
                "preTokenBalances": pre_tok,
                "postTokenBalances": post_tok,
                "rewards": [],
                "loadedAddresses": {"writable": [], "readonly": []},
                "computeUnitsConsumed": meta_obj.compute_units_consumed(),
            }
            try:
                self._record(sig, slot, raw, err, meta, keys, writable)
            except BaseException:
                # Not recorded means not landed: undo its effects, or a payment would have
                # moved money while its signature stays unknown (and so be re-planned).
                for k, acc in before.items():
                    self.svm.set_account(k, acc or Account(0, b"", spl.SYSTEM_PROGRAM_ID, False, 0))
                raise
            return sig

    def simulate(
        self, tx: bytes | Transaction | VersionedTransaction
    ) -> tuple[Any, list[str], int]:
        """(err or None, logs, compute units) without changing any state."""
        vtx = VersionedTransaction.from_bytes(bytes(tx))
        with self._lock:
            self._tick()
            if self.blockhash_slot(vtx.message.recent_blockhash) is None:
                return "BlockhashNotFound", [], 0
            sim = self.svm.simulate_transaction(vtx)
            if isinstance(sim, FailedTransactionMetadata):
                meta = sim.meta()
                return _err_json(sim), list(meta.logs()), meta.compute_units_consumed()
            meta = sim.meta()
            return None, list(meta.logs()), meta.compute_units_consumed()

    def _lamports(self, pk: Pubkey) -> int:
        acc = self.svm.get_account(pk)
        return acc.lamports if acc else 0

    def _record(self, sig, slot, raw, err, meta, keys, writable) -> None:
        self._db.execute("BEGIN")
        try:
            cur = self._db.execute(
                "INSERT INTO txs (signature, slot, block_time, raw, err, meta)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    str(sig),
                    slot,
                    int(time.time()),
                    raw,
                    json.dumps(err) if err is not None else None,
                    json.dumps(meta),
                ),
            )
            seq = cur.lastrowid
            self._db.executemany(
                "INSERT OR IGNORE INTO tx_accounts VALUES (?, ?)", [(str(k), seq) for k in keys]
            )
            self._snapshot([k for k in writable if k != self.faucet_pubkey])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def airdrop(self, pubkey: Pubkey, lamports: int) -> Signature:
        """A real System transfer from the chain's faucet, logged like any transaction."""
        with self._lock:
            bh, _ = self.latest_blockhash()
            ix = spl.sol_transfer(self.faucet_pubkey, pubkey, lamports)
            # a memo with the time makes repeated identical airdrops distinct transactions
            nonce = spl.memo(f"airdrop:{time.time_ns()}")
            tx = Transaction.new_signed_with_payer(
                [ix, nonce], self.faucet_pubkey, [self.faucet], bh
            )
            return self.send(tx, preflight=True)

    def _row(self, row) -> TxRecord:
        seq, sig, slot, bt, raw, err, meta = row
        return TxRecord(
            seq, sig, slot, bt, bytes(raw), json.loads(err) if err else None, json.loads(meta)
        )

    def transaction(self, signature: Signature | str) -> TxRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT seq, signature, slot, block_time, raw, err, meta FROM txs"
                " WHERE signature = ?",
                (str(signature),),
            ).fetchone()
            return self._row(row) if row else None

    def signature_status(self, signature: Signature | str) -> tuple[int, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT slot, err FROM txs WHERE signature = ?", (str(signature),)
            ).fetchone()
            return (row[0], json.loads(row[1]) if row[1] else None) if row else None

    def signatures_for_address(
        self,
        pubkey: Pubkey | str,
        *,
        before: str | None = None,
        until: str | None = None,
        limit: int = 1000,
    ) -> list[TxRecord]:
        """Newest first, like the RPC method; ``before``/``until`` are exclusive bounds."""
        with self._lock:
            hi = lo = None
            if before:
                r = self._db.execute(
                    "SELECT seq FROM txs WHERE signature = ?", (before,)
                ).fetchone()
                hi = r[0] if r else None
            if until:
                r = self._db.execute("SELECT seq FROM txs WHERE signature = ?", (until,)).fetchone()
                lo = r[0] if r else None
            rows = self._db.execute(
                "SELECT t.seq, t.signature, t.slot, t.block_time, t.raw, t.err, t.meta"
                " FROM tx_accounts a"
                " JOIN txs t ON t.seq = a.seq WHERE a.pubkey = ? AND a.seq < ? AND a.seq > ?"
                " ORDER BY a.seq DESC LIMIT ?",
                (
                    str(pubkey),
                    hi if hi is not None else 2**62,
                    lo if lo is not None else -1,
                    min(limit, 1000),
                ),
            ).fetchall()
            return [self._row(r) for r in rows]

    def transaction_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM txs").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._lockfile is not None:
                self._lockfile.close()
                self._lockfile = None


def _exclusive_lock(path: Path):
    """One process per chain directory: two LiteSVMs over one store would fork the chain."""
    import fcntl

    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ChainError(
            -32000,
            f"{path.parent} is in use by another process. Share one chain between processes "
            "with `aidp-ledger serve --data-dir ...` and point them at its URL "
            "(AIDP_CHAIN__LEDGER_URL=http://127.0.0.1:8899).",
        ) from None
    return handle


def _err_json(res: FailedTransactionMetadata) -> Any:
    return json.loads(res.to_json())["err"]
