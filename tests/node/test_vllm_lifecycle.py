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
