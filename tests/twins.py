"""Which capture twins this test run exercises (a helper module, not a test file).

``knockd_fast._capture`` reads ``KNOCKD_FAST_NO_EXTENSIONS`` once; the tests ask it, never
the environment. ``PURE_RUN``: the run that proves the selector falls back to the pure twin
on request (``make test`` runs it second). In any other run the Cython engine must be
there: a silently missing extension fails ``test_build`` and every ``extension`` test.
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

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


def engine_over_frames(
    engine_module: ModuleType,
    layout: Any,
    frames: Sequence[bytes],
    start: int,
    bpf: bool = False,
    **options: Any,
) -> tuple[Any, dict[str, int]]:
    """(records, stats) of a fresh engine of ``engine_module`` (``layout``, ``options``)
    over ``frames``, written as an Ethernet capture 1 ms apart from unix second ``start``."""
    import numpy as np

    from knockd_fast.capture_spec import LINKTYPE_ETHERNET
    from knockd_fast.pcapfile import CaptureWriter

    with tempfile.TemporaryDirectory(prefix="knockd-frames-") as directory:
        path = Path(directory) / "frames.pcap"
        with CaptureWriter(path, LINKTYPE_ETHERNET) as writer:
            for number, frame in enumerate(frames):
                writer.write(start, number * 1000, frame)
        engine = engine_module.CaptureEngine(layout, **options)
        engine.open_file(str(path), bpf=bpf)
        parts = []
        while True:
            count = engine.dispatch()
            parts.append(engine.drain())
            if count == 0:
                break
        engine.close()
    return np.concatenate(parts), engine.stats()
