"""The node agent against the real market (market.app) and the openai SDK.

- NodeLink in-process (DeterministicEngine): the market accepts its receipts.
- ``aidp-node run`` as a real process with llama.cpp: prints a ready line, serves a
  chat completion, exposes /metrics, and drains on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from solders.keypair import Keypair

from node_agent.link import NodeLink
from protocol.canonical import sha256_hex
from protocol.keys import save_keypair
from protocol.receipt import SignedReceipt
from tests.support.engines import DeterministicEngine
from tests.support.net import free_port

REPO = Path(__file__).resolve().parents[2]


async def wait_routable(market, link: NodeLink, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while link.node_id not in market.app.state.market.registry.links:
        assert time.monotonic() < deadline, "node never became routable"
        await asyncio.sleep(0.02)


async def test_node_link_serves_through_the_real_market(real_market) -> None:
    keypair = Keypair()
    model = "node-it-model"
    link = NodeLink(
        real_market.url,
        keypair,
        DeterministicEngine(model_id=model),
        price=(100, 200),
        max_concurrency=4,
        backoff_initial=0.05,
    )
    task = asyncio.create_task(link.run())
    try:
        await link.wait_ready(15)
        await wait_routable(real_market, link)
        client = openai.AsyncOpenAI(
            base_url=f"{real_market.url}/v1",
            api_key=real_market.buyer_key(),
            max_retries=0,
            timeout=60,
        )
        messages = [{"role": "user", "content": "hello"}]
        reply = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=16, temperature=0
        )
        text = reply.choices[0].message.content or ""
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=16, temperature=0, stream=True
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert streamed == text and reply.usage.completion_tokens > 0
        await client.close()
        mine = [
            r
            for r in real_market.receipts()
            if r.receipt["body"]["node_pubkey"] == str(keypair.pubkey())
        ]
        assert len(mine) == 2
        for row in mine:
            receipt = SignedReceipt.model_validate(row.receipt)
            assert receipt.signature_valid() and receipt.token_ids_consistent()
            assert receipt.body.output_sha256 == sha256_hex(text)
    finally:
        await link.stop()
        await task


class NodeProcess:
    """``aidp-node run`` in a subprocess with its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node_agent.cli", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {prefix!r} line; output:\n" + "\n".join(self.lines))


@pytest.mark.slow
def test_aidp_node_run_end_to_end(real_market, tmp_path) -> None:
    keypair_path = tmp_path / "id.json"
    save_keypair(Keypair(), keypair_path)
    metrics_port = free_port()
    env = {**os.environ, "AIDP_NODE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    node = NodeProcess(
        [
            "run",
            "--market",
            real_market.url,
            "--keypair",
            str(keypair_path),
            "--metrics-port",
            str(metrics_port),
            "--price-in",
            "10",
            "--price-out",
            "20",
            "--threads",
            "2",
            "--ctx",
            "2048",
        ],
        env,
    )
    try:
        started = time.monotonic()
        ready = node.wait_for("ready:", 120)
        startup_s = time.monotonic() - started
        assert "SmolLM2-135M-Instruct" in ready and "llamacpp" in ready
        client = openai.OpenAI(
            base_url=f"{real_market.url}/v1",
            api_key=real_market.buyer_key(),
            max_retries=0,
            timeout=120,
        )
        deadline = time.monotonic() + 10
        while True:  # the market may take a heartbeat to route to a fresh node
            try:
                reply = client.chat.completions.create(
                    model="SmolLM2-135M-Instruct",
                    messages=[{"role": "user", "content": "Say hi."}],
                    max_tokens=12,
                    temperature=0,
                )
                break
            except openai.APIStatusError as exc:
                if exc.status_code != 503 or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        assert 'aidp_node_jobs_total{model="SmolLM2-135M-Instruct"} 1.0' in metrics
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(timeout=30) == 0
        node.wait_for("stopped after 1 job(s)", 5)
        print(f"aidp-node run: ready in {startup_s:.1f}s")
    finally:
        if node.proc.poll() is None:
            node.proc.kill()
