"""A whole local network started the way ``make up`` starts it, in a temporary folder.

One network per test session (it loads real SmolLM2 weights on 2 cores, so it is
shared); ``aidp-market down`` stops it at the end whatever happened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.net import free_port

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Network:
    data_dir: Path
    market_url: str
    ledger_url: str
    node_metrics_url: str
    api_key: str
    env: dict[str, str]

    @property
    def database_url(self) -> str:
        return self.env["AIDP_DB__URL"]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "aidp-market"), *args], env=self.env, text=True,
                              capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def network(tmp_path_factory: pytest.TempPathFactory, artifacts_dir: Path) -> Iterator[Network]:
    data_dir = tmp_path_factory.mktemp("network")
    port, ledger_port, node_metrics_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "AIDP_DATA_DIR": str(data_dir),
        "AIDP_PORT": str(port),
        "AIDP_DB__URL": f"sqlite:///{data_dir}/market.db",
        "AIDP_BROKER__URL": f"sqla+sqlite:///{data_dir}/broker.db",
        "AIDP_VERIFY__CHALLENGE_WINDOW_S": "20",
        "AIDP_CHAIN__ANCHOR_INTERVAL_S": "2",
        "AIDP_CHAIN__SETTLE_INTERVAL_S": "5",
        "AIDP_NODE_METRICS_PORT": str(node_metrics_port),
    }
    up = subprocess.run(
        [str(BIN / "aidp-market"), "up", "--ledger-port", str(ledger_port)],
        env=env, text=True, capture_output=True, timeout=600,
    )
    (artifacts_dir / "make-up.log").write_text(up.stdout + up.stderr)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        demo = json.loads((data_dir / "run" / "demo.json").read_text())
        yield Network(data_dir=data_dir, market_url=demo["market_url"],
                      ledger_url=f"http://127.0.0.1:{ledger_port}",
                      node_metrics_url=f"http://127.0.0.1:{node_metrics_port}/metrics",
                      api_key=demo["api_key"], env=env)
    finally:
        subprocess.run([str(BIN / "aidp-market"), "down"], env=env, timeout=60)
        for log in (data_dir / "run").glob("*.log"):
            (artifacts_dir / f"network-{log.name}").write_text(log.read_text(errors="replace"))
