"""Process-wide runtime settings shared by the market and the node agent."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import sys

import pytest

from protocol.runtime import (
    GIL_SWITCH_INTERVAL_S,
    freeze_startup_heap,
    run_event_loop,
    tune_for_latency,
)


def test_freeze_moves_the_live_heap_out_of_collection() -> None:
    marker = [object()]  # alive now, so it ends up frozen
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
        assert gc.is_tracked(marker)
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_run_event_loop_prefers_uvloop() -> None:
    async def main() -> str:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    expected = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    assert run_event_loop(main()).startswith(expected)


def test_tune_for_latency_shortens_the_gil_switch_interval() -> None:
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)  # CPython's default
    try:
        assert tune_for_latency() > 0
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)
    finally:
        sys.setswitchinterval(before)
        gc.unfreeze()
