"""The capture engine: the Cython one, or its pure-Python twin.

``KNOCKD_FAST_NO_EXTENSIONS=1`` forces the twin (at build time it skips building the
extension). ``IMPLEMENTATION`` says which one was loaded; tests fail if the extension was
expected and did not load.
"""

from __future__ import annotations

import os

# One CaptureError for both twins: catching it never depends on which one loaded.
from .capture_spec import COMPLETION_DTYPE, COUNTER_NAMES, CaptureError

FORCED_PURE = os.environ.get("KNOCKD_FAST_NO_EXTENSIONS", "") not in ("", "0")

if FORCED_PURE:
    from ._capture_py import CaptureEngine

    IMPLEMENTATION = "python"
else:
    try:
        from ._capture_c import CaptureEngine
    except ImportError:  # not built: the twin gives the same results, slower
        from ._capture_py import CaptureEngine

        IMPLEMENTATION = "python"
    else:
        IMPLEMENTATION = "cython"

__all__ = ["COMPLETION_DTYPE", "COUNTER_NAMES", "IMPLEMENTATION", "CaptureEngine", "CaptureError"]
