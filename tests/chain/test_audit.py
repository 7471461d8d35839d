"""An auditor's view, independent of the market's code: ``programs/audit.py`` (anchorpy,
built from the IDL alone, in its own environment) reads what the market's settlement left
in the program through ``aidp-ledger`` (a slashed stake, its case, an anchor, a payout
epoch) and pays a node's leaf itself, which the market then finds and records."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair

from market.models import Node
from market.onchain import service, settle, transfers
from market.onchain.handlers import HANDLERS
from market.onchain.models import ChainPayoutEpoch
from market.verify.window import slash
from protocol.keys import save_keypair

REPO = Path(__file__).resolve().parents[2]
ANCHORPY = REPO / ".venv-anchorpy" / "bin" / "python"


def audit(world: Any, *args: str) -> dict[str, Any]:
    out = subprocess.run([str(ANCHORPY), str(REPO / "programs" / "audit.py"),
                          "--rpc", world.settings.chain.ledger_url, "--program",
                          world.cfg.program, *args],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    return dict(json.loads(out.stdout))


@pytest.fixture
async def rpc_world(request: pytest.FixtureRequest, tmp_path: Path, db_url: str) -> Any:
    if not ANCHORPY.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("make creates .venv-anchorpy")
        pytest.skip("no .venv-anchorpy (make test creates it)")
    from chain.ledger.open import open_ledger
    from tests.chain.conftest import make_settings, make_world

    server = request.getfixturevalue("chain_server")
    ledger = open_ledger(server.url)
    try:
        yield await make_world(make_settings(tmp_path, db_url, chain__ledger_url=server.url),
                               ledger)
    finally:
        await ledger.close()


def _node(world: Any, key: Keypair, stake: int = 0) -> str:
    with world.sessions.begin() as s:
        node = Node(pubkey=str(key.pubkey()), price_in=1, price_out=1, stake=stake)
        s.add(node)
        s.flush()
        return str(node.id)


async def test_anchorpy_reads_the_settlement_and_pays_a_leaf(rpc_world: Any,
                                                             tmp_path: Path) -> None:
    world = rpc_world
    config = audit(world, "config")
    assert config["authority"] == world.cfg.market and config["quorum"] == 2
    assert config["verifiers"][:3] == [str(v.pubkey()) for v in world.rt.verifiers]

    # a fraud slashed on evidence: stake, case and anchor as anchorpy decodes them
    cheat_id, cheat = await world.node(stake=5_000)
    buyer = world.account(balance=10_000)
    r = world.receipt(cheat_id, buyer, earning=90, fee=10, state="verifying", signer=cheat)
    with world.sessions.begin() as s:
        slash(s, r.id, world.settings, reason="fraud", verification={})
    await world.step("anchor")
    assert (await world.step("settle"))["settle"]["slashes"] == {"confirmed": 1}
    stake = audit(world, "stake", str(cheat.pubkey()))
    assert (stake["staked"], stake["slashed"], stake["open_cases"]) == (4_000, 1_000, 0)
    assert stake["vault"] == world.rt.stake_of(cheat.pubkey()).vault
    assert str(cheat.pubkey()) in {x["operator"] for x in audit(world, "stakes")["stakes"]}
    case = audit(world, "case", r.receipt_hash)
    assert (case["state"], case["amount"], case["operator"]) == (1, 1_000, str(cheat.pubkey()))
    anchor = audit(world, "anchor", case["root"])
    assert anchor["leaf_count"] >= 1

    # an epoch posted, not yet claimed by the market: anchorpy pays one node's leaf
    await world.fund_deposit_account(10_000)
    nodes = [await world.wallet() for _ in range(2)]  # each with its token account
    for key in nodes:
        world.receipt(_node(world, key), buyer, earning=300, fee=30)
    with world.sessions.begin() as s:
        planned = settle.plan_payout_round(s, world.rt, limit=100)
    await transfers.drive(world.rt, world.sessions, planned[:1], HANDLERS)  # the post only
    with world.sessions() as s:
        epoch = s.execute(select_epoch()).scalar_one()
        plan = settle.load_epoch(s, epoch.epoch)
    posted = audit(world, "epoch", str(epoch.epoch))
    assert (posted["root"], posted["total"], posted["claimed"]) == (epoch.root, 600, 0)

    leaf = next(x for x in plan.leaves if x.node == str(nodes[0].pubkey()))
    proof = plan.proof(leaf.index)
    payer = await world.wallet()
    save_keypair(payer, tmp_path / "payer.json")
    paid = audit(world, "claim", "--keypair", str(tmp_path / "payer.json"),
                 "--epoch", str(epoch.epoch), "--index", str(leaf.index),
                 "--amount", str(leaf.amount), "--node", leaf.node,
                 "--lefts", str(sum(1 << i for i, p in enumerate(proof) if p.side == "left")),
                 "--proof", ",".join(p.sibling for p in proof))
    assert paid["claimed"] and await world.tokens(nodes[0].pubkey()) == 300
    assert audit(world, "epoch", str(epoch.epoch))["claimed"] == 300

    out = await service.settle_step(world.rt, world.sessions)
    assert out["claimed_elsewhere"] == 1
    assert [await world.tokens(k.pubkey()) for k in nodes] == [300, 300]  # each once
    from market.onchain import reconcile

    lines = await reconcile.reconcile(world.rt, world.sessions)
    assert all(line.ok for line in lines), reconcile.render(lines)


def select_epoch() -> Any:
    from sqlalchemy import select

    return select(ChainPayoutEpoch)
