"""The ``aidp_market`` program built from this checkout's source, once per test process.

Tests of the program and of the market's settlement through it use this build rather
than ``build/programs/`` (which ``make`` keeps for ``aidp-market up``), so they always
test the source they sit beside. Where clang-19 is missing the tests that need it are
skipped, except under CI, where ``make`` installs it and its absence is a failure.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest


@functools.cache
def program_path() -> Path:
    if not shutil.which("clang-19"):
        if os.environ.get("CI") == "true":
            pytest.fail("clang-19 is not installed (make installs it)")
        pytest.skip("clang-19 is not installed (make programs installs it)")
    from programs.build import build

    out = Path(tempfile.mkdtemp(prefix="aidp-program-"))
    atexit.register(shutil.rmtree, out, True)
    return build("aidp_market", out)
