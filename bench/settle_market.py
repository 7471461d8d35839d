"""Market-level settlement benchmark: the market's own tasks over its own database.

    python bench/settle_market.py [--jobs 2000] [--nodes 10] [--backend inprocess|rpc|both]

Puts ``--jobs`` settled receipts of ``--nodes`` nodes in a fresh SQLite market DB, runs
``aidp-market chain init`` and then the real settlement steps (``market.onchain.service``):
one payout round (one transfer per node with its Merkle-root memo + one fee transfer,
each through the exactly-once ``chain_transfers`` state machine) and one anchor (a memo
with the Merkle root of all receipts; ``anchors`` row + ``receipts.anchor_id`` written on
confirmation). Backends: the in-process LiteSVM chain, and an ``aidp-ledger`` server
started here (solana-py over HTTP). Prints one JSON object:

* ``jobs_settled_per_s``: jobs / wall time of the payout round + anchor (DB + chain);
* ``lamports_per_1000_jobs``: transaction fees the market paid (5,000 per signature),
  and ``rent_per_1000_jobs`` apart (first payout creates each node's token account).
The chain-level numbers (transfers/s, batched vs unbatched fees) are in bench/settle.py.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import func, insert, select  # noqa: E402

from chain.ledger.open import open_ledger  # noqa: E402
from chain.localnet.cli import LedgerProcess  # noqa: E402
from market.db import sync_session_factory  # noqa: E402
from market.migrate import upgrade  # noqa: E402
from market.models import Account, ChainTransfer, Job, Node, Receipt, new_id, utcnow  # noqa: E402
from market.onchain import bootstrap, service  # noqa: E402
from market.onchain.runtime import open_runtime  # noqa: E402
from market.settings import MarketSettings, nested  # noqa: E402

EARNING, FEE = 900, 100


def seed(sessions, jobs: int, nodes: int) -> None:
    from solders.keypair import Keypair

    now = utcnow()
    with sessions.begin() as s:
        acct = Account(name="bench", balance=0, held=0)
        s.add(acct)
        node_ids = []
        for _ in range(nodes):
            node = Node(pubkey=str(Keypair().pubkey()))
            s.add(node)
            s.flush()
            node_ids.append(node.id)
        job_rows, receipt_rows = [], []
        for i in range(jobs):
            jid = new_id("job")
            job_rows.append({"id": jid, "account_id": acct.id, "model": "m", "kind": "chat",
                             "request": {}, "status": "completed", "created_at": now})
            receipt_rows.append({
                "id": new_id("rcpt"), "job_id": jid, "node_id": node_ids[i % nodes], "seq": 0,
                "receipt": {}, "receipt_hash": hashlib.sha256(f"{jid}".encode()).hexdigest(),
                "signature": "-", "output_text": "", "cost": EARNING + FEE,
                "node_earning": EARNING, "fee": FEE, "state": "settled",
                "window_closes_at": now - timedelta(seconds=1), "state_changed_at": now,
                "created_at": now,
            })
        s.execute(insert(Job), job_rows)
        s.execute(insert(Receipt), receipt_rows)


async def run(backend: str, jobs: int, nodes: int, work: Path) -> dict:
    server = None
    if backend == "rpc":
        server = LedgerProcess(work / "ledger", cwd=REPO).start(timeout=60)
        url = server.url
    else:
        url = "memory"
    db_url = f"sqlite:///{work}/market.db"
    upgrade(db_url)
    settings = MarketSettings(**nested(dict(db__url=db_url, data_dir=work / "data", chain__ledger_url=url,
                              chain__demo_wallets=0, chain__demo_tokens=jobs * (EARNING + FEE),
                              chain__batch=max(jobs, 1))))
    sessions = sync_session_factory(db_url)
    ledger = open_ledger(url)
    try:
        await bootstrap.init(settings, sessions, ledger=ledger)
        seed(sessions, jobs, nodes)
        async with open_runtime(settings, ledger) as rt:
            before = await ledger.get_balance(rt.cfg.market_pk)
            t0 = time.perf_counter()
            settled = await service.settle_step(rt, sessions)
            t1 = time.perf_counter()
            anchored = await service.anchor_step(rt, sessions)
            t2 = time.perf_counter()
            spent = before - await ledger.get_balance(rt.cfg.market_pk)
            fees = 0
            with sessions() as s:
                sigs = s.execute(select(ChainTransfer.signature).where(
                    ChainTransfer.state == "confirmed", ChainTransfer.signature.is_not(None),
                    ChainTransfer.kind.in_(["payout", "fee", "anchor"]))).scalars().all()
                unpaid = s.scalar(select(func.count()).where(Receipt.anchor_id.is_(None)))
            for sig in sigs:
                tx = await ledger.get_transaction(sig)
                fees += tx.fee
        assert settled["payouts"].get("confirmed") == nodes + 1, settled
        assert unpaid == 0, anchored
        return {
            "jobs": jobs, "nodes": nodes, "transactions": len(sigs),
            "payout_round_s": round(t1 - t0, 4), "anchor_s": round(t2 - t1, 4),
            "jobs_settled_per_s": round(jobs / (t2 - t0), 1),
            "lamports_per_1000_jobs": round(fees * 1000 / jobs, 1),
            "rent_per_1000_jobs": round((spent - fees) * 1000 / jobs, 1),
        }
    finally:
        await ledger.close()
        if server is not None:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--backend", choices=["inprocess", "rpc", "both"], default="both")
    args = parser.parse_args()
    backends = ["inprocess", "rpc"] if args.backend == "both" else [args.backend]
    out = {"bench": "settle_market", "python": platform.python_version(), "results": {}}
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix="aidp-bench-") as tmp:
            out["results"][backend] = asyncio.run(run(backend, args.jobs, args.nodes, Path(tmp)))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
