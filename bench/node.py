"""Node agent overhead: the engine called directly vs through node agent + market.

    python bench/node.py [--requests 16] [--max-tokens 64] [--concurrency 1 8] [--engine llamacpp]

Direct: ``engine.generate`` in this process. Through the market: the market runs as a
real uvicorn process (SQLite in a temp dir), this process runs the node agent
(``NodeLink`` around the same started engine) and buyers stream through the openai
SDK. Greedy decoding, so both paths generate the same tokens. Prints JSON: aggregate
tokens/s and TTFT per path and concurrency, and the ratio market/direct (target ≥ 0.95).
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
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.net import free_port, stop_process  # noqa: E402

PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Name three colors.",
    "Explain gravity in one sentence.",
    "Give me a fun fact about cats.",
    "What is 12 times 7?",
    "Describe a sunset.",
    "Suggest a name for a dog.",
]


def summarize(ttfts: list[float], tokens: int, wall: float) -> dict[str, Any]:
    ttfts = sorted(ttfts)
    return {
        "requests": len(ttfts),
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_ms_p50": round(1000 * statistics.median(ttfts), 1),
        "ttft_ms_max": round(1000 * ttfts[-1], 1),
    }


async def bench_direct(engine: Any, n: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    from inference.base import TokenDelta
    from inference.convert import generation_request

    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        request = generation_request(
            "chat",
            {
                "messages": [{"role": "user", "content": PROMPTS[i % 8]}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        )
        async with sem:
            t0 = time.perf_counter()
            first = None
            async for event in engine.generate(request):
                if isinstance(event, TokenDelta):
                    if first is None and event.text:
                        first = time.perf_counter() - t0
                    tokens += len(event.token_ids)
            ttfts.append(first if first is not None else time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return summarize(ttfts, tokens, time.perf_counter() - start)


async def bench_market(
    client: Any, model: str, n: int, concurrency: int, max_tokens: int
) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        async with sem:
            t0 = time.perf_counter()
            first = None
            usage = 0
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": PROMPTS[i % 8]}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter() - t0
                if chunk.usage is not None:  # the final usage chunk (may repeat: take the last)
                    usage = chunk.usage.completion_tokens
            tokens += usage
            ttfts.append(first if first is not None else time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return summarize(ttfts, tokens, time.perf_counter() - start)


class MarketProcess:
    def __init__(self, workdir: str) -> None:
        self.port = free_port()
        self.admin = "bench-admin-token"
        env = {
            **os.environ,
            "AIDP_DB__URL": f"sqlite:///{workdir}/market.db",
            "AIDP_DATA_DIR": workdir,
            "AIDP_ADMIN_TOKEN": self.admin,
            "AIDP_PORT": str(self.port),  # the market's identity nodes sign
            "AIDP_ROUTING__HEARTBEAT_INTERVAL": "1.0",
            "AIDP_LIMITS__RATE_LIMIT_RPM": "1000000",
            "AIDP_BROKER__URL": f"sqla+sqlite:///{workdir}/broker.db",
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "market.app:app_factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--ws-ping-interval",
                "0",
            ],
            cwd=REPO,
            env=env,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 60) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"market exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("market did not start")

    def buyer_key(self) -> str:
        import httpx

        with httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.admin}"}
        ) as c:
            account = c.post("/admin/accounts", json={"name": "bench"}).raise_for_status().json()
            c.post(
                f"/admin/accounts/{account['id']}/credit", json={"amount": 10**15}
            ).raise_for_status()
            return str(
                c.post(f"/admin/accounts/{account['id']}/keys", json={"name": "b"})
                .raise_for_status()
                .json()["key"]
            )

    def stop(self) -> None:
        stop_process(self.proc, 15)


def stored_receipts(workdir: str, limit: int) -> list[dict[str, Any]]:
    """The last receipts the market stored (read straight from its SQLite file)."""
    import sqlite3

    from protocol.receipt import SignedReceipt

    with sqlite3.connect(f"{workdir}/market.db") as db:
        rows = db.execute(
            "SELECT receipt FROM receipts ORDER BY rowid DESC LIMIT ?", (limit,)
        ).fetchall()
    out = []
    for (raw,) in rows:
        receipt = SignedReceipt.model_validate(json.loads(raw) if isinstance(raw, str) else raw)
        body = receipt.body.model_dump(mode="json")
        out.append(
            {
                "receipt_hash": receipt.receipt_hash,
                "signature_valid": receipt.signature_valid(),
                "body": body,
                "output_token_ids": len(receipt.output_token_ids),
            }
        )
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import openai
    from solders.keypair import Keypair

    from node_agent.engines import create_engine
    from node_agent.gpu import GpuMonitor
    from node_agent.link import NodeLink
    from node_agent.settings import NodeSettings

    settings = NodeSettings(
        engine=args.engine,
        model_path=args.model_path,
        threads=args.threads,
        n_ctx=2048,
        device=args.device,
        **({"model": args.model} if args.model else {}),
    )
    engine = create_engine(settings)
    await engine.start()
    gpu = GpuMonitor()
    model = engine.model.id
    result: dict[str, Any] = {
        "engine": engine.name,
        "engine_version": engine.version,
        "model": model,
        "max_tokens": args.max_tokens,
        "requests": args.requests,
        "cpu_count": os.cpu_count(),
        "gpu": gpu.note,
        "runs": {},
    }
    # warm-up (kernels, allocator, caches)
    await bench_direct(engine, args.warmup, 1, args.max_tokens)

    workdir = tempfile.mkdtemp(prefix="aidp-bench-")
    market = MarketProcess(workdir)
    link = None
    task = None
    try:
        market.wait()
        link = NodeLink(
            market.url,
            Keypair(),
            engine,
            price=(1, 1),
            max_concurrency=max(args.concurrency),
            gpu_monitor=gpu,
        )
        task = asyncio.create_task(link.run())
        await link.wait_ready(30)
        client = openai.AsyncOpenAI(
            base_url=f"{market.url}/v1", api_key=market.buyer_key(), max_retries=0, timeout=600
        )
        deadline = time.monotonic() + 15
        while True:  # first routable heartbeat
            try:
                await bench_market(client, model, 1, 1, 4)
                break
            except openai.APIStatusError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        for c in args.concurrency:
            n = max(args.requests, c)
            # direct, market, direct again: the mean of both direct runs is the baseline,
            # so drift (clocks, caches) during the run does not favour either path.
            first = await bench_direct(engine, n, c, args.max_tokens)
            through = await bench_market(client, model, n, c, args.max_tokens)
            second = await bench_direct(engine, n, c, args.max_tokens)
            direct = dict(first)
            direct["tokens_per_s"] = round((first["tokens_per_s"] + second["tokens_per_s"]) / 2, 2)
            direct["ttft_ms_p50"] = round((first["ttft_ms_p50"] + second["ttft_ms_p50"]) / 2, 1)
            result["runs"][f"concurrency_{c}"] = {
                "direct": direct,
                "direct_runs_tokens_per_s": [first["tokens_per_s"], second["tokens_per_s"]],
                "market": through,
                "tokens_per_s_ratio": round(through["tokens_per_s"] / direct["tokens_per_s"], 3),
                "ttft_added_ms_p50": round(through["ttft_ms_p50"] - direct["ttft_ms_p50"], 1),
            }
        await client.close()
    finally:
        if link is not None:
            await link.stop()
        if task is not None:
            await task
        market.stop()
        await engine.close()
        gpu.close()
    if args.show_receipts:
        result["receipts"] = stored_receipts(workdir, args.show_receipts)
    ratios = [r["tokens_per_s_ratio"] for r in result["runs"].values()]
    result["min_ratio"] = min(ratios) if ratios else None
    result["target_met"] = bool(ratios) and min(ratios) >= 0.95
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--engine", default="llamacpp", choices=["llamacpp", "transformers", "vllm"]
    )
    parser.add_argument("--model", default=None, help="model id (default SmolLM2-135M-Instruct)")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--warmup", type=int, default=2, metavar="N", help="warm-up requests before timing"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--show-receipts",
        type=int,
        default=0,
        metavar="N",
        help="include the last N receipts the market stored (GPU metrics!)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
