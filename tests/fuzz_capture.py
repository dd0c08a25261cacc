"""Coverage-guided fuzzing of the capture twins with atheris (`make fuzz-atheris`).

Each input is a link type, engine settings and a run of frames (length-prefixed) that
goes into a capture file; both engines read it, must not crash, and must agree on
every completion record and counter. The pure twin is instrumented, so atheris steers
toward new parser paths; the Cython engine is checked against it on every input.

    python tests/fuzz_capture.py -runs=200000 -max_total_time=600 [corpus_dir]
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from knockd_fast import _capture_py

import numpy as np

from knock_client.protocol import KnockLayout
from knockd_fast import _capture_c
from knockd_fast.capture_spec import SUPPORTED_LINKTYPES
from knockd_fast.pcapfile import CaptureWriter

LINKTYPES = sorted(SUPPORTED_LINKTYPES)
# Small settings so that short inputs reach eviction, expiry and the alternative bounds.
LAYOUT = KnockLayout(base_port=20000, digit_bits=4, spa_port=30000)
PATH = os.path.join(tempfile.mkdtemp(prefix="kf-fuzz-"), "input.pcap")
REPORT_EVERY = 10_000  # inputs between two progress lines (inputs and frames so far)
totals = {"inputs": 0, "frames": 0}


def run(engine_cls: type, capacity: int, ring: int, timeout: float) -> tuple:
    engine = engine_cls(LAYOUT, knock_timeout=timeout, capacity=capacity, ring_capacity=ring)
    engine.open_file(PATH)
    records = []
    while True:
        count = engine.dispatch()
        records.append(engine.drain())
        if count == 0:
            break
    return np.concatenate(records).tobytes(), engine.stats(), engine.active_sources()


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    linktype = LINKTYPES[fdp.ConsumeIntInRange(0, len(LINKTYPES) - 1)]
    capacity = fdp.ConsumeIntInRange(1, 8)
    ring = fdp.ConsumeIntInRange(1, 4)
    timeout = (0.001, 0.5, 10.0)[fdp.ConsumeIntInRange(0, 2)]
    with CaptureWriter(PATH, linktype) as writer:
        usec = 0
        while fdp.remaining_bytes():
            usec += fdp.ConsumeIntInRange(0, 300_000)
            frame = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 120))
            writer.write(1_800_000_000 + usec // 1_000_000, usec % 1_000_000, frame)
            totals["frames"] += 1
    totals["inputs"] += 1
    if totals["inputs"] % REPORT_EVERY == 0:
        print(f"fuzz_capture: {totals['inputs']:,} inputs, {totals['frames']:,} frames, "
              "twins agree", file=sys.stderr, flush=True)  # fmt: skip
    c = run(_capture_c.CaptureEngine, capacity, ring, timeout)
    py = run(_capture_py.CaptureEngine, capacity, ring, timeout)
    if c != py:
        raise AssertionError(f"twins disagree on link type {linktype}: {c[1]} vs {py[1]}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
