"""The vLLM adapter's child-process lifecycle, without vLLM: a start that fails or is
interrupted leaves no child process and no open client behind."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from inference.base import EngineError
from inference.vllm import VllmEngine


def quiet(line: str) -> None:
    pass


async def test_a_child_that_exits_fails_start_and_is_cleaned_up(tmp_path) -> None:
    exits = tmp_path / "exits"
    exits.write_text(f"#!{sys.executable}\nprint('no vllm here')\nraise SystemExit(3)\n")
    os.chmod(exits, 0o755)
    engine = VllmEngine("some-model", python=str(exits), startup_timeout=30, progress=quiet)
    with pytest.raises(EngineError, match="exited with 3"):
        await engine.start()
    assert engine._client is None and engine._proc is None and engine._pump is None


async def test_an_interrupted_start_stops_the_child(tmp_path) -> None:
    hangs = tmp_path / "hangs"
    hangs.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(600)\n")
    os.chmod(hangs, 0o755)
    engine = VllmEngine("some-model", python=str(hangs), startup_timeout=600, progress=quiet)
    starting = asyncio.create_task(engine.start())
    while engine._proc is None:
        await asyncio.sleep(0.01)
    child = engine._proc
    await asyncio.sleep(0.3)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert child.poll() is not None  # terminated and reaped, not orphaned
    assert engine._client is None and engine._proc is None


def test_fingerprint_rows_come_from_the_streamed_top_logprobs() -> None:
    """vLLM's completion stream (``logprobs: K``, ids as ``token_id:N``) gives each
    token's top K: one fingerprint row each; a chunk without them gives none, so the
    market refuses the receipt rather than trust it."""
    from inference.vllm import _fingerprint
    from protocol import fingerprint

    tops = [{"token_id:5": -0.2, "token_id:9": -1.9, "token_id:2": -3.0, "token_id:7": -4.5},
            {"token_id:1": -0.01, "token_id:3": -5.0, "token_id:4": -6.0, "token_id:8": -6.5}]
    rows = _fingerprint({"tokens": ["token_id:5", "token_id:1"], "top_logprobs": tops}, 2)
    assert len(rows) == 2 * fingerprint.ROW_BYTES
    first, second = fingerprint.rows(rows)
    assert fingerprint.evaluate(first, 9) == fingerprint.quantise(-1.9)
    assert fingerprint.evaluate(second, 8) == fingerprint.quantise(-6.5)
    assert _fingerprint({"tokens": ["token_id:5"]}, 1) == b""
    assert _fingerprint({"tokens": ["token_id:5"], "top_logprobs": [None]}, 1) == b""
