"""Pieces shared by the hand-rolled nodes tests drive over a raw WebSocket (the
adversarial ``HostileNode``, the protocol tests' ``RawNode``), which speak the link
protocol without ``node_agent`` so that they can break it on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from websockets.asyncio.client import ClientConnection

from protocol import fingerprint
from protocol.canonical import sha256_hex, token_ids_digest
from protocol.job import JobRequest


def fingerprint_rows(ids: list[int]) -> bytes:
    """Fingerprint rows a hand-written node attests: each token sure (one point a row)."""
    return b"".join(fingerprint.encode_row([(t, 0.0)]) for t in ids)


def receipt_fields(job: dict[str, Any], request: JobRequest, ids: list[int], text: str, *,
                   prompt_tokens: int) -> dict[str, Any]:
    """The receipt-body fields that follow from the job and the output: the signed sampling
    and request digest, the output digests, token counts and times. The caller adds who
    served it (job, market, node, model, engine) and may tamper with any of them."""
    return {
        "sampling": request.sampling,
        "request_sha256": request.digest(job["continuation_token_ids"]),
        "output_sha256": sha256_hex(text), "output_token_ids_sha256": token_ids_digest(ids),
        "prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
        "started_at": time.time(), "finished_at": time.time(),
        "fingerprint_sha256": fingerprint.digest(fingerprint_rows(ids)),
    }


async def close_node(tasks: list[asyncio.Task[Any]], ws: ClientConnection | None) -> None:
    """Stop a raw node: cancel its tasks and close its socket, which may already be gone."""
    for task in tasks:
        task.cancel()
    if ws is not None:
        with contextlib.suppress(Exception):
            await ws.close()
