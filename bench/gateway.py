"""Gateway overhead: streamed chat completions through the market vs the engine direct.

Starts a real market (uvicorn, its own process, SQLite in a temp dir unless
``--database-url``) and a real node agent link (its own process) serving the
deterministic engine, then at each concurrency level runs the same requests

* direct: the same engine class, in this process, no network;
* market: the ``POST /v1/chat/completions`` stream (SSE) through the market, which
  authenticates, holds funds, routes, relays over the node link, checks the signed
  receipt and finalizes billing before ``[DONE]``.

Added latency = market − direct, per percentile, for TTFT and for the whole request.
Prints one JSON object. Target: added p50 ≤ 2 ms, p99 ≤ 10 ms at 32 concurrent streams.

The load is steady by default: a level's streams start spread over one request's
duration (each client's connection already open), so that many are in flight all
along; ``--burst`` starts them at one instant instead, which measures how long the
last of a simultaneous burst waits. The engine emits tokens on a fixed clock, as a
real engine decoding in its own thread does, on both paths.

    python bench/gateway.py [--concurrency 1,32,64] [--requests 300] [--max-tokens 16]
                            [--token-delay 0.02] [--database-url postgresql://…] [--burst]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference.base import TokenDelta  # noqa: E402
from inference.convert import generation_request  # noqa: E402
from inference.fake import DeterministicEngine, fake_sha256  # noqa: E402
from protocol.runtime import run_event_loop  # noqa: E402
from tests.support.net import free_port, stop_process  # noqa: E402

MODEL = "bench-model"
ADMIN = "bench-admin-token"
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "tell me a story"},
]

NODE_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from solders.keypair import Keypair
    sys.path.insert(0, sys.argv[4])
    from node_agent.link import NodeLink
    from protocol.runtime import run_event_loop, tune_for_latency
    from inference.fake import DeterministicEngine

    async def main():
        engine = DeterministicEngine(model_id=sys.argv[2], token_delay=float(sys.argv[3]))
        link = NodeLink(sys.argv[1], Keypair(), engine, price=(100, 200), max_concurrency=512)
        tune_for_latency()  # as `aidp-node run` does
        await link.run()

    run_event_loop(main())
    """
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(values, 50) * 1000, 3),
        "p99_ms": round(pct(values, 99) * 1000, 3),
        "mean_ms": round(statistics.fmean(values) * 1000, 3) if values else float("nan"),
    }


async def run_direct(
    n: int, concurrency: int, max_tokens: int, token_delay: float, stagger: float = 0.0
) -> dict[str, Any]:
    engine = DeterministicEngine(model_id=MODEL, token_delay=token_delay)
    ttfts: list[float] = []
    totals: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker(index: int) -> None:
        await asyncio.sleep(index * stagger)
        while not queue.empty():
            queue.get_nowait()
            request = generation_request("chat", {"messages": MESSAGES,
                                                  "max_tokens": max_tokens})
            t0 = time.perf_counter()
            first = None
            async for event in engine.generate(request):
                if isinstance(event, TokenDelta) and first is None:
                    first = time.perf_counter()
            end = time.perf_counter()
            ttfts.append((first or end) - t0)
            totals.append(end - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    wall = time.perf_counter() - start
    return {"ttft": ttfts, "total": totals, "rps": n / wall}


class SSEConnection:
    """A lean HTTP/1.1 keep-alive client for one SSE request at a time.

    The load generator shares two cores with the market and the node; httpx's per-line
    overhead would be charged to the gateway. This reads the chunked body directly and
    only looks for the first ``data: {`` event and the final ``data: [DONE]``.
    """

    def __init__(self, host: str, port: int, key: str) -> None:
        self.host, self.port, self.key = host, port, key
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, body: bytes) -> tuple[float | None, bool, int]:
        """POST one streamed completion; returns (first event time, saw [DONE], status)."""
        await self.connect()
        assert self.reader is not None
        self.writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\n"
            b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (self.host.encode(), self.key.encode(), len(body), body)
        )
        status = int((await self.reader.readline()).split()[1])
        chunked, length = False, 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name.lower() == "content-length":
                length = int(value)
        first: float | None = None
        done = False
        if not chunked:
            await self.reader.readexactly(length)
            return None, False, status
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            if first is None and b"data: {" in data:
                first = time.perf_counter()
            if b"data: [DONE]" in data:
                done = True
        return first, done, status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run_market(
    url: str, key: str, n: int, concurrency: int, max_tokens: int, stagger: float = 0.0
) -> dict[str, Any]:
    ttfts: list[float] = []
    totals: list[float] = []
    errors = 0
    remaining = n
    body = json.dumps(
        {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}
    ).encode()
    host, _, port = url.removeprefix("http://").partition(":")

    async def worker(index: int) -> None:
        nonlocal errors, remaining
        conn = SSEConnection(host, int(port), key)
        await conn.connect()  # a client with its connection open, as an SDK's pool keeps it
        await asyncio.sleep(index * stagger)
        try:
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                first, done, status = await conn.request(body)
                end = time.perf_counter()
                if status != 200 or not done:
                    errors += 1
                    continue
                ttfts.append((first or end) - t0)
                totals.append(end - t0)
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    wall = time.perf_counter() - start
    return {"ttft": ttfts, "total": totals, "rps": len(totals) / wall, "errors": errors}


def start_market(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "market.app:app_factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
         "--no-access-log"],
        env={**env, "AIDP_PORT": str(port)},  # the market's identity nodes sign
        cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} not ready after {timeout}s")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="aidp-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "AIDP_DB__URL": args.database_url or f"sqlite:///{tmp}/market.db",
        "AIDP_ADMIN_TOKEN": ADMIN,
        "AIDP_LIMITS__RATE_LIMIT_RPM": "100000000",
        "AIDP_DATA_DIR": str(tmp),
        "AIDP_LIST_DEFAULT_MODEL": "false",
        "AIDP_MODELS": json.dumps({MODEL: {"sha256": [fake_sha256(MODEL)],
                                           "vocabulary": "fake"}}),
        "PYTHONPATH": str(ROOT),
    }
    market = start_market(port, env, tmp / "market.log")
    node = None
    try:
        wait_until(lambda: httpx.get(f"{url}/healthz", timeout=1).is_success, 60, "market")
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
        account = admin.post("/admin/accounts", json={"name": "bench"}).raise_for_status().json()
        admin.post(f"/admin/accounts/{account['id']}/credit",
                   json={"amount": 10**15}).raise_for_status()
        key = admin.post(f"/admin/accounts/{account['id']}/keys", json={}).raise_for_status()
        api_key = key.json()["key"]
        node = subprocess.Popen(
            [sys.executable, "-c", NODE_SCRIPT, url, MODEL, str(args.token_delay), str(ROOT)],
            env=env, cwd=ROOT, stdout=(tmp / "node.log").open("wb"), stderr=subprocess.STDOUT,
        )
        headers = {"Authorization": f"Bearer {api_key}"}
        wait_until(
            lambda: any(m["id"] == MODEL for m in httpx.get(
                f"{url}/v1/models", headers=headers, timeout=2).json()["data"]),
            60, "node",
        )
        # warm up both paths (connections, caches, SQLite pages)
        await run_market(url, api_key, 50, 8, args.max_tokens)
        await run_direct(50, 8, args.max_tokens, args.token_delay)

        results = []
        for concurrency in args.concurrency:
            n = max(args.requests, concurrency * 4)
            # Streams start spread over one request's duration, so `concurrency` of them
            # are in flight all along; --burst starts them all at the same instant.
            stagger = 0.0 if args.burst else args.max_tokens * args.token_delay / concurrency
            direct = await run_direct(n, concurrency, args.max_tokens, args.token_delay, stagger)
            through = await run_market(url, api_key, n, concurrency, args.max_tokens, stagger)
            row = {
                "concurrency": concurrency,
                "requests": n,
                "errors": through["errors"],
                "direct": {"ttft": summary(direct["ttft"]), "total": summary(direct["total"]),
                           "req_per_s": round(direct["rps"], 1)},
                "market": {"ttft": summary(through["ttft"]), "total": summary(through["total"]),
                           "req_per_s": round(through["rps"], 1)},
            }
            row["added"] = {
                part: {
                    q: round(row["market"][part][q] - row["direct"][part][q], 3)
                    for q in ("p50_ms", "p99_ms")
                }
                for part in ("ttft", "total")
            }
            results.append(row)
            print(json.dumps({"progress": row["concurrency"], "added": row["added"]}),
                  file=sys.stderr, flush=True)
        return {
            "bench": "gateway",
            "model": MODEL,
            "max_tokens": args.max_tokens,
            "token_delay_s": args.token_delay,
            "start": "burst" if args.burst else "staggered",
            "database": "postgresql" if args.database_url else "sqlite",
            "cpus": os.cpu_count(),
            "results": results,
            "target": {"concurrency": 32, "added_p50_ms": 2.0, "added_p99_ms": 10.0},
        }
    finally:
        for proc in (node, market):
            if proc is not None:
                stop_process(proc, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,32,64",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--requests", type=int, default=300, help="requests per level (min)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--token-delay", type=float, default=0.02,
                        help="engine seconds per token: 0.02 = 50 tokens/s per stream, like a "
                        "GPU node; 0 = as fast as the engine goes (measures saturation)")
    parser.add_argument("--database-url", help="default: SQLite in a temp dir")
    parser.add_argument("--burst", action="store_true",
                        help="start every stream of a level at once (default: spread over "
                        "one request's duration, a steady load)")
    args = parser.parse_args()
    print(json.dumps(run_event_loop(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
