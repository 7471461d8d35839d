"""``aidp-ledger``'s JSON-RPC endpoint: the Solana RPC methods solana-py and the market use,
served over one ``LocalChain`` so market, workers and nodes in different processes share
one chain. Responses follow the Solana RPC shapes exactly (solders parses them strictly).

Non-standard, development only: ``aidp_advanceSlots [n]`` moves the clock forward (to
expire blockhashes in tests without waiting a minute).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from typing import Any

from solders.hash import Hash
from solders.message import Message, MessageV0
from solders.pubkey import Pubkey
from solders.signature import Signature
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from chain import spl
from chain.localnet.chain import LocalChain
from chain.localnet.records import ChainError, TxRecord, local_transaction_json, ui_amount

log = logging.getLogger("aidp.ledger")

API_VERSION = "2.2.0"
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32700, -32600, -32601, -32602

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        n = n * 58 + _B58.index(ch)
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body


def _invalid(msg: str) -> ChainError:
    return ChainError(INVALID_PARAMS, f"Invalid params: {msg}")


def _pubkey(value: Any) -> Pubkey:
    try:
        return Pubkey.from_string(value)
    except Exception:
        raise _invalid(f"invalid pubkey {value!r}") from None


def _opts(params: list[Any], index: int) -> dict[str, Any]:
    if len(params) > index and isinstance(params[index], dict):
        return params[index]
    return {}


#: the most accounts one getProgramAccounts answer holds (public RPC nodes bound it too)
MAX_PROGRAM_ACCOUNTS = 10_000


def _account_filter(spec: Any) -> Callable[[bytes], bool]:
    """One getProgramAccounts filter as a test on an account's data."""
    if not isinstance(spec, dict):
        raise _invalid("a filter must be an object")
    if "dataSize" in spec:
        size = spec["dataSize"]
        if not isinstance(size, int):
            raise _invalid("dataSize must be an integer")
        return lambda data: len(data) == size
    memcmp = spec.get("memcmp")
    if not isinstance(memcmp, dict) or not isinstance(memcmp.get("offset"), int):
        raise _invalid("a filter is {dataSize} or {memcmp: {offset, bytes}}")
    offset, text = memcmp["offset"], memcmp.get("bytes")
    if not isinstance(text, str) or len(text) > 1024 or offset < 0:
        raise _invalid("memcmp.bytes must be a string of at most 1,024 characters")
    try:
        want = (base64.b64decode(text, validate=True) if memcmp.get("encoding") == "base64"
                else b58decode(text))
    except Exception:
        raise _invalid("memcmp.bytes is not valid base58/base64") from None
    return lambda data: data[offset:offset + len(want)] == want


class RpcHandler:
    def __init__(self, chain: LocalChain):
        self.chain = chain
        self.methods: dict[str, Callable[[list[Any]], Any]] = {
            name[4:]: getattr(self, name) for name in dir(self) if name.startswith("rpc_")
        }

    # -------------------------------------------------------------- helpers

    def ctx(self, value: Any) -> dict[str, Any]:
        return {"context": {"apiVersion": API_VERSION, "slot": self.chain.slot()}, "value": value}

    def account_json(self, pubkey: Pubkey, encoding: str = "base64") -> dict[str, Any] | None:
        acc = self.chain.get_account(pubkey)
        if acc is None:
            return None
        data = bytes(acc.data)
        if encoding == "base58":
            encoded: Any = [b58encode(data), "base58"]
        else:  # base64; jsonParsed falls back to base64 as real nodes do for unknown owners
            encoded = [base64.b64encode(data).decode(), "base64"]
        return {
            "data": encoded,
            "executable": acc.executable,
            "lamports": acc.lamports,
            "owner": str(acc.owner),
            "rentEpoch": acc.rent_epoch,
            "space": len(data),
        }

    def decode_tx(self, encoded: str, encoding: str) -> bytes:
        try:
            return base64.b64decode(encoded) if encoding == "base64" else b58decode(encoded)
        except Exception:
            raise _invalid("failed to decode transaction") from None

    # -------------------------------------------------------------- cluster

    def rpc_getHealth(self, params: list[Any]) -> str:
        return "ok"

    def rpc_getVersion(self, params: list[Any]) -> dict[str, Any]:
        return {"solana-core": API_VERSION, "feature-set": 0}

    def rpc_getGenesisHash(self, params: list[Any]) -> str:
        return str(self.chain.genesis_hash)

    def rpc_getSlot(self, params: list[Any]) -> int:
        return self.chain.slot()

    def rpc_getBlockHeight(self, params: list[Any]) -> int:
        return self.chain.block_height()

    def rpc_getTransactionCount(self, params: list[Any]) -> int:
        return self.chain.transaction_count()

    def rpc_getEpochInfo(self, params: list[Any]) -> dict[str, Any]:
        slot = self.chain.slot()
        return {
            "absoluteSlot": slot,
            "blockHeight": slot,
            "epoch": slot // 432_000,
            "slotIndex": slot % 432_000,
            "slotsInEpoch": 432_000,
            "transactionCount": self.chain.transaction_count(),
        }

    def rpc_getLatestBlockhash(self, params: list[Any]) -> dict[str, Any]:
        bh, lvbh = self.chain.latest_blockhash()
        return self.ctx({"blockhash": str(bh), "lastValidBlockHeight": lvbh})

    def rpc_isBlockhashValid(self, params: list[Any]) -> dict[str, Any]:
        if not params:
            raise _invalid("missing blockhash")
        try:
            bh = Hash.from_string(params[0])
        except Exception:
            raise _invalid("invalid blockhash") from None
        return self.ctx(self.chain.blockhash_slot(bh) is not None)

    def rpc_getMinimumBalanceForRentExemption(self, params: list[Any]) -> int:
        return self.chain.rent_exempt(int(params[0]) if params else 0)

    def rpc_getFeeForMessage(self, params: list[Any]) -> dict[str, Any]:
        raw = self.decode_tx(params[0], "base64")
        try:
            msg: Any = (
                MessageV0.from_bytes(raw[1:]) if raw and raw[0] & 0x80 else Message.from_bytes(raw)
            )
        except Exception:
            raise _invalid("invalid message") from None
        return self.ctx(msg.header.num_required_signatures * 5000)

    # -------------------------------------------------------------- accounts

    def rpc_getBalance(self, params: list[Any]) -> dict[str, Any]:
        return self.ctx(self.chain.balance(_pubkey(params[0] if params else None)))

    def rpc_getAccountInfo(self, params: list[Any]) -> dict[str, Any]:
        enc = _opts(params, 1).get("encoding", "base58")
        return self.ctx(self.account_json(_pubkey(params[0] if params else None), enc))

    def rpc_getMultipleAccounts(self, params: list[Any]) -> dict[str, Any]:
        enc = _opts(params, 1).get("encoding", "base58")
        keys = params[0] if params and isinstance(params[0], list) else []
        return self.ctx([self.account_json(_pubkey(k), enc) for k in keys])

    def rpc_getTokenAccountBalance(self, params: list[Any]) -> dict[str, Any]:
        got = self.chain.token_amount(_pubkey(params[0] if params else None))
        if got is None:
            raise _invalid("Invalid param: not a Token account")
        return self.ctx(ui_amount(*got))

    def rpc_getTokenSupply(self, params: list[Any]) -> dict[str, Any]:
        acc = self.chain.get_account(_pubkey(params[0] if params else None))
        if acc is None or acc.owner != spl.TOKEN_PROGRAM_ID or len(acc.data) != spl.MINT_SIZE:
            raise _invalid("Invalid param: not a Token mint")
        mint = spl.parse_mint(bytes(acc.data))
        return self.ctx(ui_amount(mint.supply, mint.decimals))

    def rpc_getTokenAccountsByOwner(self, params: list[Any]) -> dict[str, Any]:
        owner = _pubkey(params[0] if params else None)
        flt = _opts(params, 1)
        enc = _opts(params, 2).get("encoding", "base58")
        mint = _pubkey(flt["mint"]) if "mint" in flt else None
        if "programId" in flt and _pubkey(flt["programId"]) != spl.TOKEN_PROGRAM_ID:
            return self.ctx([])
        if mint is None and "programId" not in flt:
            raise _invalid("Invalid params: expected mint or programId filter")
        return self.ctx(
            [
                {"pubkey": str(pk), "account": self.account_json(pk, enc)}
                for pk, _ in self.chain.token_accounts_by_owner(owner, mint)
            ]
        )

    def rpc_getProgramAccounts(self, params: list[Any]) -> Any:
        """Accounts a program owns, with ``dataSize`` and ``memcmp`` filters (what
        anchorpy's ``account[...].all()`` sends: the 8-byte discriminator at offset 0)."""
        program = _pubkey(params[0] if params else None)
        opts = _opts(params, 1)
        enc = opts.get("encoding", "base58")
        tests = [_account_filter(f) for f in opts.get("filters") or []]
        found = [{"pubkey": str(pk), "account": self.account_json(pk, enc)}
                 for pk, acc in self.chain.program_accounts(program)
                 if all(test(bytes(acc.data)) for test in tests)]
        if len(found) > MAX_PROGRAM_ACCOUNTS:
            raise _invalid(f"more than {MAX_PROGRAM_ACCOUNTS} accounts match: add filters")
        return self.ctx(found) if opts.get("withContext") else found

    # -------------------------------------------------------------- transactions

    def rpc_sendTransaction(self, params: list[Any]) -> str:
        if not params or not isinstance(params[0], str):
            raise _invalid("missing transaction")
        opts = _opts(params, 1)
        raw = self.decode_tx(params[0], opts.get("encoding", "base58"))
        try:
            return str(self.chain.send(raw, preflight=not opts.get("skipPreflight", False)))
        except ChainError:
            raise
        except Exception as exc:  # malformed bytes, bad signature count, ...
            raise _invalid(f"failed to deserialize transaction: {exc}") from None

    def rpc_simulateTransaction(self, params: list[Any]) -> dict[str, Any]:
        opts = _opts(params, 1)
        raw = self.decode_tx(params[0], opts.get("encoding", "base58"))
        err, logs, units = self.chain.simulate(raw)
        return self.ctx(
            {
                "err": err,
                "logs": logs,
                "accounts": None,
                "unitsConsumed": units,
                "returnData": None,
                "innerInstructions": None,
                "replacementBlockhash": None,
            }
        )

    def rpc_requestAirdrop(self, params: list[Any]) -> str:
        if len(params) < 2:
            raise _invalid("expected pubkey and lamports")
        return str(self.chain.airdrop(_pubkey(params[0]), int(params[1])))

    def rpc_getSignatureStatuses(self, params: list[Any]) -> dict[str, Any]:
        sigs = params[0] if params and isinstance(params[0], list) else []
        if len(sigs) > 256:
            raise _invalid("Too many inputs provided; max 256")
        out = []
        for s in sigs:
            st = self.chain.signature_status(s)
            if st is None:
                out.append(None)
                continue
            slot, err = st
            out.append(
                {
                    "slot": slot,
                    "confirmations": None,
                    "err": err,
                    "status": {"Err": err} if err is not None else {"Ok": None},
                    "confirmationStatus": "finalized",
                }
            )
        return self.ctx(out)

    def rpc_getTransaction(self, params: list[Any]) -> dict[str, Any] | None:
        if not params:
            raise _invalid("missing signature")
        opts = params[1] if len(params) > 1 and isinstance(params[1], dict) else {}
        encoding = opts.get(
            "encoding", params[1] if len(params) > 1 and isinstance(params[1], str) else "json"
        )
        try:
            Signature.from_string(params[0])
        except Exception:
            raise _invalid("invalid signature") from None
        rec = self.chain.transaction(params[0])
        if rec is None:
            return None
        out = local_transaction_json(rec)
        if encoding == "base58":
            out["transaction"] = [b58encode(rec.raw), "base58"]
        elif encoding != "base64":  # json (and jsonParsed, served unparsed)
            out["transaction"] = self.ui_transaction(rec)
        return out

    def ui_transaction(self, rec: TxRecord) -> dict[str, Any]:
        vtx = rec.transaction
        msg = vtx.message
        h = msg.header
        message: dict[str, Any] = {
            "header": {
                "numRequiredSignatures": h.num_required_signatures,
                "numReadonlySignedAccounts": h.num_readonly_signed_accounts,
                "numReadonlyUnsignedAccounts": h.num_readonly_unsigned_accounts,
            },
            "accountKeys": [str(k) for k in msg.account_keys],
            "recentBlockhash": str(msg.recent_blockhash),
            "instructions": [
                {
                    "programIdIndex": ix.program_id_index,
                    "accounts": list(bytes(ix.accounts)),
                    "data": b58encode(bytes(ix.data)),
                    "stackHeight": None,
                }
                for ix in msg.instructions
            ],
        }
        if isinstance(msg, MessageV0):
            message["addressTableLookups"] = []
        return {"signatures": [str(s) for s in vtx.signatures], "message": message}

    def rpc_getSignaturesForAddress(self, params: list[Any]) -> list[dict[str, Any]]:
        addr = _pubkey(params[0] if params else None)
        opts = _opts(params, 1)
        limit = int(opts.get("limit") or 1000)
        if not 1 <= limit <= 1000:
            raise _invalid("Invalid limit; max 1000")
        recs = self.chain.signatures_for_address(
            addr, before=opts.get("before"), until=opts.get("until"), limit=limit
        )
        return [
            {
                "signature": r.signature,
                "slot": r.slot,
                "err": r.err,
                "memo": spl.format_memo_field(r.memos),
                "blockTime": r.block_time,
                "confirmationStatus": "finalized",
            }
            for r in recs
        ]

    # -------------------------------------------------------------- development only

    def rpc_aidp_advanceSlots(self, params: list[Any]) -> int:
        n = int(params[0]) if params else 1
        if not 0 <= n <= 1_000_000:
            raise _invalid("0 <= slots <= 1000000")
        return self.chain.advance(n)

    # -------------------------------------------------------------- dispatch

    def call(self, req: Any) -> dict[str, Any] | None:
        if not isinstance(req, dict) or req.get("jsonrpc") != "2.0" or "method" not in req:
            return {
                "jsonrpc": "2.0",
                "error": {"code": INVALID_REQUEST, "message": "Invalid request"},
                "id": None,
            }
        rid = req.get("id")
        fn = self.methods.get(req["method"])
        if fn is None:
            return {
                "jsonrpc": "2.0",
                "error": {"code": METHOD_NOT_FOUND, "message": "Method not found"},
                "id": rid,
            }
        params = req.get("params") or []
        if not isinstance(params, list):
            params = [params]
        try:
            result = fn(params)
        except ChainError as exc:
            err: dict[str, Any] = {"code": exc.code, "message": exc.message}
            if exc.data is not None:
                err["data"] = exc.data
            return {"jsonrpc": "2.0", "error": err, "id": rid}
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            return {
                "jsonrpc": "2.0",
                "error": {"code": INVALID_PARAMS, "message": f"Invalid params: {exc}"},
                "id": rid,
            }
        return {"jsonrpc": "2.0", "result": result, "id": rid}


def create_app(chain: LocalChain) -> Starlette:
    handler = RpcHandler(chain)

    async def rpc(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse(
                {
                    "jsonrpc": "2.0",
                    "error": {"code": PARSE_ERROR, "message": "Parse error"},
                    "id": None,
                }
            )
        if isinstance(body, list):
            if not body:
                return JSONResponse(
                    {
                        "jsonrpc": "2.0",
                        "error": {"code": INVALID_REQUEST, "message": "Invalid request"},
                        "id": None,
                    }
                )
            return JSONResponse(await run_in_threadpool(lambda: [handler.call(r) for r in body]))
        # LiteSVM execution and SQLite writes block: keep them off the event loop (the
        # chain's own lock serialises them), so /health and other requests stay responsive
        return JSONResponse(await run_in_threadpool(handler.call, body))

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    # browsers (the explorer verifying an anchor) call this endpoint from another origin,
    # as they do public Solana RPC nodes
    middleware = [
        Middleware(
            CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    ]
    app = Starlette(
        middleware=middleware,
        routes=[Route("/", rpc, methods=["POST"]), Route("/health", health, methods=["GET"])],
    )
    app.state.chain = chain
    return app
