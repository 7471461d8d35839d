"""jobs.request: the buyer's OpenAI body becomes the typed job request

Before this revision ``jobs.request`` held the buyer's OpenAI body as the market
validated it (``model``, ``messages`` or ``prompt``, the optional sampling fields,
``stream``, ``n`` and whatever extra fields the client sent). It now holds
``protocol.job.JobRequest.model_dump(mode="json")``::

    {"kind": "chat" | "completion", "model": str,
     "messages": [{"role": str, "content": str}, ...] | None, "prompt": str | None,
     "sampling": {"temperature": float, "top_p": float, "max_tokens": int,
                  "seed": int | None, "stop": [str, ...]}}

The verifier reads that form; a row it cannot parse is "unavailable" (never paid
without a verdict). ``upgrade`` rewrites every old-form row into the form the market
would have built for that body when the job ran:

* sampling exactly as the market sent it to the node, which the receipt signs:
  ``max_tokens = max_completion_tokens or max_tokens or 256`` (the market's
  ``default_max_tokens``, 256 by default, equal to ``protocol.job.DEFAULT_MAX_TOKENS``;
  a market that ran with another default passes it as
  ``alembic -x default_max_tokens=N upgrade head``), temperature and top_p defaulting
  to 1.0, ``stop`` as a list without empty strings, ``seed`` as sent;
* the prompt as the request digest covered it: a chat's turns reduced to role and
  content, a completion's prompt (a one-element list unwrapped).

A row is converted only when the converted request yields the same request digest
(``sha256`` of canonical ``{"kind", "input", "continuation"}``) as the old body did, so
every receipt signed for the job still matches: that holds exactly when every message
has a string role and string content. Chat content given as a list of parts (the
digest then covered the list, the typed form joins the texts) or left out (the digest
covered ``null``, the typed form has ``""``) cannot keep its digest, and a row that is
not a valid body at all (not JSON, no messages or prompt, a sampling field of the wrong
type or out of range) cannot be converted: those rows are left as they are, stay
"unavailable" to the verifier, and are counted in a warning.

Self-contained on purpose: no market code is imported (it may change after this
revision), and neither is ``protocol.job``. Its ``JobRequest.from_openai`` is not what
the market ran then (it prefers ``max_tokens`` over ``max_completion_tokens`` and joins
content parts before digesting), and a later change to it must not change what this
revision writes. The target form is the one of this revision; the tests check that the
rows it writes parse as ``protocol.job.JobRequest`` and keep their digests.

Rows are read in primary-key order in batches (never the whole table) and rewritten
with one executemany per batch; plain SQL that SQLite and PostgreSQL both run. A row
already in the typed form is left alone, so running it twice changes nothing.

``downgrade`` writes the typed rows back as the OpenAI body the earlier code reads
(``model``, ``messages``/``prompt``, explicit ``max_tokens``, ``temperature``,
``top_p``, ``seed`` and ``stop`` where set, ``stream`` from the row, ``n`` 1): the same
digest and sampling under the earlier code. Fields the typed form never kept (extra
client fields, ``max_completion_tokens`` as a separate name) do not come back.
"""

# Revision ID: 0007_job_request
# Revises: 0006_integrity
# Create Date: 2026-12-03

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from alembic import context, op

revision: str = "0007_job_request"
down_revision: str | None = "0006_integrity"

log = logging.getLogger("alembic.runtime.migration")

BATCH_ROWS = 500
# the market's default_max_tokens before this revision (settings and node side alike)
OLD_DEFAULT_MAX_TOKENS = 256
KINDS = ("chat", "completion")
TYPED_KEYS = frozenset({"kind", "model", "messages", "prompt", "sampling"})
SAMPLING_KEYS = frozenset({"temperature", "top_p", "max_tokens", "seed", "stop"})

_jobs = sa.table(
    "jobs",
    sa.column("id", sa.String()),
    sa.column("kind", sa.String()),
    sa.column("model", sa.String()),
    sa.column("stream", sa.Boolean()),
    sa.column("request", sa.JSON()),
)


class Unconvertible(ValueError):
    """A row this revision cannot rewrite without changing what its receipts signed."""


# ---- the two forms ----------------------------------------------------------------------


def is_typed(request: Any) -> bool:
    """The typed form: exactly JobRequest's fields. An OpenAI body never is (the market
    stored ``stream`` and ``n`` with every one), whatever extra fields a client sent."""
    return (isinstance(request, dict) and request.keys() == TYPED_KEYS
            and isinstance(request.get("sampling"), dict))


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unconvertible(f"{key} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise Unconvertible(f"{key} is not finite")
    return number


def _sampling(body: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """What the market sent the node for this body (the receipt signs it)."""
    max_tokens = (body.get("max_completion_tokens") or body.get("max_tokens")
                  or default_max_tokens)
    if not _int(max_tokens) or max_tokens < 0:
        raise Unconvertible("max_tokens is not a non-negative integer")
    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    if temperature < 0 or not 0 < top_p <= 1:
        raise Unconvertible("temperature or top_p out of range")
    seed = body.get("seed")
    if seed is not None and not _int(seed):
        raise Unconvertible("seed is not an integer")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise Unconvertible("stop is not a string or a list of strings")
    return {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
            "seed": seed, "stop": [s for s in stop if s]}


def _turns(messages: Any) -> list[dict[str, str]]:
    """The turns, when the typed form digests them as the body's messages were."""
    if not isinstance(messages, list) or not messages:
        raise Unconvertible("messages is not a non-empty list")
    turns = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise Unconvertible("a message is not an object with a string role")
        if not isinstance(m.get("content"), str):
            # parts were digested as a list, a missing content as null: no typed turn
            # (plain text) has that digest
            raise Unconvertible("a message's content is not a string")
        turns.append({"role": m["role"], "content": m["content"]})
    return turns


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise Unconvertible("prompt is not a string")
    return prompt


def _kind(row_kind: Any, body: dict[str, Any]) -> str:
    if row_kind in KINDS:
        return str(row_kind)
    if ("messages" in body) != ("prompt" in body):
        return "chat" if "messages" in body else "completion"
    raise Unconvertible(f"unknown job kind {row_kind!r}")


def typed_request(row_kind: Any, row_model: Any, body: Any,
                  default_max_tokens: int = OLD_DEFAULT_MAX_TOKENS) -> dict[str, Any]:
    """The typed request for an old-form body (raises ``Unconvertible``)."""
    if not isinstance(body, dict):
        raise Unconvertible("the request is not a JSON object")
    kind = _kind(row_kind, body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        model = row_model
    if not isinstance(model, str) or not model:
        raise Unconvertible("no model")
    messages = _turns(body.get("messages")) if kind == "chat" else None
    prompt = _prompt(body) if kind == "completion" else None
    return {"kind": kind, "model": model, "messages": messages, "prompt": prompt,
            "sampling": _sampling(body, default_max_tokens)}


def openai_body(request: dict[str, Any], stream: Any) -> dict[str, Any]:
    """The OpenAI body the earlier code reads for a typed request (raises
    ``Unconvertible``)."""
    kind, sampling = request.get("kind"), request["sampling"]
    if kind not in KINDS or sampling.keys() != SAMPLING_KEYS:
        raise Unconvertible("not a job request")
    body: dict[str, Any] = {"model": request.get("model")}
    if kind == "chat":
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages or request.get("prompt") is not None:
            raise Unconvertible("a chat request without messages")
        body["messages"] = [{"role": m.get("role"), "content": m.get("content")}
                            for m in messages if isinstance(m, dict)]
        if len(body["messages"]) != len(messages):
            raise Unconvertible("a message is not an object")
    else:
        if not isinstance(request.get("prompt"), str) or request.get("messages") is not None:
            raise Unconvertible("a completion request without a prompt")
        body["prompt"] = request["prompt"]
    body["max_tokens"] = sampling["max_tokens"]
    body["temperature"] = sampling["temperature"]
    body["top_p"] = sampling["top_p"]
    if sampling["seed"] is not None:
        body["seed"] = sampling["seed"]
    if sampling["stop"]:
        body["stop"] = list(sampling["stop"])
    body["stream"] = bool(stream)
    body["n"] = 1
    return body


# ---- the table, in batches --------------------------------------------------------------


def _batches(conn: sa.Connection) -> Iterator[list[sa.Row[Any]]]:
    """Every job row, ``BATCH_ROWS`` at a time, by primary key; the request as its JSON
    text, so a row that is not valid JSON is seen (and kept) rather than fatal."""
    query = (sa.select(_jobs.c.id, _jobs.c.kind, _jobs.c.model, _jobs.c.stream,
                       sa.cast(_jobs.c.request, sa.Text).label("request_text"))
             .order_by(_jobs.c.id).limit(BATCH_ROWS))
    last: str | None = None
    while True:
        page = query if last is None else query.where(_jobs.c.id > last)
        rows = conn.execute(page).all()
        if not rows:
            return
        yield rows
        last = rows[-1].id


_NOT_JSON = object()


def _load(text: str | None) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return _NOT_JSON


def _rewrite(convert: Callable[[sa.Row[Any], Any], dict[str, Any] | None]) -> tuple[int, int]:
    """Apply ``convert`` (the new request, or None to leave the row) to every row;
    (rewritten, left as they were because ``Unconvertible``)."""
    conn = op.get_bind()
    update = (sa.update(_jobs).where(_jobs.c.id == sa.bindparam("job_id"))
              .values(request=sa.bindparam("new_request", type_=sa.JSON())))
    rewritten = kept = 0
    for rows in _batches(conn):
        changes = []
        for row in rows:
            try:
                new = convert(row, _load(row.request_text))
            except Unconvertible as exc:
                kept += 1
                log.info("job %s: request left as it was (%s)", row.id, exc)
                continue
            if new is not None:
                changes.append({"job_id": row.id, "new_request": new})
        if changes:
            conn.execute(update, changes)
            rewritten += len(changes)
    return rewritten, kept


def _default_max_tokens() -> int:
    raw = context.get_x_argument(as_dictionary=True).get("default_max_tokens")
    if raw is None:
        return OLD_DEFAULT_MAX_TOKENS
    value = int(raw)
    if value < 0:
        raise ValueError("default_max_tokens must be a non-negative integer")
    return value


def upgrade() -> None:
    if context.is_offline_mode():
        log.warning("0007_job_request rewrites rows: run it online (no SQL emitted)")
        return
    default_max_tokens = _default_max_tokens()

    def convert(row: sa.Row[Any], request: Any) -> dict[str, Any] | None:
        if is_typed(request):
            return None
        if request is _NOT_JSON:
            raise Unconvertible("the request is not valid JSON")
        return typed_request(row.kind, row.model, request, default_max_tokens)

    rewritten, kept = _rewrite(convert)
    log.info("jobs.request: %d rows rewritten as job requests", rewritten)
    if kept:
        log.warning("jobs.request: %d rows could not be rewritten without changing their "
                    "request digest; they stay as they were (verification: unavailable)",
                    kept)


def downgrade() -> None:
    if context.is_offline_mode():
        log.warning("0007_job_request rewrites rows: run it online (no SQL emitted)")
        return

    def convert(row: sa.Row[Any], request: Any) -> dict[str, Any] | None:
        if not is_typed(request):
            return None  # an OpenAI body already (or a row upgrade left alone)
        return openai_body(request, row.stream)

    rewritten, kept = _rewrite(convert)
    log.info("jobs.request: %d rows written back as OpenAI bodies", rewritten)
    if kept:
        log.warning("jobs.request: %d typed rows are not consistent job requests; "
                    "left as they were", kept)
