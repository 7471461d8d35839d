"""Settlement benchmark: throughput of transfers/payouts and fees per 1,000 jobs.

    python bench/settle.py [--transfers 500] [--jobs 1000] [--nodes 10] [--round-jobs 250]

Runs on the in-process LiteSVM backend and through an ``aidp-ledger`` server (started here
on a free loopback port) with solana-py, and prints one JSON object:

* ``throughput[backend]``: token transfers per second sent one after another and waited for
  (send + confirm), the same pipelined (sent concurrently, statuses polled in batches), and
  payouts per second: claims of one posted epoch through the ``aidp_market`` program
  (ATA-create-idempotent + ``claim`` with the leaf's Merkle proof), one new node each.
* ``fees``: lamports the market spends to settle ``--jobs`` jobs of ``--nodes`` nodes
  through the program when a round of ``--round-jobs`` jobs is one epoch (post, a claim per
  node, the fee, one anchor), versus a round per job; measured from the fee of every
  transaction (rent for epoch and token accounts reported apart). Fees do not depend on
  the backend (same SVM, 5,000 lamports per signature). ``bench/program.py`` compares the
  program with the earlier Memo-and-transfer design.

Needs the program binary (``make programs``).
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
PROGRAM = REPO / "build" / "programs" / "aidp_market.so"  # make programs


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
    cfg = await with_program(led, market, cfg)
    # one epoch of ``payouts`` nodes, each a new node (its token account is created too)
    epoch = aidp.plan_epoch(1, [(str(Keypair().pubkey()), 1) for _ in range(payouts)])
    await led.execute(aidp.post_instructions(cfg, epoch), market)
    t0 = time.perf_counter()
    for leaf in epoch.leaves:
        ixs = aidp.claim_instructions(cfg, 1, leaf, epoch.proof(leaf.index), market.pubkey())
        p = await led.send(ixs, market)
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


async def with_program(led: Ledger, market: Keypair, cfg: aidp.ChainConfig) -> aidp.ChainConfig:
    """``cfg`` with the aidp_market program deployed, initialised and immutable."""
    params = aidp.ProgramParams(verifiers=[Keypair().pubkey() for _ in range(3)], quorum=2)
    cfg, _ = await aidp.install(led, market, cfg, params, PROGRAM.read_bytes())
    return cfg


async def settle_jobs(
    led: Ledger, jobs: int, nodes: int, round_jobs: int, batched: bool
) -> dict[str, int]:
    """Settle ``jobs`` jobs through the program (per round: the epoch's post, one claim per
    node, the fee, the receipts' anchor); return lamports spent by the market on fees and
    on rent (epoch accounts and the nodes' token accounts)."""
    market = Keypair()
    cfg = await with_program(led, market, await aidp.bootstrap(led, market))
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
        hashes = sorted(h for _, h, _ in chunk)
        earnings = [(node, amount * 9 // 10) for node, _, amount in chunk]
        epoch = aidp.plan_epoch(r + 1, earnings)
        await run(aidp.post_instructions(cfg, epoch))
        for leaf in epoch.leaves:
            await run(aidp.claim_instructions(cfg, epoch.epoch, leaf, epoch.proof(leaf.index),
                                              market.pubkey()))
        fee = sum(amount for _, _, amount in chunk) - epoch.total
        await run(aidp.fee_instructions(cfg, fee, merkle_root(hashes), len(hashes), f"r{r}"))
        await run(aidp.anchor_instructions(cfg, merkle_root(hashes), len(hashes)))
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
