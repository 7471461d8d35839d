"""Pick a ledger backend by URL: the in-process chain, or a JSON-RPC node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chain.ledger.base import Ledger
from chain.ledger.inprocess import InProcessLedger
from chain.ledger.rpc import RpcLedger
from chain.localnet.chain import LocalChain


def open_ledger(url: str, data_dir: Path | str | None = None, **kwargs: Any) -> Ledger:
    """The factory behind ``MarketSettings.ledger_url``.

    ``"inprocess"`` persists under ``data_dir/ledger`` (or in memory without a
    ``data_dir``); ``"memory"`` never persists; an ``http(s)://`` URL is a JSON-RPC node.
    """
    if url in ("inprocess", "memory"):
        path = Path(data_dir) / "ledger" if (url == "inprocess" and data_dir is not None) else None
        return InProcessLedger(LocalChain(path, **kwargs))
    if url.startswith(("http://", "https://")):
        return RpcLedger(url, **kwargs)
    raise ValueError(
        f"ledger url must be 'inprocess', 'memory' or an http(s) JSON-RPC URL, not {url!r}"
    )
