"""``aidp-ledger``: a local Solana JSON-RPC endpoint over LiteSVM.

    aidp-ledger serve --port 8899 --data-dir .aidp/ledger

Market, node agents and tools in separate processes then share one chain at
http://127.0.0.1:8899 (``AIDP_CHAIN__LEDGER_URL``); ``solana`` CLI and solana-py work against it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

DESCRIPTION = """\
A development Solana chain for Neural Cloud. It runs the real SPL Token, Associated
Token Account and Memo programs in LiteSVM, answers the Solana JSON-RPC methods that
solana-py and the market use (getLatestBlockhash, sendTransaction, getSignatureStatuses,
getTransaction, getSignaturesForAddress, getAccountInfo, getBalance, requestAirdrop, ...),
and keeps accounts and transactions in DATA_DIR so a restart loses nothing."""

EPILOG = """\
examples:
  aidp-ledger serve                                   # http://127.0.0.1:8899, data in .aidp/ledger
  aidp-ledger serve --port 0 --data-dir /tmp/chain    # any free port; read it from the ready line
  AIDP_CHAIN__LEDGER_URL=http://127.0.0.1:8899 aidp-market up

The ready line, printed once the port is bound, is:
  aidp-ledger ready url=http://HOST:PORT data_dir=DIR slot=N accounts=N transactions=N"""

READY = "aidp-ledger ready "


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aidp-ledger",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve a Solana JSON-RPC endpoint over a persistent local chain",
        description="Serve a Solana JSON-RPC endpoint over a persistent LiteSVM chain.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
    )
    serve.add_argument(
        "--port", type=int, default=8899, help="TCP port, 0 for any free one (default: %(default)s)"
    )
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".aidp/ledger"),
        help="where accounts and transactions persist (default: %(default)s)",
    )
    serve.add_argument(
        "--slot-ms",
        type=int,
        default=400,
        help="milliseconds per slot; blockhashes live 150 slots (default: %(default)s)",
    )
    serve.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="(default: %(default)s)",
    )
    return parser


def serve(host: str, port: int, data_dir: Path, slot_ms: int, log_level: str) -> int:
    import uvicorn

    from chain.localnet.chain import ChainError, LocalChain
    from chain.localnet.server import create_app

    try:
        chain = LocalChain(data_dir, slot_ms=slot_ms)
    except ChainError as exc:
        print(f"aidp-ledger: {exc.message}", file=sys.stderr)
        return 1
    app = create_app(chain)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="off", access_log=False
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:  # type: ignore[override]
            await super().startup(sockets=sockets)
            if self.should_exit:
                return
            bound = self.servers[0].sockets[0].getsockname() if self.servers else (host, port)
            print(
                f"{READY}url=http://{bound[0]}:{bound[1]} data_dir={data_dir} "
                f"slot={chain.slot()} accounts={chain.restored_accounts} "
                f"transactions={chain.transaction_count()}",
                flush=True,
            )

    server = Server(config)
    try:
        asyncio.run(server.serve())
    finally:
        chain.close()
    return 0 if server.started else 1


def ready_fields(line: str) -> dict[str, str] | None:
    """The ``key=value`` fields of the ready line; None for any other line."""
    if not line.startswith(READY):
        return None
    return dict(f.split("=", 1) for f in line[len(READY) :].split())


class LedgerProcess:
    """``aidp-ledger serve`` in a child process on a free loopback port.

    For tools and tests that need a JSON-RPC chain of their own: ``start`` returns once the
    ready line is printed, so ``url`` is the address actually bound."""

    def __init__(self, data_dir: Path, *, cwd: Path | None = None):
        self.data_dir = data_dir
        self.cwd = cwd or Path(__file__).resolve().parents[1]
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.ready_line = ""

    def start(self, timeout: float = 30.0) -> LedgerProcess:
        """Spawn the server and wait for its ready line; RuntimeError with its output if none."""
        cmd = [sys.executable, "-m", "chain.localnet.cli", "serve", "--port", "0",
               "--data-dir", str(self.data_dir)]
        self.proc = subprocess.Popen(
            cmd, cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        seen = self._read_until_ready(timeout)
        if self.url:
            return self
        self.stop()
        raise RuntimeError("aidp-ledger did not become ready:\n" + "".join(seen))

    def _read_until_ready(self, timeout: float) -> list[str]:
        """The child's output up to its ready line (which sets ``url``), EOF or ``timeout``."""
        assert self.proc is not None and self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline and sel.select(timeout=deadline - time.monotonic()):
            line = self.proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            fields = ready_fields(line)
            if fields is not None:
                self.ready_line, self.url = line.strip(), fields["url"]
                break
        sel.close()
        return seen

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the chain closes its store cleanly), SIGKILL if it does not exit in time."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level.upper())
    return serve(args.host, args.port, args.data_dir, args.slot_ms, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
