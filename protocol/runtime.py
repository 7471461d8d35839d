"""Process-wide settings the long-running services (market and node agent) apply.

A full (generation 2) garbage collection walks every tracked object in the process.
After start-up that is mostly code, modules, pydantic and SQLAlchemy metadata: an
import-heavy service carries several hundred thousand such objects, and walking them
stalls the event loop for 100 ms or more, every stream in flight at once. Nothing of
that start-up heap ever becomes garbage, so it is moved out of the collector's sight
once it is built (``gc.freeze``); later collections walk only what requests created.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def freeze_startup_heap() -> int:
    """Collect once, then exempt every surviving object from future collections.

    Call when start-up is done (models loaded, app built). Returns how many objects
    were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop where it is installed (it is with the ``market``
    and ``node`` extras): its I/O and wake-ups cost less, which every relayed token
    feels. The standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
