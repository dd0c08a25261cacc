"""Differential tests of the capture twins: c(x) == py(x) on random packet streams.

``knockd_fast._capture_c.CaptureEngine`` (Cython) and ``knockd_fast._capture_py.CaptureEngine``
(pure Python) read the same capture file with the same settings and the same dispatch batch
sizes; they must return the same number of packets per dispatch, byte-identical completion
records (every field of COMPLETION_DTYPE), the same stats() and the same active_sources()
after every batch. The streams (tests/streams.py) mix sealed knocks (complete, partial,
shuffled, duplicated, interleaved, poisoned with conflicting digits), SPA datagrams, IPv4
options and fragments, IPv6 extension headers, VLAN tags, background traffic, garbage and
cut frames, on every supported link type, in pcap and pcapng, with timestamps that jump,
stall and go backwards, under table and ring sizes small enough to evict and expire.

A mismatch is minimised frame by frame before it is reported: the failure message holds the
settings and the frames (hex) of the smallest stream that still shows it.

Besides the differential property: batching must not matter for either engine; honest
knocks (complete, unpoisoned, in time, in a table that cannot evict) must complete and open
to the sealed fields on both engines; hostile frames must never crash either engine and
every packet must count exactly once.

The tests that compare the twins skip when the extension is not built (or with
KNOCKD_FAST_NO_EXTENSIONS=1). ``KNOCKD_FAST_FUZZ_EXAMPLES=N`` raises hypothesis'
max_examples for long runs: the main differential property runs N examples, the other
properties proportionally more than their defaults (e.g. ``KNOCKD_FAST_FUZZ_EXAMPLES=20000``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import streams
import twins
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.control import current_build_context
from streams import ALL_LINKTYPES, BATCH_SIZES, KNOCK_DST, T0, Stream

from knock_client.protocol import KnockLayout, open_message
from knockd_fast.capture_spec import (
    COMPLETION_DTYPE,
    COUNTER_NAMES,
    FAILED_KNOCK_DTYPE,
    key_address,
)

ENGINES = twins.engines()
needs_both = pytest.mark.skipif(
    "cython" not in ENGINES, reason="the pure-twin run (KNOCKD_FAST_NO_EXTENSIONS=1)"
)

MAIN_EXAMPLES = 200
FUZZ_EXAMPLES = int(os.environ.get("KNOCKD_FAST_FUZZ_EXAMPLES") or 0)


def fuzz_settings(default: int) -> settings:
    """max_examples ``default``, scaled up by KNOCKD_FAST_FUZZ_EXAMPLES."""
    examples = max(default, FUZZ_EXAMPLES * default // MAIN_EXAMPLES)
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# --- running and comparing ------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What one engine gave for one stream: per dispatch (packets read, records drained,
    stats, active sources), or the exception it raised."""

    # per dispatch: packets read, records drained, stats, active sources, failed knocks
    steps: list[tuple[int, np.ndarray, dict[str, int], int, np.ndarray]]
    error: str | None = None  # the exception's class name: messages differ between twins
    exception: Exception | None = None

    @property
    def records(self) -> np.ndarray:
        parts = [step[1] for step in self.steps]
        return np.concatenate(parts) if parts else np.zeros(0, COMPLETION_DTYPE)

    @property
    def stats(self) -> dict[str, int]:
        return self.steps[-1][2] if self.steps else {}

    @property
    def active(self) -> int:
        return self.steps[-1][3] if self.steps else -1


def run_engine(
    engine_cls: type,
    stream: Stream,
    path: str,
    batches: Sequence[int] | None = None,
    forgets: Sequence[tuple[int, str]] | None = None,
    sweeps: bool = True,
) -> Run:
    """Read ``path`` with a fresh engine: dispatch and drain until dispatch returns 0; with
    ``sweeps``, after each dispatch sweep() at the time of the last packet read (as the
    daemon sweeps between reads) and take the failed knocks."""
    schedule = stream.batches if batches is None else batches
    forgets = stream.forgets if forgets is None else forgets
    run = Run([])
    read = 0
    try:
        engine = engine_cls(stream.layout, **stream.engine_kwargs())
        engine.open_file(path)
        for number in itertools.count():
            count = engine.dispatch(max_packets=schedule[number % len(schedule)])
            records = engine.drain()
            read += count
            for at, address in forgets:
                if at == number:
                    engine.forget(address)
            failed = np.zeros(0, FAILED_KNOCK_DTYPE)
            if sweeps and read:
                engine.sweep(T0 + stream.packets[read - 1][0] / 1_000_000)
                failed = engine.failed_knocks()
            run.steps.append((count, records, engine.stats(), engine.active_sources(), failed))
            if count == 0:
                break
            if number > len(stream.packets) + 1:
                raise AssertionError(f"dispatch returned {count} past the end of the file")
        engine.close()
    except Exception as error:
        run.error, run.exception = type(error).__name__, error
    return run


def run_all(stream: Stream, **kwargs: Any) -> dict[str, Run]:
    with tempfile.TemporaryDirectory(prefix="knockd-diff-") as directory:
        path = os.path.join(directory, f"stream.{stream.fmt}")
        stream.write(path)
        return {name: run_engine(cls, stream, path, **kwargs) for name, cls in ENGINES.items()}


def describe_record(record: np.void) -> str:
    fields = []
    for name in COMPLETION_DTYPE.names:
        value = record[name]
        if name in ("source", "destination"):
            value = key_address(bytes(value))
        elif name == "message":
            value = bytes(value[: int(record["length"])]).hex()
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        fields.append(f"{name}={value}")
    return ", ".join(fields)


def records_difference(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> str | None:
    assert a.dtype == b.dtype == COMPLETION_DTYPE
    if len(a) == len(b) and np.array_equal(a.view(np.uint8), b.view(np.uint8)):
        return None
    lines = [f"{len(a)} records ({names[0]}) vs {len(b)} ({names[1]})"]
    for index in range(max(len(a), len(b))):
        left = a[index] if index < len(a) else None
        right = b[index] if index < len(b) else None
        if left is not None and right is not None and left.tobytes() == right.tobytes():
            continue
        lines.append(f"first difference at record {index}:")
        if left is not None and right is not None:
            for name in COMPLETION_DTYPE.names:
                if not np.array_equal(left[name], right[name]):
                    lines.append(f"  {name}: {left[name].tolist()} vs {right[name].tolist()}")
        for name, record in zip(names, (left, right), strict=True):
            lines.append(f"  {name}: " + ("(none)" if record is None else describe_record(record)))
        break
    return "\n".join(lines)


def runs_difference(runs: dict[str, Run], per_step: bool = True) -> str | None:
    """A readable account of the first way the runs differ, or None."""
    (name_a, a), (name_b, b) = list(runs.items())[:2]
    names = (name_a, name_b)
    if a.error != b.error:
        return f"exceptions differ: {name_a}: {a.error}, {name_b}: {b.error}"
    difference = records_difference(a.records, b.records, names)
    if difference:
        return "completion records differ: " + difference
    if a.stats != b.stats:
        keys = [k for k in a.stats if a.stats[k] != b.stats.get(k)]
        detail = ", ".join(f"{k}: {a.stats[k]} vs {b.stats.get(k)}" for k in keys)
        return f"final stats() differ ({name_a} vs {name_b}): {detail}"
    if a.active != b.active:
        return f"final active_sources() differ: {a.active} vs {b.active}"
    if not per_step:
        return None
    if len(a.steps) != len(b.steps):
        return f"{len(a.steps)} dispatch calls ({name_a}) vs {len(b.steps)} ({name_b})"
    for number, (step_a, step_b) in enumerate(zip(a.steps, b.steps, strict=True)):
        if step_a[0] != step_b[0]:
            return f"dispatch #{number} read {step_a[0]} vs {step_b[0]} packets"
        difference = records_difference(step_a[1], step_b[1], names)
        if difference:
            return f"drain #{number}: {difference}"
        if step_a[2] != step_b[2]:
            return f"stats() after dispatch #{number}: {step_a[2]} vs {step_b[2]}"
        if step_a[3] != step_b[3]:
            return f"active_sources() after dispatch #{number}: {step_a[3]} vs {step_b[3]}"
        if step_a[4].tobytes() != step_b[4].tobytes():
            return (
                f"failed_knocks() after dispatch #{number}: {step_a[4].tolist()} vs "
                f"{step_b[4].tolist()}"
            )
    return None


def twins_difference(stream: Stream) -> str | None:
    return runs_difference(run_all(stream))


def minimize(stream: Stream, fails: Callable[[Stream], bool], budget: int = 3000) -> Stream:
    """The smallest stream (greedy delta debugging over packets, then simpler settings)
    for which ``fails`` still holds."""
    calls = 0

    def still(candidate: Stream) -> bool:
        nonlocal calls
        calls += 1
        return calls <= budget and fails(candidate)

    for simpler in (
        {"batches": (-1,), "forgets": ()},
        {"ring_capacity": 4096},
        {"fmt": "pcap", "nanosecond": False, "byte_order": "little"},
    ):
        candidate = stream.replace(**simpler)
        if still(candidate):
            stream = candidate
    chunk = max(1, len(stream.packets) // 2)
    while True:
        start = 0
        while start < len(stream.packets):
            candidate = stream.replace(
                packets=stream.packets[:start] + stream.packets[start + chunk :]
            )
            if candidate.packets and still(candidate):
                stream = candidate
            else:
                start += chunk
        if chunk == 1:
            break
        chunk = max(1, chunk // 2)
    for capacity in (65536, 64, 8, 3, 2, 1):
        if capacity != stream.capacity and still(stream.replace(capacity=capacity)):
            stream = stream.replace(capacity=capacity)
            break
    return stream


def _is_final() -> bool:
    """Is hypothesis running its final (shrunk) example? (True outside hypothesis.)"""
    try:
        return bool(current_build_context().is_final)
    except Exception:
        return True


def fail_with_reproducer(stream: Stream, difference: str) -> None:
    """Raise the mismatch; on hypothesis' final (shrunk) example, minimise it first."""
    message = difference
    if _is_final():
        small = minimize(stream, lambda s: twins_difference(s) is not None)
        message += (
            f"\n\nminimal reproducer ({len(small.packets)} packets, times in us after "
            f"{T0} s):\n{small.describe()}\nwhich gives: {twins_difference(small)}"
        )
    raise AssertionError(message)


def check_counts(run: Run, packets: int) -> None:
    if run.exception is not None:
        raise run.exception
    stats = run.stats
    assert list(stats)[: len(COUNTER_NAMES)] == list(COUNTER_NAMES)
    assert stats["packets"] == packets
    outcomes = ("knock_packets", "spa_packets", "malformed", "ignored")
    assert stats["packets"] == sum(stats[name] for name in outcomes), stats
    assert stats["completions"] == len(run.records)
    assert stats["completions"] <= stats["knock_packets"] + stats["spa_packets"]


# --- the differential property ------------------------------------------------------------


@needs_both
@fuzz_settings(MAIN_EXAMPLES)
@given(stream=streams.streams())
def test_twins_agree_on_random_streams(stream: Stream) -> None:
    runs = run_all(stream)
    difference = runs_difference(runs)
    if difference:
        fail_with_reproducer(stream, difference)
    for run in runs.values():
        check_counts(run, len(stream.packets))


# Minimal reproducers of past mismatches go here (paste Stream.describe() from the failure).
REPRODUCERS: list[Stream] = []


FIXED_STREAMS: dict[str, Callable[[], Stream]] = {
    **{f"reproducer{n}": functools.partial(lambda s: s, s) for n, s in enumerate(REPRODUCERS)},
    **{
        f"linktype{linktype}-seed{seed}": functools.partial(streams.seeded_stream, linktype, seed)
        for linktype in ALL_LINKTYPES
        for seed in range(4)
    },
}


@needs_both
@pytest.mark.parametrize("name", list(FIXED_STREAMS))
def test_twins_agree_on_fixed_streams(name: str) -> None:
    """Deterministic streams (every event kind, every link type, all four digit widths) and
    the reproducers of past mismatches: the same every run, whatever hypothesis' database."""
    stream = FIXED_STREAMS[name]()
    runs = run_all(stream)
    difference = runs_difference(runs)
    if difference:
        fail_with_reproducer(stream, difference)
    for run in runs.values():
        check_counts(run, len(stream.packets))


@fuzz_settings(40)
@given(
    stream=streams.streams(max_events=6),
    schedules=st.lists(
        st.lists(st.sampled_from(BATCH_SIZES), min_size=1, max_size=4), min_size=1, max_size=3
    ),
)
def test_batch_sizes_do_not_matter(stream: Stream, schedules: list[list[int]]) -> None:
    """For each engine alone: one batch, one packet per dispatch and random schedules read
    the same records, stats and table (no forget() in between, which would depend on them)."""
    with tempfile.TemporaryDirectory(prefix="knockd-batch-") as directory:
        path = os.path.join(directory, f"stream.{stream.fmt}")
        stream.write(path)
        for name, engine_cls in ENGINES.items():
            reference = run_engine(engine_cls, stream, path, (-1,), forgets=(), sweeps=False)
            check_counts(reference, len(stream.packets))
            for schedule in [[1], *schedules]:
                other = run_engine(engine_cls, stream, path, schedule, forgets=(), sweeps=False)
                difference = runs_difference({"-1": reference, str(schedule): other}, False)
                assert difference is None, f"{name}: {difference}"


# --- honest knocks complete ------------------------------------------------------------------


@fuzz_settings(60)
@given(stream=streams.honest_streams())
def test_honest_knocks_complete_and_open_on_both_engines(stream: Stream) -> None:
    """Every valid, complete, unpoisoned knock in time, from a source the table cannot
    evict, yields exactly one completion, at its last new digit, that opens to the sealed
    fields; every valid SPA datagram one too; nothing else completes."""
    try:
        check_honest_runs(stream, run_all(stream))
    except AssertionError as error:
        if _is_final():
            with tempfile.NamedTemporaryFile(
                "w", prefix="knockd-honest-", suffix=".txt", delete=False
            ) as handle:
                handle.write(stream.describe() + "\n")
            raise AssertionError(f"{error}\n(the stream is in {handle.name})") from error
        raise


def check_honest_runs(stream: Stream, runs: dict[str, Run]) -> None:
    for name, run in runs.items():
        check_counts(run, len(stream.packets))
        stats = run.stats
        assert stats["evictions"] == stats["expired"] == 0, (name, stats)
        records = run.records
        assert len(records) == len(stream.expected), (name, stats)
        for record, expected in zip(records, stream.expected, strict=True):
            length = len(expected.message)
            sec, usec = divmod(T0 * 1_000_000 + expected.offset, 1_000_000)
            assert int(record["kind"]) == expected.kind, name
            assert int(record["family"]) == expected.family, name
            assert int(record["length"]) == length, name
            assert int(record["n_alternatives"]) == 0, name
            assert (int(record["sec"]), int(record["usec"])) == (sec, usec), name
            assert bytes(record["source"]) == expected.source, name
            assert bytes(record["destination"]) == expected.destination, name
            assert bytes(record["message"][:length]) == expected.message, name
            assert not record["message"][length:].any(), name
            assert not record["alt_segment"].any() and not record["alt_digit"].any(), name
            assert open_message(bytes(record["message"][:length]), expected.key) == expected.knock
    if len(runs) == 2:
        difference = runs_difference(runs)
        if difference:
            fail_with_reproducer(stream, difference)


# --- hostile input ---------------------------------------------------------------------------

HOSTILE_LAYOUTS = (
    KnockLayout(),
    KnockLayout(base_port=1000, digit_bits=10, spa_port=500),
    KnockLayout(base_port=64000, digit_bits=4, spa_port=63999),
)
HOSTILE_SETTINGS = (
    {"capacity": 3, "ring_capacity": 3, "knock_timeout": 0.001},
    {"capacity": 1, "ring_capacity": 1, "knock_timeout": 10.0},
    {"capacity": 64, "ring_capacity": 4096, "knock_timeout": 0.5},
    {"capacity": 8, "ring_capacity": 7, "knock_timeout": 10.0, "destinations": KNOCK_DST[4]},
)


@functools.cache
def _hostile_strategy(linktype: int, layout: KnockLayout) -> st.SearchStrategy[list[bytes]]:
    return streams.hostile_frames(linktype, layout, max_size=120)


def hostile_stream(
    linktype: int, layout: KnockLayout, frames: Sequence[bytes], setting: dict[str, Any]
) -> Stream:
    destinations = (setting["destinations"],) if "destinations" in setting else ()
    return Stream(
        layout=layout,
        linktype=linktype,
        fmt="pcap",
        nanosecond=False,
        byte_order="little",
        capacity=setting["capacity"],
        ring_capacity=setting["ring_capacity"],
        knock_timeout=setting["knock_timeout"],
        destinations=destinations,
        packets=[(number * 400, frame) for number, frame in enumerate(frames)],
        batches=(-1, 7),
    )


def check_hostile(stream: Stream) -> None:
    runs = run_all(stream)
    for run in runs.values():
        check_counts(run, len(stream.packets))
    if len(runs) == 2:
        difference = runs_difference(runs)
        if difference:
            fail_with_reproducer(stream, difference)


@pytest.mark.parametrize("linktype", ALL_LINKTYPES)
@fuzz_settings(25)
@given(data=st.data())
def test_hostile_frames_never_crash_and_count_once(linktype: int, data: st.DataObject) -> None:
    layout = data.draw(st.sampled_from(HOSTILE_LAYOUTS), label="layout")
    setting = data.draw(st.sampled_from(HOSTILE_SETTINGS), label="settings")
    frames = data.draw(_hostile_strategy(linktype, layout), label="frames")
    check_hostile(hostile_stream(linktype, layout, frames, setting))


@pytest.mark.parametrize("linktype", ALL_LINKTYPES)
def test_thousands_of_hostile_frames(linktype: int) -> None:
    """Bulk, seeded: 4,000 random and mutated frames per link type and setting."""
    rng = random.Random(linktype)
    for layout, setting in zip(HOSTILE_LAYOUTS * 2, HOSTILE_SETTINGS, strict=False):
        templates = streams.valid_templates(linktype, layout)
        frames = []
        for _ in range(4000):
            if rng.random() < 0.3:
                frames.append(rng.randbytes(rng.randrange(0, 130)))
            else:
                flips = [(rng.randrange(200), rng.randrange(256)) for _ in range(rng.randint(0, 4))]
                cut = rng.choice((None, rng.randrange(200)))
                frames.append(streams.mutate(rng.choice(templates), flips, cut))
        check_hostile(hostile_stream(linktype, layout, frames, setting))


# --- the debug build's invariants --------------------------------------------------------------


@pytest.mark.extension
@pytest.mark.parametrize("linktype", ALL_LINKTYPES)
def test_debug_build_keeps_the_table_invariants_on_long_streams(linktype: int) -> None:
    """A ``make debug`` build checks the C engine's table after every dispatch (and a slot
    after every digit) and raises CaptureError("internal error: ...") on a violation. Long
    seeded streams that complete, conflict, evict, expire and forget, in batches of one to
    all, must pass every check and still agree with the twin."""
    from knockd_fast import _capture_c

    if not _capture_c.debug_build():
        pytest.skip("a release build: `make debug` compiles the invariant checks in")
    for seed in range(4):
        stream = streams.seeded_stream(linktype, seed, count=200)
        if stream.capacity > 64:
            stream = stream.replace(ring_capacity=4096)  # each check scans the whole table
        runs = run_all(stream)
        assert runs["cython"].error is None, runs["cython"].exception
        stats = runs["cython"].stats
        assert stats["completions"] and stats["evictions"] + stats["expired"], stats
        assert runs_difference(runs) is None, runs_difference(runs)
