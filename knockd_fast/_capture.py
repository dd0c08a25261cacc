"""The capture engine: the Cython one, or its pure-Python twin.

``KNOCKD_FAST_NO_EXTENSIONS=1`` forces the twin (at build time it skips building the
extension). ``IMPLEMENTATION`` says which one was loaded; tests fail if the extension was
expected and did not load.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

# One CaptureError for both twins: catching it never depends on which one loaded.
from .capture_spec import COMPLETION_DTYPE, COUNTER_NAMES, CaptureError

if TYPE_CHECKING:
    from .config import Config, IPAddress

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

__all__ = [
    "COMPLETION_DTYPE",
    "COUNTER_NAMES",
    "IMPLEMENTATION",
    "CaptureEngine",
    "CaptureError",
    "engine_for",
]


def engine_for(config: Config, destinations: Iterable[IPAddress]) -> CaptureEngine:
    """An engine with the configuration's knock layout, timing, grouping, table size, modes
    and users, protecting ``destinations`` (live: the interfaces' addresses; offline: the
    config's)."""
    return CaptureEngine(
        config.knock.layout,
        knock_timeout=config.knock.knock_timeout,
        capacity=config.capture.table_size,
        destinations=destinations,
        group_by=config.knock.group_by,
        **admission_of(config),
    )


def admission_of(config: Config) -> dict[str, object]:
    """What the engine refuses before judging, from the configuration: the modes that are
    off and the user ids without a key here (``CaptureEngine.admit`` takes the same)."""
    return {
        "knock_mode": config.knock.knock_mode,
        "spa_mode": "spa" in config.knock.modes,
        "user_ids": frozenset(config.users),
    }
