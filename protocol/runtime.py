"""Process-wide settings the long-running services (market and node agent) apply.

Two CPython defaults cost a streaming service latency:

* A full (generation 2) garbage collection walks every tracked object in the process.
  After start-up that is mostly code, modules, pydantic and SQLAlchemy metadata: an
  import-heavy service carries several hundred thousand such objects, and walking
  them stalls the event loop for 100 ms or more, every stream in flight at once.
  Nothing of that start-up heap ever becomes garbage, so it is moved out of the
  collector's sight once it is built (``gc.freeze``); later collections walk only
  what requests created.
* When a worker thread (the market's database writer, an engine's decode loop) holds
  the GIL, the event loop waits for it up to the switch interval, 5 ms by default,
  before it may relay the next token. A shorter interval bounds that wait.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

GIL_SWITCH_INTERVAL_S = 0.0005


def freeze_startup_heap() -> int:
    """Collect once, then exempt every surviving object from future collections.

    Returns how many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def tune_for_latency() -> int:
    """Apply both settings; call when start-up is done (models loaded, app built), in a
    process that is the service's own. Returns how many objects were frozen."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    return freeze_startup_heap()


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop where it is installed (it is with the ``market``
    and ``node`` extras): its I/O and wake-ups cost less, which every relayed token
    feels. The standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
