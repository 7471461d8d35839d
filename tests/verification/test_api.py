"""Buyer API: GET /v1/jobs/{id} shows verification state and evidence;
POST /v1/jobs/{id}/challenge is for the job's own buyer, during the window only."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from market.app import create_app
from market.money.accounts import create_account, issue_key
from market.verify import service
from tests.verification.cheaters import EditingEngine
from tests.verification.conftest import World, make_settings, serve_job

BODY = {"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 12,
        "temperature": 0}


@pytest.fixture()
def keys(world: World) -> tuple[str, str]:
    with world.sessions.begin() as session:
        _, own = issue_key(session, world.account_id)
        other = create_account(session, "someone else")
        session.flush()
        _, foreign = issue_key(session, other.id)
    return own, foreign


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _tick(world: World, settings) -> None:
    result = service.tick(world.sessions, settings)
    for rid in result.dispatched:
        service.verify(world.sessions, rid, settings)


def test_challenge_flow(world: World, db_url: str, tmp_path: Path, keys, honest_engine) -> None:
    own, foreign = keys
    # No automatic sampling here: only the buyer's challenge triggers re-execution.
    settings = make_settings(db_url, tmp_path, verify__first_jobs=0, verify__sample_rate=0.0,
                             verify__low_reputation=0.0)
    honest_id, honest_kp = world.add_node(honest_engine)
    cheat_id, cheat_kp = world.add_node(honest_engine)
    cheater = EditingEngine(honest_engine, mode="text")
    cheater.model = honest_engine.model
    honest = serve_job(world, honest_id, honest_kp, honest_engine, BODY)
    cheat = serve_job(world, cheat_id, cheat_kp, cheater, BODY)
    closed = serve_job(world, honest_id, honest_kp, honest_engine, BODY, window_s=0.0)

    with TestClient(create_app(settings)) as client:
        r = client.get(f"/v1/jobs/{honest.job_id}", headers=_auth(own))
        assert r.status_code == 200, r.text
        view = r.json()
        assert view["verification_state"] == "pending"
        assert view["receipts"][0]["state"] == "pending"
        assert view["receipts"][0]["window_closes_at"]

        assert client.get(f"/v1/jobs/{honest.job_id}", headers=_auth(foreign)).status_code == 404
        assert client.post(f"/v1/jobs/{honest.job_id}/challenge",
                           headers=_auth(foreign)).status_code == 404
        assert client.post("/v1/jobs/job_nope/challenge", headers=_auth(own)).status_code == 404
        assert client.post(f"/v1/jobs/{honest.job_id}/challenge").status_code == 401

        r = client.post(f"/v1/jobs/{honest.job_id}/challenge", headers=_auth(own))
        assert r.status_code == 202, r.text
        assert r.json()["challenged_receipts"] == [view["receipts"][0]["id"]]
        r = client.post(f"/v1/jobs/{honest.job_id}/challenge", headers=_auth(own))
        assert r.status_code == 409 and r.json()["error"]["code"] == "already_challenged"

        r = client.post(f"/v1/jobs/{closed.job_id}/challenge", headers=_auth(own))
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "challenge_window_closed"

        assert client.post(f"/v1/jobs/{cheat.job_id}/challenge",
                           headers=_auth(own)).status_code == 202
        _tick(world, settings)

        view = client.get(f"/v1/jobs/{honest.job_id}", headers=_auth(own)).json()
        receipt = view["receipts"][0]
        assert view["verification_state"] == "settled"
        assert receipt["challenged"] and receipt["verification"]["outcome"] == "honest"
        assert [e["to"] for e in receipt["events"]] == ["pending", "pending", "verifying",
                                                        "settled"]

        view = client.get(f"/v1/jobs/{cheat.job_id}", headers=_auth(own)).json()
        receipt = view["receipts"][0]
        assert view["verification_state"] == "slashed"
        assert receipt["verification"]["outcome"] == "fraud"
        assert receipt["verification"]["stats"]["text_mismatch"] is True
        assert receipt["verification"]["slash"]["refund"] == receipt["cost"]
        # Settled or slashed: nothing left to challenge.
        assert client.post(f"/v1/jobs/{cheat.job_id}/challenge",
                           headers=_auth(own)).status_code == 409
