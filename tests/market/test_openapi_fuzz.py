"""``schemathesis`` against the market's own OpenAPI document: no generated input, valid
or not, makes the buyer's API answer 5xx.

Every ``/v1`` operation is fuzzed with bodies that fit its schema (positive) and bodies
that break it (negative), authenticated as a funded buyer; half of the generated bodies
name a model a node really serves, so the inputs reach quoting, holds and dispatch, not
just the 404 of an unknown model. A 503 is allowed only as what it means here (no node
can take the job right now), never as a crash.
"""

from __future__ import annotations

import collections
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from market.api import parameters
from tests.support.market import start_market

pytestmark = pytest.mark.slow

MODEL = "fuzzed-model"
EXAMPLES = 30  # per operation and mode


KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "completion",
         "/v1/embeddings": "embedding", "/v1/responses": "responses"}


def _aimed(case: Any, aim: bool) -> Any:
    """Half the bodies name the served model and keep only parameters the endpoint
    knows (the rest stay as generated: unknown fields are a 400 before anything else)."""
    if aim and isinstance(case.body, dict) and "model" in case.body:
        served = parameters.SERVED.get(KINDS.get(case.path, ""), frozenset())
        body = {k: v for k, v in case.body.items() if k in served or not served}
        if isinstance(body.get("messages"), list):  # plain turns, whatever their text
            body["messages"] = [{k: v for k, v in m.items() if k in ("role", "content")}
                                for m in body["messages"] if isinstance(m, dict)
                                and m.get("role") in ("system", "user", "assistant")]
        case.body = {**body, "model": MODEL}
    return case


async def _serve(market: Any) -> Any:
    from tests.support.market import Nodes

    nodes = Nodes(market)
    await nodes.start(MODEL)
    return nodes


def test_no_generated_input_gets_a_5xx(tmp_path: Any) -> None:
    import asyncio
    import threading

    market = start_market(f"sqlite+aiosqlite:///{tmp_path}/fuzz.db")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    nodes = asyncio.run_coroutine_threadsafe(_serve(market), loop).result(30)
    buyer = market.buyer()
    headers = {"Authorization": f"Bearer {buyer.key}"}
    schema = schemathesis.openapi.from_url(f"{market.url}/openapi.json").include(
        path_regex="^/v1/")
    statuses: collections.Counter[tuple[str, str, int]] = collections.Counter()
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in GenerationMode:
                cases = st.tuples(operation.as_strategy(generation_mode=mode), st.booleans())

                @given(cases)
                @settings(max_examples=EXAMPLES, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
                def run(generated: tuple[Any, bool]) -> None:
                    case = _aimed(*generated)
                    try:
                        response = case.call(headers=headers, timeout=30)
                    except httpx.HTTPError as exc:  # a connection the server dropped
                        raise AssertionError(f"{case.method} {case.path}: {exc!r}") from exc
                    statuses[(case.method, case.path, response.status_code)] += 1
                    ok = response.status_code < 500 or (
                        response.status_code == 503
                        and response.json()["error"]["type"] == "service_unavailable")
                    assert ok, (case.method, case.path, case.body, response.text[:400])

                try:
                    run()
                except Unsatisfiable:  # nothing in this operation's schema can be broken
                    assert mode is GenerationMode.NEGATIVE, operation.label
    finally:
        asyncio.run_coroutine_threadsafe(nodes.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        market.stop()
    served = sum(n for (method, path, status), n in statuses.items()
                 if path == "/v1/chat/completions" and status == 200)
    chat = {k: n for k, n in statuses.items() if k[1] == "/v1/chat/completions"}
    assert served > 0, chat  # the aimed bodies did reach a node

