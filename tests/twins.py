"""Which capture twins this test run exercises (a helper module, not a test file).

``knockd_fast._capture`` reads ``KNOCKD_FAST_NO_EXTENSIONS`` once; the tests ask it, never
the environment. ``PURE_RUN``: the run that proves the selector falls back to the pure twin
on request (``make test`` runs it second). In any other run the Cython engine must be
there: a silently missing extension fails ``test_build`` and every ``extension`` test.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from knockd_fast import _capture

PURE_RUN: bool = _capture.FORCED_PURE
TWIN_NAMES = ("python",) if PURE_RUN else ("cython", "python")
_MODULES = {"cython": "knockd_fast._capture_c", "python": "knockd_fast._capture_py"}


def module(name: str) -> ModuleType:
    """The twin's module: ``cython`` -> ``knockd_fast._capture_c``, ``python`` -> ``_py``."""
    return importlib.import_module(_MODULES[name])


def engines() -> dict[str, type]:
    """The engine class of each twin this run tests, by name."""
    return {name: module(name).CaptureEngine for name in TWIN_NAMES}
