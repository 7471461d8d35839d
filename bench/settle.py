"""Settlement benchmark: throughput of transfers/payouts and fees per 1,000 jobs.

    python bench/settle.py [--transfers 500] [--jobs 1000] [--nodes 10] [--round-jobs 250]

Runs on the in-process LiteSVM backend and through an ``aidp-ledger`` server (started here
on a free loopback port) with solana-py, and prints one JSON object:

* ``throughput[backend]``: token transfers per second sent one after another and waited for
  (send + confirm), the same pipelined (sent concurrently, statuses polled in batches), and
  payouts per second (ATA-create-idempotent + transfer_checked + memo with a Merkle root).
* ``fees``: lamports the market spends to settle ``--jobs`` jobs of ``--nodes`` nodes when
  payouts are batched per node per round of ``--round-jobs`` jobs and each round's receipts
  are anchored in one memo, versus paying and anchoring every job on its own; measured from
  the fee of every transaction (and rent for the nodes' token accounts, reported apart).
  Fees do not depend on the backend (same SVM, 5,000 lamports per signature).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solders.keypair import Keypair  # noqa: E402

from chain import aidp, spl  # noqa: E402
from chain.ledger.base import Ledger, TxState  # noqa: E402
from chain.ledger.open import open_ledger  # noqa: E402
from chain.localnet.cli import LedgerProcess  # noqa: E402
from protocol.merkle import merkle_root  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


async def throughput(led: Ledger, transfers: int, concurrency: int) -> dict[str, float]:
    market = Keypair()
    cfg = await aidp.bootstrap(led, market)
    sender = Keypair()
    await aidp.fund_wallet(
        led, cfg, market, sender.pubkey(), lamports=100 * 10**9, tokens=10**12
    )
    dest = Keypair().pubkey()
    await aidp.fund_wallet(led, cfg, market, dest, lamports=10**9)
    src, dst = cfg.ata(sender.pubkey()), cfg.ata(dest)

    def transfer(i: int) -> list:
        # the memo makes every transfer a distinct transaction within one slot
        return [
            spl.transfer_checked(src, cfg.mint_pk, dst, sender.pubkey(), 1, cfg.decimals),
            spl.memo(f"t{i}"),
        ]

    t0 = time.perf_counter()
    for i in range(transfers):
        p = await led.send(transfer(i), sender)
        st = await led.confirm(p.signature, p.last_valid_block_height, poll=0.01)
        assert st.state is TxState.CONFIRMED, st
    sequential = transfers / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    blockhash, lvbh = await led.latest_blockhash()
    prepared = [
        await led.prepare(
            transfer(transfers + i), sender, blockhash=blockhash, last_valid_block_height=lvbh
        )
        for i in range(transfers)
    ]
    sem = asyncio.Semaphore(concurrency)

    async def submit(p):
        async with sem:
            await led.submit(p)

    await asyncio.gather(*(submit(p) for p in prepared))
    statuses = await led.signature_statuses([p.signature for p in prepared])
    assert all(s is not None and s[1] is None for s in statuses)
    pipelined = transfers / (time.perf_counter() - t0)

    payouts = max(transfers // 2, 1)
    await led.execute(
        [spl.mint_to_checked(cfg.mint_pk, cfg.deposit_pk, market.pubkey(), 10**12, cfg.decimals)],
        market,
    )
    t0 = time.perf_counter()
    for i in range(payouts):
        node = Keypair().pubkey()  # a new node each time: its token account is created too
        payout = aidp.NodePayout(
            str(node), 1, hashlib.sha256(str(i).encode()).hexdigest(), 1, f"bench-{i}"
        )
        p = await led.send(aidp.payout_instructions(cfg, payout), market)
        st = await led.confirm(p.signature, p.last_valid_block_height, poll=0.01)
        assert st.state is TxState.CONFIRMED, st
    payouts_per_s = payouts / (time.perf_counter() - t0)
    assert await led.token_balance(dst) == 2 * transfers
    return {
        "transfers_per_s": round(sequential, 1),
        "transfers_per_s_pipelined": round(pipelined, 1),
        "payouts_per_s": round(payouts_per_s, 1),
        "transfers": transfers,
        "payouts": payouts,
        "concurrency": concurrency,
    }


async def settle_jobs(
    led: Ledger, jobs: int, nodes: int, round_jobs: int, batched: bool
) -> dict[str, int]:
    """Settle ``jobs`` jobs; return lamports spent by the market on fees and rent."""
    market = Keypair()
    cfg = await aidp.bootstrap(led, market)
    buyer = Keypair()
    await aidp.fund_wallet(led, cfg, market, buyer.pubkey(), tokens=10**12)
    await led.execute(aidp.deposit_instructions(cfg, buyer.pubkey(), 10**11, "bench"), buyer)
    node_keys = [str(Keypair().pubkey()) for _ in range(nodes)]
    all_jobs = [
        (node_keys[i % nodes], hashlib.sha256(f"receipt-{i}".encode()).hexdigest(), 1_000 + i)
        for i in range(jobs)
    ]
    before = await led.get_balance(market.pubkey())
    fees = txs = 0

    async def run(ixs) -> None:
        nonlocal fees, txs
        p = await led.execute(ixs, market)
        fees += (await led.get_transaction(p.signature)).fee
        txs += 1

    size = round_jobs if batched else 1
    for r, start in enumerate(range(0, jobs, size)):
        chunk = all_jobs[start : start + size]
        rnd = aidp.plan_round(chunk, fee_bps=1000, round_key=f"r{r}")
        for _, _, ixs in aidp.round_transactions(cfg, rnd):
            await run(ixs)
        await run(
            aidp.anchor_instructions(
                market.pubkey(), merkle_root([h for _, h, _ in chunk]), len(chunk)
            )
        )
    spent = before - await led.get_balance(market.pubkey())
    return {"transactions": txs, "fee_lamports": fees, "rent_lamports": spent - fees}


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--transfers", type=int, default=500)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--round-jobs", type=int, default=250)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--backends", default="inprocess,rpc")
    args = ap.parse_args()

    result: dict = {
        "bench": "settle",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "throughput": {},
    }
    for backend in args.backends.split(","):
        if backend == "inprocess":
            led = open_ledger("memory")
            result["throughput"]["inprocess"] = await throughput(
                led, args.transfers, args.concurrency
            )
            await led.close()
        elif backend == "rpc":
            with tempfile.TemporaryDirectory() as tmp:
                server = LedgerProcess(Path(tmp), cwd=REPO).start(timeout=60)
                try:
                    led = open_ledger(server.url)
                    result["throughput"]["aidp-ledger"] = await throughput(
                        led, args.transfers, args.concurrency
                    )
                    await led.close()
                finally:
                    server.stop()

    led = open_ledger("memory")
    batched = await settle_jobs(led, args.jobs, args.nodes, args.round_jobs, batched=True)
    naive = await settle_jobs(led, args.jobs, args.nodes, args.round_jobs, batched=False)
    await led.close()
    per_1000 = 1000 / args.jobs
    result["fees"] = {
        "jobs": args.jobs,
        "nodes": args.nodes,
        "round_jobs": args.round_jobs,
        "batched": batched,
        "per_job": naive,
        "batched_fee_lamports_per_1000_jobs": round(batched["fee_lamports"] * per_1000),
        "per_job_fee_lamports_per_1000_jobs": round(naive["fee_lamports"] * per_1000),
        "batched_sol_per_1000_jobs": batched["fee_lamports"] * per_1000 / 1e9,
        "saving_factor": round(naive["fee_lamports"] / max(batched["fee_lamports"], 1), 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
