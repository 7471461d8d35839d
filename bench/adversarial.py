"""Red team against a real market: how many attacks move money or escape verification,
how many honest jobs are wrongly slashed, how often Sybils fail a request.

A market (uvicorn, in this process, SQLite in a temp dir unless ``--database-url``) is
attacked through its real interfaces by hostile nodes (hand-written link frames, see
``tests/adversarial/hostile.py``) and hostile buyers (HTTP). After each attack the
money is checked: the cheat earned nothing, the buyer paid nothing for the cheat's
part, and the journal explains every base unit (``market.money.journal``). Receipts
that pass the market's cheap checks are re-executed by the verifier as the Celery
worker would (``market.verify.service.verify``).

Honest work: ``--honest`` deterministic-engine jobs through the market with mixed
parameters, a share of them filling the node's context, and ``--llama`` real llama.cpp
jobs (SmolLM2, half of them context-full), every one verified. Sybils: four fake nodes
(two refuse as busy, one fails, one hangs) beside one honest node, ``--sybil-requests``
requests.

Prints one JSON line. Targets: ``moved_money`` 0, ``escaped_verification`` 0,
``honest_slashed`` 0 of ≥ 200 (context-full included), ``sybil_failure_rate`` ≤ 0.01.

    python bench/adversarial.py [--honest 200] [--llama 20] [--sybil-requests 200]
                                [--database-url postgresql+psycopg://…]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from solders.keypair import Keypair  # noqa: E402
from sqlalchemy import select  # noqa: E402

from inference.fake import DeterministicEngine  # noqa: E402
from market.models import Job, Node, Receipt  # noqa: E402
from market.money.journal import audit  # noqa: E402
from market.verify import (
    service,  # noqa: E402
    window,  # noqa: E402
)
from node_agent.link import NodeLink  # noqa: E402
from tests.adversarial.hostile import (  # noqa: E402
    LIES,
    MANGLERS,
    HostileNode,
    claiming,
    fail_at_once,
    hang,
    honest_output,
    refuse_busy,
    streaming,
)
from tests.support.market import Market, start_market, unique_model, wait_for  # noqa: E402

Check = Callable[[], Awaitable[dict[str, Any]]]


class Bench:
    def __init__(self, market: Market) -> None:
        self.market = market
        self.buyer = market.buyer(credit=10**15, name="bench")
        self.client = self.buyer.client(timeout=120)
        self.nodes: list[Any] = []
        self.links: list[tuple[NodeLink, asyncio.Task[None]]] = []

    # ---- plumbing --------------------------------------------------------------------------

    async def hostile(self, model: str, behaviour: Any, **kwargs: Any) -> HostileNode:
        node = HostileNode(self.market.url, self.market.settings.market_id, model, behaviour,
                           **kwargs)
        self.market.list_model(model, node.sha256 or DeterministicEngine(model).model.sha256)
        self.nodes.append(node)
        await node.start()
        await wait_for(lambda: node.node_id in self.market.state.registry.links)
        return node

    async def honest(self, engine: Any, price: tuple[int, int] = (1, 1), **kw: Any) -> NodeLink:
        if isinstance(engine, DeterministicEngine):
            self.market.list_model(engine.model.id, engine.model.sha256,
                                   context_length=max(8192, engine.model.context_length))
        link = NodeLink(self.market.url, Keypair(), engine, price=price, backoff_initial=0.05,
                        **kw)
        task = asyncio.create_task(link.run())
        self.links.append((link, task))
        await link.wait_ready(30)
        await wait_for(lambda: link.node_id in self.market.state.registry.links)
        return link

    async def close(self) -> None:
        for node in self.nodes:
            await node.close()
        for link, task in self.links:
            await link.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.client.close()

    def db(self) -> Any:
        return self.market.state.db

    def earned(self, node_id: str | None) -> int:
        with self.db().session() as s:
            node = s.get(Node, node_id) if node_id else None
            return int(node.earned_pending + node.earned_settled) if node else 0

    def journal_ok(self) -> bool:
        with self.db().session() as s:
            return all(line.ok for line in audit(s))

    def receipts_of(self, node_id: str | None) -> list[str]:
        with self.db().session() as s:
            return list(s.scalars(select(Receipt.id).where(Receipt.node_id == node_id)))

    def verify_all(self, receipt_ids: list[str], engine_for: Any) -> dict[str, str]:
        """Sampling, dispatch and re-execution, as beat and worker run them."""
        settings = self.market.settings
        sessions = self.db().sync_sessions
        with sessions.begin() as s:
            window.decide_sampling(s, settings)
        with sessions.begin() as s:
            window.claim_for_verification(s, settings)
        return {rid: service.verify(sessions, rid, settings, engine_for=engine_for)
                for rid in receipt_ids}

    async def ask(self, model: str, **kwargs: Any) -> Any:
        kwargs.setdefault("messages", [{"role": "user", "content": "tell me a story please"}])
        kwargs.setdefault("max_tokens", 8)
        return await self.client.chat.completions.create(model=model, **kwargs)


# ---- attacks: each returns whether money moved wrongly / verification was escaped ---------------


async def lying_receipt(bench: Bench, lie: str) -> dict[str, Any]:
    model = unique_model(f"lie-{lie}")
    cheat = await bench.hostile(model, claiming(**LIES[lie]))
    reply = await bench.ask(model, temperature=0)
    with bench.db().session() as s:
        charged = s.get(Job, reply.id.removeprefix("chatcmpl-")).charged_amount
    return {"moved_money": bool(charged or bench.earned(cheat.node_id)) or not bench.journal_ok()}


async def lying_chunk(bench: Bench, mangle: str) -> dict[str, Any]:
    model = unique_model(f"chunk-{mangle}")
    cheat = await bench.hostile(model, streaming(MANGLERS[mangle]))
    await bench.honest(DeterministicEngine(model), price=cheat.price)
    relayed_lie = False
    for _ in range(20):
        reply = await bench.ask(model, temperature=0, max_tokens=12)
        text = reply.choices[0].message.content or ""
        relayed_lie |= "evil" in text or "free" in text
        if cheat.jobs:
            break
    moved = relayed_lie or bench.earned(cheat.node_id) > 0 or not bench.journal_ok()
    return {"moved_money": moved, "tried": bool(cheat.jobs)}


async def junk_output(bench: Bench, temperature: float) -> dict[str, Any]:
    """Consistent frames and a well-formed receipt, for tokens the model would not give."""
    rng = random.Random(7)

    async def junk(node: HostileNode, job: dict[str, Any]) -> None:
        out = honest_output(job)
        ids = [rng.randrange(1, 64) for _ in out.ids] or [5]
        from inference.fake import VOCAB

        text = "".join(VOCAB[t] for t in ids)
        for t in ids:
            await node.chunk(job, VOCAB[t], [t])
        receipt = node.receipt(job, ids, text, prompt_tokens=out.prompt_tokens)
        await node.done(job, "length" if len(ids) >= job["request"]["sampling"]["max_tokens"] else "stop",
                        receipt, out.prompt_tokens, len(ids))

    model = unique_model(f"junk-t{temperature}")
    cheat = await bench.hostile(model, junk)
    await bench.ask(model, temperature=temperature)
    verdicts = await asyncio.to_thread(bench.verify_all, bench.receipts_of(cheat.node_id),
                                       lambda m, _s: DeterministicEngine(m))
    escaped = not verdicts or any(v != "fraud" for v in verdicts.values())
    with bench.db().session() as s:
        node = s.get(Node, cheat.node_id)
        paid = int(node.earned_settled)
    return {"escaped_verification": escaped, "moved_money": paid > 0 or not bench.journal_ok()}


async def unlisted_weights(bench: Bench) -> dict[str, Any]:
    model = unique_model("unlisted")
    node = HostileNode(bench.market.url, bench.market.settings.market_id, model, claiming())
    reply = await node.start(expect_welcome=False)
    await node.close()
    return {"moved_money": reply["type"] != "reject"}


async def relayed_auth(bench: Bench) -> dict[str, Any]:
    model = unique_model("relay")
    node = HostileNode(bench.market.url, "evil-market.example:8000", model, claiming())
    bench.market.list_model(model, DeterministicEngine(model).model.sha256)
    reply = await node.start(expect_welcome=False)
    await node.close()
    return {"moved_money": reply["type"] != "reject"}


async def foreign_allowance(bench: Bench) -> dict[str, Any]:
    from protocol.keys import ALLOWANCE_DOMAIN, allowance_message, sign

    wallet, mallory = Keypair(), bench.market.buyer(credit=0, name="mallory")
    at = int(time.time())
    message = allowance_message(bench.market.settings.market_id, mallory.account_id,
                                str(wallet.pubkey()), at)
    body = {"wallet": str(wallet.pubkey()), "signed_at": at,
            "signature": sign(Keypair(), ALLOWANCE_DOMAIN, message)}
    async with httpx.AsyncClient(base_url=bench.market.url, timeout=30) as http:
        r = await http.post("/v1/chain/allowance", json=body,
                            headers={"Authorization": f"Bearer {mallory.key}"})
    return {"moved_money": r.status_code != 403}


async def overdraw_race(bench: Bench) -> dict[str, Any]:
    from market.money import billing

    model = unique_model("overdraw")
    await bench.honest(DeterministicEngine(model, token_delay=0.05), price=(10**6, 10**6),
                       max_concurrency=32)
    from inference.convert import generation_request
    from inference.fake import FakeVocabulary

    messages = [{"role": "user", "content": "spend"}]
    prompt = len(FakeVocabulary().prompt_token_ids(generation_request(
        "chat", {"messages": messages, "max_tokens": 20})))
    hold = billing.worst_case_hold(prompt, 20, 10**6, 10**6,
                                   bench.market.settings.billing.market_fee_bps)
    buyer = bench.market.buyer(credit=3 * hold + hold // 2, name="racer")  # three, not four
    client = buyer.client(timeout=60)

    async def one() -> bool:
        try:
            await client.chat.completions.create(model=model, messages=messages, max_tokens=20)
            return True
        except openai.APIStatusError:
            return False

    served = sum(await asyncio.gather(*(one() for _ in range(20))))
    account = buyer.get("/v1/account")
    await client.close()
    return {"moved_money": served > 3 or account["balance"] < 0 or not bench.journal_ok()}


async def oversized_body(bench: Bench) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=bench.market.url, timeout=30) as http:
        r = await http.post("/v1/chat/completions", content=b"x" * (2 << 20),
                            headers={"Authorization": f"Bearer {bench.buyer.key}"})
    return {"moved_money": r.status_code != 413}


# ---- honest work -------------------------------------------------------------------------------


async def honest_fake_jobs(bench: Bench, n: int) -> dict[str, Any]:
    """``n`` honest jobs, a quarter on a node whose small context fills before max_tokens."""
    model, small = unique_model("honest"), unique_model("honest-ctx")
    await bench.honest(DeterministicEngine(model))
    await bench.honest(DeterministicEngine(small, context_length=24))
    rng = random.Random(2026)
    context_full = 0
    for i in range(n):
        full = i % 4 == 0
        params: dict[str, Any] = {
            "temperature": rng.choice([0.0, 0.7, 1.0]), "top_p": rng.choice([1.0, 0.9, 0.5]),
            "max_tokens": rng.randint(40, 80) if full else rng.randint(4, 40),
            "seed": rng.randrange(2**31),
        }
        if rng.random() < 0.2:
            params["stop"] = [f" w{rng.randrange(1, 64)}"]
        reply = await bench.ask(small if full else model,
                                messages=[{"role": "user", "content": f"job {i} go"}], **params)
        context_full += full and reply.choices[0].finish_reason == "length" and \
            reply.usage.completion_tokens < params["max_tokens"]
    receipts = [rid for link, _ in bench.links if link.engines.get(model) or
                link.engines.get(small) for rid in bench.receipts_of(link.node_id)]
    verdicts = await asyncio.to_thread(bench.verify_all, receipts, lambda m, _s: (
        DeterministicEngine(m, context_length=24 if m == small else 4096)))
    return {"jobs": n, "context_full": int(context_full),
            "slashed": sum(v == "fraud" for v in verdicts.values()),
            "verified": sum(v == "honest" for v in verdicts.values())}


async def honest_llama_jobs(bench: Bench, n: int) -> dict[str, Any]:
    """Real SmolLM2 on llama.cpp: half the jobs on a node with a 64-token context that
    fills before max_tokens, half on a 4096-token one; all verified by the real verifier."""
    if n <= 0:
        return {"jobs": 0, "context_full": 0, "slashed": 0, "verified": 0}
    from inference.llamacpp import LlamaCppEngine, default_gguf
    from market.listing import DEFAULT_MODEL_ID
    from market.verify.engine import get_engine

    small_id = DEFAULT_MODEL_ID + "-ctx64"
    normal = LlamaCppEngine(n_threads=2)
    small = LlamaCppEngine(model_id=small_id, n_threads=2, n_ctx=64)
    for engine in (normal, small):
        await engine.start()
    bench.market.list_model(small_id, small.model.sha256, vocabulary=f"gguf:{default_gguf()}")
    node_ids = [(await bench.honest(e)).node_id for e in (normal, small)]
    rng = random.Random(11)
    context_full = 0
    for i in range(n):
        full = i % 2 == 0
        params = {"temperature": rng.choice([0.0, 0.7, 1.0]), "max_tokens": 200 if full else 24,
                  "seed": rng.randrange(2**31)}
        reply = await bench.ask(small_id if full else DEFAULT_MODEL_ID, messages=[
            {"role": "user", "content": f"Write about topic number {i} in detail."}], **params)
        context_full += full and reply.choices[0].finish_reason == "length" and \
            reply.usage.completion_tokens < 200
    receipts = [rid for node_id in node_ids for rid in bench.receipts_of(node_id)]
    # one verifier engine (the same weights) judges both model ids
    verdicts = await asyncio.to_thread(bench.verify_all, receipts,
                                       lambda _m, s: get_engine(DEFAULT_MODEL_ID, s))
    for engine in (normal, small):
        await engine.close()
    return {"jobs": n, "context_full": int(context_full),
            "slashed": sum(v == "fraud" for v in verdicts.values()),
            "verified": sum(v == "honest" for v in verdicts.values())}


async def sybils(bench: Bench, requests: int) -> dict[str, Any]:
    model = unique_model("sybil")
    for behaviour in (refuse_busy, refuse_busy, fail_at_once, hang):
        await bench.hostile(model, behaviour, max_concurrency=64)
    await bench.honest(DeterministicEngine(model), max_concurrency=16)
    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        try:
            await bench.ask(model, messages=[{"role": "user", "content": f"r{i}"}],
                            max_tokens=4, temperature=0)
        except openai.APIError as exc:
            failures += 1
            print(f"sybil request {i} failed: {exc}", file=sys.stderr)

    started = time.perf_counter()
    for start in range(0, requests, 10):
        await asyncio.gather(*(one(i) for i in range(start, min(requests, start + 10))))
    return {"requests": requests, "failures": failures,
            "seconds": round(time.perf_counter() - started, 1)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="aidp-adversarial-"))
    db_url = args.database_url or f"sqlite:///{tmp}/market.db"
    # heartbeats every second (the tests' 0.2 s marks nodes of this loaded, one-process
    # network silent when the verifier holds the CPU; production's default is 5 s)
    market = start_market(db_url, data_dir=str(tmp), routing__job_first_token_timeout=5.0,
                          routing__heartbeat_interval=1.0, verify__first_jobs=10**6,
                          list_default_model=args.llama > 0)
    bench = Bench(market)
    attacks: dict[str, dict[str, Any]] = {}
    try:
        for lie in sorted(LIES):
            attacks[f"receipt_lies_about_{lie}"] = await lying_receipt(bench, lie)
        for mangle in sorted(MANGLERS):
            attacks[f"chunk_{mangle}"] = await lying_chunk(bench, mangle)
        for temperature in (0.0, 0.7, 1.0):
            attacks[f"junk_output_t{temperature}"] = await junk_output(bench, temperature)
        attacks["unlisted_weights"] = await unlisted_weights(bench)
        attacks["relayed_auth"] = await relayed_auth(bench)
        attacks["foreign_allowance"] = await foreign_allowance(bench)
        attacks["overdraw_race_20_vs_3"] = await overdraw_race(bench)
        attacks["oversized_body"] = await oversized_body(bench)
        fake = await honest_fake_jobs(bench, args.honest)
        llama = await honest_llama_jobs(bench, args.llama)
        sybil = await sybils(bench, args.sybil_requests)
    finally:
        await bench.close()
        market.stop()
    return {
        "bench": "adversarial",
        "database": "postgresql" if db_url.startswith("postgresql") else "sqlite",
        "attacks_tried": len(attacks),
        "moved_money": sum(bool(a.get("moved_money")) for a in attacks.values()),
        "escaped_verification": sum(bool(a.get("escaped_verification"))
                                    for a in attacks.values()),
        "honest_jobs": fake["jobs"] + llama["jobs"],
        "honest_context_full": fake["context_full"] + llama["context_full"],
        "honest_slashed": fake["slashed"] + llama["slashed"],
        "honest_verified": fake["verified"] + llama["verified"],
        "sybil_requests": sybil["requests"],
        "sybil_failure_rate": round(sybil["failures"] / max(1, sybil["requests"]), 4),
        "sybil_seconds": sybil["seconds"],
        "failed_attacks": sorted(k for k, a in attacks.items()
                                 if a.get("moved_money") or a.get("escaped_verification")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--honest", type=int, default=200, help="honest deterministic jobs")
    parser.add_argument("--llama", type=int, default=20, help="honest llama.cpp jobs")
    parser.add_argument("--sybil-requests", type=int, default=200)
    parser.add_argument("--database-url", help="default: SQLite in a temp dir")
    print(json.dumps(asyncio.run(run(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
