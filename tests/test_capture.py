"""The capture engine's API and per-packet rules (docs/capture.md), run against both twins.

Every test writes its packets to a capture file with ``knockd_fast.pcapfile.CaptureWriter``
and reads it back through ``engine.open_file``, once per twin (conftest's ``engine_module``;
only the pure twin in the run with KNOCKD_FAST_NO_EXTENSIONS=1).
"""

from __future__ import annotations

import fractions
import ipaddress
import itertools
import math
import random
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import twins

from knock_client.protocol import (
    Action,
    Knock,
    KnockLayout,
    LayoutError,
    Proto,
    ProtocolError,
    open_message,
    seal,
)
from knockd_fast import _capture, capture_spec
from knockd_fast import frames as fr
from knockd_fast.candidates import candidate_messages
from knockd_fast.capture_spec import (
    COMPLETION_DTYPE,
    COUNTER_NAMES,
    KIND_KNOCK,
    KIND_SPA,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    LINKTYPE_RAW_DLT12,
    LINKTYPE_RAW_DLT14,
    PCAP_COUNTER_NAMES,
    key_address,
    segment_counts,
)
from knockd_fast.completions import completion_of
from knockd_fast.pcapfile import CaptureWriter

T0 = 1_700_000_000  # packet times are microseconds after T0 seconds
LAYOUT = KnockLayout()
N4, N6 = segment_counts(LAYOUT)
SRC4, DST4 = "192.0.2.10", "198.51.100.20"
SRC6, DST6 = "2001:db8::10", "2001:db8:1::20"
SOURCES = {4: (SRC4, DST4), 6: (SRC6, DST6)}
LINK_OPTIONS = (LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2)
ALL_LINKTYPES = (
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    LINKTYPE_RAW_DLT12,
    LINKTYPE_RAW_DLT14,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
)


# --- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
def engine_cls(engine_module: ModuleType) -> type:
    return engine_module.CaptureEngine


@pytest.fixture
def capture_error(engine_module: ModuleType) -> type[Exception]:
    return engine_module.CaptureError


Packet = bytes | tuple[int, bytes]  # a frame, or (microseconds after T0, frame)


def write_capture(
    path: Path,
    packets: Sequence[Packet],
    linktype: int = LINKTYPE_ETHERNET,
    fmt: str = "pcap",
    nanosecond: bool = False,
    byte_order: str = "little",
) -> Path:
    """Bare frames get 1 ms apart from T0; nanosecond files get 999 ns past each usec."""
    with CaptureWriter(
        path, linktype, format=fmt, nanosecond=nanosecond, byte_order=byte_order
    ) as writer:
        for number, packet in enumerate(packets):
            offset, data = packet if isinstance(packet, tuple) else (number * 1000, packet)
            sec, usec = divmod(T0 * 1_000_000 + offset, 1_000_000)
            writer.write(sec, usec, data, nsec=usec * 1000 + 999 if nanosecond else None)
    return path


def read_all(engine: Any, path: Path, batch: int = -1) -> np.ndarray:
    engine.open_file(str(path))
    parts = []
    while True:
        count = engine.dispatch(batch)
        parts.append(engine.drain())
        if count == 0:
            break
    return np.concatenate(parts)


Run = Callable[..., tuple[np.ndarray, dict[str, int], Any]]


@pytest.fixture
def run(engine_cls: type, tmp_path: Path) -> Run:
    """run(packets, linktype=..., fmt=..., nanosecond=..., layout=..., **engine kwargs)
    -> (records, stats, engine)."""
    numbers = itertools.count()

    def _run(
        packets: Sequence[Packet],
        linktype: int = LINKTYPE_ETHERNET,
        fmt: str = "pcap",
        nanosecond: bool = False,
        byte_order: str = "little",
        layout: KnockLayout = LAYOUT,
        **kwargs: Any,
    ) -> tuple[np.ndarray, dict[str, int], Any]:
        path = tmp_path / f"capture{next(numbers)}.{fmt}"
        write_capture(path, packets, linktype, fmt, nanosecond, byte_order)
        engine = engine_cls(layout, **kwargs)
        records = read_all(engine, path)
        return records, engine.stats(), engine

    return _run


def expected(**counts: int) -> dict[str, int]:
    base = dict.fromkeys(COUNTER_NAMES + PCAP_COUNTER_NAMES, 0)
    unknown = set(counts) - set(base)
    assert not unknown, unknown
    base.update(counts)
    return base


def message_of(record: np.void) -> bytes:
    return bytes(record["message"][: int(record["length"])])


def address_of(record: np.void, field: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return key_address(bytes(record[field]))


def random_message(family: int, seed: int = 0) -> bytes:
    rng = random.Random(seed * 10 + family)
    return rng.randbytes(34 if family == 4 else 46)


def knock(
    src: str,
    dst: str,
    port: int,
    mode: str = "syn",
    linktype: int = LINKTYPE_ETHERNET,
    flags: str = "S",
    **link: Any,
) -> bytes:
    if mode == "syn":
        packet = fr.ip(src, dst, fr.PROTO_TCP, fr.tcp(43210, port, flags))
    else:
        packet = fr.ip(src, dst, fr.PROTO_UDP, fr.udp(43210, port))
    return fr.frame(linktype, packet, **link)


def port(segment: int, digit: int, layout: KnockLayout = LAYOUT) -> int:
    return layout.base_port + segment * layout.segment_size + digit


def assert_records_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype == COMPLETION_DTYPE
    assert len(a) == len(b)
    for name in COMPLETION_DTYPE.names:
        assert np.array_equal(a[name], b[name]), name


# --- API basics ----------------------------------------------------------------------------


def test_constructor_validates_its_arguments(engine_cls: type) -> None:
    for kwargs in (
        {"capacity": 0},
        {"capacity": -5},
        {"ring_capacity": 0},
        {"knock_timeout": 0},
        {"knock_timeout": -1.0},
    ):
        with pytest.raises(ValueError):
            engine_cls(LAYOUT, **kwargs)
    with pytest.raises(LayoutError, match="past 65535"):
        engine_cls(KnockLayout(base_port=60000))
    # The Cython engine keeps the protected destinations in a fixed array of 64.
    many = [ipaddress.IPv4Address("198.18.0.0") + n for n in range(65)]
    with pytest.raises(ValueError, match="64"):
        engine_cls(LAYOUT, destinations=many)
    engine_cls(LAYOUT, destinations=many[:64] + many[:10])


# What the constructors refuse, and how: both call capture_spec.engine_settings, so the twins
# cannot drift apart again (capacity=True once passed the C engine and failed the twin).
REFUSED_ARGUMENTS = [
    ({"capacity": True}, TypeError, "capacity must be an integer, not bool"),
    ({"capacity": np.True_}, TypeError, "capacity must be an integer, not bool"),
    ({"capacity": 2.5}, TypeError, "capacity must be an integer, not float"),
    ({"capacity": 2**31}, ValueError, "capacity must be in 1..2**31-1, not 2147483648"),
    ({"ring_capacity": True}, TypeError, "ring_capacity must be an integer, not bool"),
    ({"ring_capacity": "8"}, TypeError, "ring_capacity must be an integer, not str"),
    ({"ring_capacity": 0}, ValueError, "ring_capacity must be in 1..2**31-1, not 0"),
    ({"knock_timeout": True}, TypeError, "knock_timeout must be a number of seconds, not bool"),
    ({"knock_timeout": "10"}, TypeError, "knock_timeout must be a number of seconds, not str"),
    (
        {"knock_timeout": math.nan},
        ValueError,
        "knock_timeout must be a positive number of seconds, not nan",
    ),
    (
        {"knock_timeout": math.inf},
        ValueError,
        "knock_timeout must be a positive number of seconds, not inf",
    ),
    (
        {"knock_timeout": 1e300},
        ValueError,
        "knock_timeout must be below 2**63 microseconds, not 1e+300",
    ),
    (
        {"destinations": ["192.0.2"]},
        ValueError,
        "'192.0.2' does not appear to be an IPv4 or IPv6 address",
    ),
]


def _refusal_id(case: tuple[dict[str, Any], type, str]) -> str:
    ((name, value),) = case[0].items()
    return f"{name}={value!r}"


@pytest.mark.parametrize(
    "kwargs, error, message", REFUSED_ARGUMENTS, ids=[_refusal_id(c) for c in REFUSED_ARGUMENTS]
)
def test_constructor_refuses_alike(
    engine_cls: type, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as raised:
        engine_cls(LAYOUT, **kwargs)
    assert type(raised.value) is error
    assert str(raised.value) == message


@pytest.mark.parametrize(
    "kwargs",
    [case[0] for case in REFUSED_ARGUMENTS],
    ids=[_refusal_id(c) for c in REFUSED_ARGUMENTS],
)
def test_both_twins_refuse_with_the_same_type_and_message(kwargs: dict[str, Any]) -> None:
    outcomes = {}
    for name, cls in twins.engines().items():
        with pytest.raises(Exception) as raised:
            cls(LAYOUT, **kwargs)
        outcomes[name] = (type(raised.value), str(raised.value))
    assert len(set(outcomes.values())) == 1, outcomes


def test_constructor_normalises_numbers_of_any_type(engine_cls: type) -> None:
    engine = engine_cls(
        LAYOUT, knock_timeout=fractions.Fraction(1, 4), capacity=np.int64(8), ring_capacity=3
    )
    assert engine.knock_timeout == 0.25 and type(engine.knock_timeout) is float
    assert engine_cls(LAYOUT, knock_timeout=2, ring_capacity=np.uint32(5)).knock_timeout == 2.0
    assert engine_cls(LAYOUT, knock_timeout=np.float32(0.5)).knock_timeout == 0.5


@pytest.mark.parametrize("digit_bits", range(4, 11))
def test_engine_settings_per_family(digit_bits: int) -> None:
    layout = KnockLayout(base_port=1000, digit_bits=digit_bits, spa_port=999)
    settings = capture_spec.engine_settings(
        layout, 0.5, 16, 4, ["2001:db8::1", "192.0.2.1", ipaddress.ip_address("192.0.2.1")]
    )
    assert settings.segments == segment_counts(layout)
    assert settings.message_lengths == (34, 46)
    for n, length, pad, mask in zip(
        settings.segments,
        settings.message_lengths,
        settings.pad_bits,
        settings.pad_masks,
        strict=True,
    ):
        assert 0 <= pad < digit_bits and n * digit_bits == 8 * length + pad
        assert mask == 2**pad - 1
    assert settings.knock_end == 1000 + settings.segments[1] * 2**digit_bits
    assert settings.knock_timeout_us == 500_000
    keys = [capture_spec.address_key(ipaddress.ip_address(a)) for a in ("192.0.2.1", "2001:db8::1")]
    assert settings.destination_keys == tuple(sorted(keys))
    assert len(settings.destinations) == 3  # as given: the BPF filter sorts its own


def test_every_twin_raises_the_one_capture_error(engine_module: ModuleType) -> None:
    assert engine_module.CaptureError is capture_spec.CaptureError is _capture.CaptureError
    with pytest.raises(capture_spec.CaptureError) as raised:
        engine_module.CaptureEngine(LAYOUT).dispatch()  # nothing open
    assert type(raised.value) is capture_spec.CaptureError


def test_both_twins_raise_the_very_same_class() -> None:
    classes = set()
    for cls in twins.engines().values():
        with pytest.raises(Exception) as raised:
            cls(LAYOUT).fileno()  # nothing open
        classes.add(type(raised.value))
    assert classes == {capture_spec.CaptureError}


@pytest.mark.extension
def test_the_c_engine_numbers_are_capture_spec_numbers() -> None:
    # It runs at import too, where a drift breaks every import; here it fails one test.
    from knockd_fast import _capture_c

    _capture_c._check_layouts()
    assert isinstance(_capture_c.debug_build(), bool)


def test_stats_filter_expression_and_linktype(
    engine_cls: type, tmp_path: Path, capture_error: type[Exception]
) -> None:
    destinations = (ipaddress.ip_address(DST4), ipaddress.ip_address(DST6))
    engine = engine_cls(LAYOUT, destinations=destinations)
    assert engine.filter_expression == capture_spec.filter_expression(LAYOUT, destinations)
    assert engine.stats() == expected()
    assert engine.active_sources() == 0
    with pytest.raises(capture_error):
        engine.dispatch()  # nothing open
    path = write_capture(tmp_path / "a.pcap", [b"\0" * 60], LINKTYPE_LINUX_SLL2)
    engine.open_file(str(path))
    assert engine.linktype == LINKTYPE_LINUX_SLL2
    assert engine.filter_expression == capture_spec.filter_expression(
        LAYOUT, destinations, LINKTYPE_LINUX_SLL2
    )
    assert engine.dispatch() == 1
    assert list(engine.stats()) == list(COUNTER_NAMES + PCAP_COUNTER_NAMES)
    assert engine.stats() == expected(packets=1, ignored=1)
    engine.close()
    engine.close()


def test_open_errors(engine_cls: type, tmp_path: Path, capture_error: type[Exception]) -> None:
    engine = engine_cls(LAYOUT)
    missing = tmp_path / "no-such.pcap"
    with pytest.raises(capture_error, match=str(missing)):
        engine.open_file(str(missing))
    text = tmp_path / "text.pcap"
    text.write_text("not a capture file at all\n")
    with pytest.raises(capture_error):
        engine.open_file(str(text))
    for linktype in (0, 105, 147):  # NULL, 802.11, user 0: refused when opened
        path = write_capture(tmp_path / f"lt{linktype}.pcapng", [b"\0" * 40], linktype, "pcapng")
        with pytest.raises(capture_error, match=str(linktype)):
            engine.open_file(str(path))


def test_pure_twin_refuses_live_capture_and_bpf(engine_module: ModuleType, tmp_path: Path) -> None:
    if engine_module.__name__.endswith("_capture_c"):
        pytest.skip("the Cython engine does live capture and BPF")
    engine = engine_module.CaptureEngine(LAYOUT)
    with pytest.raises(engine_module.CaptureError, match="capture files only"):
        engine.open_live("lo")
    path = write_capture(tmp_path / "a.pcap", [b"\0" * 60])
    with pytest.raises(engine_module.CaptureError, match="BPF"):
        engine.open_file(str(path), bpf=True)


def test_dispatch_batches_and_end_of_file(engine_cls: type, tmp_path: Path) -> None:
    path = write_capture(tmp_path / "a.pcap", [knock(SRC4, DST4, 1000)] * 10)
    engine = engine_cls(LAYOUT)
    engine.open_file(str(path))
    assert [engine.dispatch(4) for _ in range(5)] == [4, 4, 2, 0, 0]
    assert engine.stats()["packets"] == engine.stats()["ignored"] == 10


def test_truncated_capture_file_raises_after_the_good_records(
    engine_cls: type, tmp_path: Path, capture_error: type[Exception]
) -> None:
    path = write_capture(tmp_path / "a.pcap", [knock(SRC4, DST4, 1000)] * 5)
    path.write_bytes(path.read_bytes()[:-10])
    engine = engine_cls(LAYOUT)
    engine.open_file(str(path))
    with pytest.raises(capture_error, match="truncated"):
        engine.dispatch()
    assert engine.stats()["packets"] == 4


def test_ring_of_one_never_overflows(
    engine_cls: type, tmp_path: Path, capture_error: type[Exception]
) -> None:
    packets = []
    for number in range(20):
        src = f"203.0.113.{number + 1}"
        packets.append(fr.spa_frame(LAYOUT, random_message(4, number), src, DST4, 1))
        packets.append(knock(src, DST4, 1000))  # ignored
    for number in range(3):
        src = f"2001:db8::{number + 1:x}"
        packets += fr.knock_frames(LAYOUT, random_message(6, number), src, DST6, 1)
    path = write_capture(tmp_path / "a.pcap", packets)
    engine = engine_cls(LAYOUT, ring_capacity=1)
    engine.open_file(str(path))
    records = []
    while True:
        count = engine.dispatch()
        assert count <= 1
        if count and engine.stats()["completions"] > len(records):
            with pytest.raises(capture_error, match="full"):
                engine.dispatch()  # the ring holds one record: read nothing more
        records.extend(engine.drain())
        if count == 0:
            break
    assert len(records) == 23
    assert [int(r["kind"]) for r in records] == [KIND_SPA] * 20 + [KIND_KNOCK] * 3
    assert engine.stats()["packets"] == len(packets)


# --- knocks --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["syn", "udp"])
@pytest.mark.parametrize(
    "linktype", [1, 113, 276, 101, 12, 14, "ip"], ids=lambda v: f"lt{v}" if v != "ip" else "lt228/9"
)
def test_knock_of_each_family_mode_and_link_type_completes(
    run: Run, family: int, mode: str, linktype: int | str
) -> None:
    if linktype == "ip":
        linktype = LINKTYPE_IPV4 if family == 4 else LINKTYPE_IPV6
    assert isinstance(linktype, int)
    src, dst = SOURCES[family]
    message = random_message(family)
    packets = fr.knock_frames(LAYOUT, message, src, dst, linktype, mode)
    timed = [(number * 1000 + 7, frame) for number, frame in enumerate(packets)]
    records, stats, engine = run(timed, linktype)
    count = len(packets)
    assert count == (N4 if family == 4 else N6)
    assert stats == expected(packets=count, knock_packets=count, completions=1)
    assert engine.active_sources() == 0
    assert engine.linktype == (LINKTYPE_RAW_DLT12 if linktype == LINKTYPE_RAW else linktype)
    (record,) = records
    assert record["kind"] == KIND_KNOCK
    assert record["family"] == family
    assert record["length"] == len(message)
    assert record["n_alternatives"] == 0
    assert message_of(record) == message
    assert not record["message"][len(message) :].any()
    assert address_of(record, "source") == ipaddress.ip_address(src)
    assert address_of(record, "destination") == ipaddress.ip_address(dst)
    assert (record["sec"], record["usec"]) == (T0, (count - 1) * 1000 + 7)


@pytest.mark.parametrize("digit_bits", [4, 5, 7, 9, 10])
def test_digit_widths_rebuild_both_message_lengths(run: Run, digit_bits: int) -> None:
    layout = KnockLayout(base_port=1024, digit_bits=digit_bits, spa_port=65000)
    rng = random.Random(digit_bits)
    packets = []
    messages = {}
    for family, (src, dst) in SOURCES.items():
        messages[family] = random_message(family, digit_bits)
        packets += fr.knock_frames(layout, messages[family], src, dst, LINKTYPE_ETHERNET)
    rng.shuffle(packets)
    records, stats, _ = run(packets, layout=layout)
    assert stats["completions"] == 2
    assert {int(r["family"]): message_of(r) for r in records} == messages


def test_shuffled_knock_with_duplicates(run: Run) -> None:
    rng = random.Random(7)
    message = random_message(6, 7)
    packets = fr.knock_frames(LAYOUT, message, SRC6, DST6, LINKTYPE_ETHERNET)
    rng.shuffle(packets)
    body = packets[:-1] + rng.sample(packets[:-1], 5)
    rng.shuffle(body)
    records, stats, engine = run(body + packets[-1:])
    assert stats == expected(packets=N6 + 5, knock_packets=N6 + 5, duplicates=5, completions=1)
    assert message_of(records[0]) == message


def test_interleaved_sources_complete_independently(run: Run) -> None:
    sources = [("192.0.2.1", DST4, 4), ("2001:db8::1", DST6, 6), ("192.0.2.2", DST4, 4)]
    streams = [
        fr.knock_frames(LAYOUT, random_message(family, n), src, dst, LINKTYPE_ETHERNET)
        for n, (src, dst, family) in enumerate(sources)
    ]
    packets = [f for group in itertools.zip_longest(*streams) for f in group if f is not None]
    records, stats, engine = run(packets)
    assert stats["completions"] == 3
    assert [str(address_of(r, "source")) for r in records] == [
        "192.0.2.1",
        "192.0.2.2",
        "2001:db8::1",
    ]
    assert engine.active_sources() == 0


def test_conflicts_keep_bounded_alternatives_in_order(run: Run) -> None:
    message = random_message(4, 3)
    ports = LAYOUT.ports_for(message)
    digits = [(p - LAYOUT.base_port) % LAYOUT.segment_size for p in ports]

    def other(segment: int, k: int) -> int:
        return port(segment, (digits[segment] + k) % LAYOUT.segment_size)

    packets = [knock(SRC4, DST4, p) for p in ports[:-1]]
    spoofed = [
        other(0, 1),  # kept
        other(0, 2),  # kept
        other(0, 3),  # dropped: 2 per segment
        other(0, 1),  # conflict, already kept: neither kept again nor dropped
        other(1, 1),
        other(1, 2),
        other(2, 1),
        other(2, 2),
        other(3, 1),
        other(3, 2),  # the 8th alternative
        other(4, 1),  # dropped: 8 per source
    ]
    packets += [knock(SRC4, DST4, p) for p in spoofed]
    packets.append(knock(SRC4, DST4, ports[5]))  # duplicate
    packets.append(knock(SRC4, DST4, ports[-1]))  # completes
    records, stats, _ = run(packets)
    assert stats == expected(
        packets=len(packets),
        knock_packets=len(packets),
        duplicates=1,
        conflicts=11,
        alternatives_dropped=2,
        completions=1,
    )
    (record,) = records
    assert message_of(record) == message
    assert record["n_alternatives"] == 8
    kept = [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]
    assert list(record["alt_segment"]) == [s for s, _ in kept]
    assert list(record["alt_digit"]) == [(digits[s] + k) % 256 for s, k in kept]


def test_candidates_recover_the_genuine_message_after_a_spoofed_digit(run: Run) -> None:
    key = bytes(range(64))
    genuine = Knock(Action.OPEN, Proto.TCP, 22, T0, ipaddress.ip_address(SRC4), 7, 12345, 60)
    message = seal(genuine, key)
    ports = LAYOUT.ports_for(message)
    segment = 9
    wrong = port(segment, ((ports[segment] - LAYOUT.base_port) % 256 + 99) % 256)
    packets = [knock(SRC4, DST4, wrong)]  # the spoofer is first in segment 9
    packets += [knock(SRC4, DST4, p) for p in ports]
    records, stats, _ = run(packets)
    assert stats["conflicts"] == 1
    (record,) = records
    assert message_of(record) != message
    assert record["n_alternatives"] == 1
    opened = []
    for candidate in candidate_messages(completion_of(record), LAYOUT.digit_bits):
        try:
            opened.append((candidate, open_message(candidate, key)))
        except ProtocolError:
            pass
    assert opened == [(message, genuine)]


def test_pad_bits_of_the_last_digit_must_be_zero(run: Run) -> None:
    layout = KnockLayout(base_port=1024, digit_bits=5, spa_port=65000)
    n4, n6 = segment_counts(layout)
    pads = {4: n4 * 5 - 34 * 8, 6: n6 * 5 - 46 * 8}
    assert pads == {4: 3, 6: 2}
    packets = []
    for family, (src, dst) in SOURCES.items():
        last = (n4 if family == 4 else n6) - 1
        packets.append(knock(src, dst, port(last, 1 << pads[family], layout)))  # pad clear
        for low in range(1, 1 << pads[family]):
            packets.append(knock(src, dst, port(last, low, layout)))  # pad bits set
    _, stats, engine = run(packets, layout=layout)
    assert stats == expected(packets=len(packets), knock_packets=2, malformed=len(packets) - 2)
    assert engine.active_sources() == 2


# --- the source table ------------------------------------------------------------------


@pytest.mark.parametrize(("last_at", "completes"), [(2_000_000, True), (2_000_001, False)])
def test_expiry_by_packet_time(run: Run, last_at: int, completes: bool) -> None:
    packets = fr.knock_frames(LAYOUT, random_message(4), SRC4, DST4, LINKTYPE_ETHERNET)
    timed = [(number, frame) for number, frame in enumerate(packets[:-1])]
    timed.append((last_at, packets[-1]))
    records, stats, engine = run(timed, knock_timeout=2.0)
    assert len(records) == int(completes)
    assert stats["expired"] == int(not completes)
    assert engine.active_sources() == int(not completes)


def test_slots_are_handed_out_in_a_ring_and_reclaimed_lazily(run: Run) -> None:
    def first_digit(src: str, at_ms: int) -> tuple[int, bytes]:
        return at_ms * 1000, knock(src, DST4, port(0, 1))

    packets = [
        first_digit("10.0.0.1", 0),  # A: slot 0
        first_digit("10.0.0.2", 100),  # B: slot 1
        first_digit("10.0.0.1", 5000),  # A is stale: expired; A again takes slot 0, now free
        first_digit("10.0.0.3", 5100),  # C: slot 1, B is stale there: expired
        first_digit("10.0.0.4", 5200),  # D: slot 0, A is fresh there: evicted
    ]
    _, stats, engine = run(packets, capacity=2, knock_timeout=1.0)
    assert stats == expected(packets=5, knock_packets=5, expired=2, evictions=1)
    assert engine.active_sources() == 2


def test_a_freed_slot_waits_for_the_ring_pointer(run: Run) -> None:
    message = random_message(4, 5)
    ports = LAYOUT.ports_for(message)
    packets = [knock("10.0.0.1", DST4, port(0, 1))]  # A: slot 0
    packets += [knock("10.0.0.2", DST4, p) for p in ports[:-1]]  # B: slot 1
    packets.append(knock("10.0.0.3", DST4, port(0, 1)))  # C: slot 2
    packets.append(knock("10.0.0.2", DST4, ports[-1]))  # B completes: slot 1 free
    packets.append(knock("10.0.0.4", DST4, port(0, 1)))  # D: slot 0 evicts A, not slot 1
    packets.append(knock("10.0.0.5", DST4, port(0, 1)))  # E: slot 1, free
    packets.append(knock("10.0.0.6", DST4, port(0, 1)))  # F: slot 2 evicts C
    records, stats, engine = run(packets, capacity=3)
    assert len(records) == 1
    assert stats["evictions"] == 2
    assert engine.active_sources() == 3


def flood_packet(number: int) -> bytes:
    src = str(ipaddress.IPv4Address("10.0.0.0") + number + 1)
    return knock(src, DST4, port(0, number % 256))


def test_flood_larger_than_capacity_spares_a_younger_genuine_knock(run: Run) -> None:
    message = random_message(4, 11)
    genuine = fr.knock_frames(LAYOUT, message, SRC4, DST4, LINKTYPE_ETHERNET)
    flood = [flood_packet(n) for n in range(163)]
    packets = flood[:100]  # fills the 64 slots and evicts 36 of the flood's own
    later = iter(flood[100:])
    for frame in genuine:  # 63 more spoofed sources arrive during the knock
        packets.append(frame)
        packets += list(itertools.islice(later, 2))
    assert len(flood[100:]) == 63
    records, stats, engine = run(packets, capacity=64)
    assert [message_of(r) for r in records] == [message]
    assert stats["evictions"] == 164 - 64
    assert stats["expired"] == 0
    assert engine.active_sources() == 63


@pytest.mark.parametrize(("newer", "survives"), [(63, True), (64, False)])
def test_a_knock_lives_until_capacity_newer_sources(run: Run, newer: int, survives: bool) -> None:
    message = random_message(6, 12)
    genuine = fr.knock_frames(LAYOUT, message, SRC6, DST6, LINKTYPE_ETHERNET)
    packets = genuine[:1] + [flood_packet(n) for n in range(newer)] + genuine[1:]
    records, stats, engine = run(packets, capacity=64)
    assert len(records) == int(survives)
    # Evicted: the genuine's slot goes to the 64th newcomer, and its remaining digits start
    # a new partial knock that evicts the oldest newcomer in turn.
    assert stats["evictions"] == (0 if survives else 2)
    assert engine.active_sources() == (63 if survives else 64)


def test_forget_by_address_alone_when_grouping_by_address(engine_cls: type, tmp_path: Path) -> None:
    packets = fr.knock_frames(LAYOUT, random_message(4), SRC4, DST4, LINKTYPE_ETHERNET)
    engine = engine_cls(LAYOUT, group_by="address")
    engine.open_file(str(write_capture(tmp_path / "a.pcap", packets)))
    assert engine.dispatch(10) == 10 and engine.active_sources() == 1
    engine.forget(ipaddress.ip_address(SRC4))  # the port is not part of the key
    assert engine.active_sources() == 0


def test_forget_drops_a_partial_knock(engine_cls: type, tmp_path: Path) -> None:
    packets = fr.knock_frames(LAYOUT, random_message(4), SRC4, DST4, LINKTYPE_ETHERNET)
    path = write_capture(tmp_path / "a.pcap", packets)
    engine = engine_cls(LAYOUT)
    engine.open_file(str(path))
    assert engine.dispatch(10) == 10
    assert engine.active_sources() == 1
    engine.forget(ipaddress.ip_address("192.0.2.99"), 43210)  # unknown: nothing happens
    engine.forget(ipaddress.ip_address(SRC4), 43211)  # another port: another knock
    assert engine.active_sources() == 1
    engine.forget(ipaddress.ip_address(SRC4), 43210)
    assert engine.active_sources() == 0
    while engine.dispatch():
        pass
    assert len(engine.drain()) == 0
    assert engine.active_sources() == 1
    assert engine.stats() == expected(packets=N4, knock_packets=N4)


# --- destinations and SPA -------------------------------------------------------------------


def test_destinations_filter(run: Run) -> None:
    destinations = [ipaddress.ip_address(DST4), ipaddress.ip_address(DST6)]
    messages = [random_message(4, 1), random_message(4, 2), random_message(6, 3)]
    packets = fr.knock_frames(LAYOUT, messages[0], SRC4, "198.51.100.99", LINKTYPE_ETHERNET)
    packets += fr.knock_frames(LAYOUT, messages[1], SRC4, DST4, LINKTYPE_ETHERNET)
    packets += fr.knock_frames(LAYOUT, messages[2], SRC6, DST6, LINKTYPE_ETHERNET)
    packets.append(fr.spa_frame(LAYOUT, messages[0], SRC4, "198.51.100.99", LINKTYPE_ETHERNET))
    records, stats, _ = run(packets, destinations=destinations)
    assert [message_of(r) for r in records] == messages[1:]
    assert stats["ignored"] == N4 + 1
    assert stats["completions"] == 2


def test_spa_datagrams(run: Run) -> None:
    good = [
        (SRC4, DST4, random_message(4, 1)),
        (SRC6, DST6, random_message(6, 2)),
        (SRC6, DST6, random_message(4, 3)),  # a 34-byte message from an IPv6 source
    ]
    packets = [fr.spa_frame(LAYOUT, m, s, d, LINKTYPE_ETHERNET) for s, d, m in good]
    bad = [fr.spa_frame(LAYOUT, bytes(n), SRC4, DST4, LINKTYPE_ETHERNET) for n in (0, 33, 35, 47)]
    spa_udp = fr.udp(1, LAYOUT.spa_port, bytes(34))
    short_length = fr.ipv4(SRC4, DST4, 17, spa_udp[:4] + struct.pack("!H", 7) + spa_udp[6:])
    long_length = fr.ipv4(SRC4, DST4, 17, spa_udp[:4] + struct.pack("!H", 43) + spa_udp[6:])
    bad += [fr.ethernet(short_length), fr.ethernet(long_length)]
    spa_tcp = fr.ethernet(fr.ipv4(SRC4, DST4, 6, fr.tcp(1, LAYOUT.spa_port, "S", bytes(34))))
    records, stats, _ = run(packets + bad + [spa_tcp])
    assert stats == expected(
        packets=len(packets) + len(bad) + 1,
        spa_packets=3,
        completions=3,
        malformed=len(bad),
        ignored=1,
    )
    for record, (src, dst, message) in zip(records, good, strict=True):
        assert record["kind"] == KIND_SPA
        assert record["family"] == ipaddress.ip_address(src).version
        assert record["n_alternatives"] == 0
        assert message_of(record) == message
        assert address_of(record, "source") == ipaddress.ip_address(src)
        assert address_of(record, "destination") == ipaddress.ip_address(dst)


# --- one packet, one counter --------------------------------------------------------------


def _v4(payload: bytes, **kwargs: Any) -> bytes:
    return fr.ethernet(fr.ipv4(SRC4, DST4, fr.PROTO_TCP, payload, **kwargs))


def _v6(
    headers: Sequence[fr.ExtensionHeader] = (), next_header: int = fr.PROTO_TCP, **kwargs: Any
) -> bytes:
    payload = fr.tcp(1, port(0, 5)) if next_header == fr.PROTO_TCP else bytes(24)
    return fr.ethernet(fr.ipv6(SRC6, DST6, next_header, payload, headers, **kwargs))


def _patched(frame: bytes, offset: int, value: bytes) -> bytes:
    return frame[:offset] + value + frame[offset + len(value) :]


SYN = fr.tcp(1, port(0, 5))
V4_SYN = _v4(SYN)
V6_SYN = _v6()

PACKET_CASES: list[tuple[str, bytes, str]] = [
    ("v4 syn", V4_SYN, "knock_packets"),
    ("v4 syn+fin", _v4(fr.tcp(1, port(0, 5), "SF")), "knock_packets"),
    ("v4 syn+ack", _v4(fr.tcp(1, port(0, 5), "SA")), "ignored"),
    ("v4 ack", _v4(fr.tcp(1, port(0, 5), "A")), "ignored"),
    ("v4 rst", _v4(fr.tcp(1, port(0, 5), "R")), "ignored"),
    ("v4 below range", _v4(fr.tcp(1, LAYOUT.base_port - 1)), "ignored"),
    ("v4 past range", _v4(fr.tcp(1, port(N6, 0))), "ignored"),
    ("v4 in v6-only segment", _v4(fr.tcp(1, port(N4, 0))), "ignored"),
    (
        "v6 in v6-only segment",
        fr.ethernet(fr.ipv6(SRC6, DST6, 6, fr.tcp(1, port(N4, 0)))),
        "knock_packets",
    ),
    ("v4 icmp", fr.ethernet(fr.ipv4(SRC4, DST4, 1, bytes(8))), "ignored"),
    ("arp", fr.ethernet(bytes(28), ethertype=0x0806), "ignored"),
    ("v4 options", _v4(SYN, ihl_options=b"\x01\x01\x01\x01"), "knock_packets"),
    ("v4 first fragment", _v4(SYN, more_fragments=True), "knock_packets"),
    ("v4 later fragment", _v4(SYN, frag_offset=1), "ignored"),
    ("v4 later fragment 2", _v4(SYN, frag_offset=0x1000), "ignored"),
    ("v4 ihl 4", _patched(V4_SYN, 14, b"\x44"), "malformed"),
    ("v4 ihl past capture", _patched(V4_SYN, 14, b"\x4f")[: 14 + 40], "malformed"),
    ("v4 total < ihl", _patched(V4_SYN, 16, b"\x00\x13"), "malformed"),
    ("v4 total cuts tcp", _patched(V4_SYN, 16, b"\x00\x1e"), "malformed"),
    ("v4 ethernet padding", V4_SYN + bytes(12), "knock_packets"),
    ("v4 version 6", _patched(V4_SYN, 14, b"\x65"), "malformed"),
    ("v4 short", V4_SYN[: 14 + 19], "malformed"),
    ("v4 udp short", fr.ethernet(fr.ipv4(SRC4, DST4, 17, bytes(7))), "malformed"),
    ("v4 tcp short", fr.ethernet(fr.ipv4(SRC4, DST4, 6, bytes(19))), "malformed"),
    ("v6 syn", V6_SYN, "knock_packets"),
    ("v6 version 4", _patched(V6_SYN, 14, b"\x40"), "malformed"),
    ("v6 short", V6_SYN[: 14 + 39], "malformed"),
    ("v6 mapped source", fr.ethernet(fr.ipv6("::ffff:192.0.2.1", DST6, 6, SYN)), "malformed"),
    # A mapped destination: a grant for an IPv6 source to an IPv4 address cannot exist.
    ("v6 mapped dest", fr.ethernet(fr.ipv6(SRC6, "::ffff:198.51.100.2", 6, SYN)), "malformed"),
    ("v6 payload length cuts tcp", _patched(V6_SYN, 14 + 4, b"\x00\x13"), "malformed"),
    (
        "v6 all extension headers",
        _v6(
            [
                fr.hop_by_hop(),
                fr.routing(),
                fr.dstopts(b"\x01\x02\0\0"),
                fr.ah(),
                fr.fragment(0, True),
            ]
        ),
        "knock_packets",
    ),
    ("v6 8 extension headers", _v6([fr.dstopts()] * 8), "knock_packets"),
    ("v6 9 extension headers", _v6([fr.dstopts()] * 9), "malformed"),
    ("v6 later fragment", _v6([fr.fragment(1)]), "ignored"),
    ("v6 later fragment deep", _v6([fr.hop_by_hop(), fr.fragment(100, True)]), "ignored"),
    ("v6 esp", _v6([], fr.PROTO_ESP), "ignored"),
    ("v6 no next header", _v6([fr.hop_by_hop()], fr.PROTO_NONE), "ignored"),
    ("v6 icmpv6", _v6([], 58), "ignored"),
    (
        "v6 header past payload",
        fr.ethernet(fr.ipv6(SRC6, DST6, fr.PROTO_HOPOPTS, bytes([6, 5]) + bytes(30))),
        "malformed",
    ),
    (
        "v6 header past capture",
        _v6([fr.hop_by_hop(bytes(40))])[: 14 + 40 + 30],
        "malformed",
    ),
    ("v6 fragment cut", fr.ethernet(fr.ipv6(SRC6, DST6, 44, bytes(6))), "malformed"),
    ("vlan 1 tag", fr.ethernet(fr.ipv4(SRC4, DST4, 6, SYN), vlan_tags=[10]), "knock_packets"),
    (
        "vlan 802.1ad + 802.1q",
        fr.ethernet(fr.ipv6(SRC6, DST6, 6, SYN), vlan_tags=[(0x88A8, 100), 10]),
        "knock_packets",
    ),
    (
        "vlan 0x9100",
        fr.ethernet(fr.ipv4(SRC4, DST4, 6, SYN), vlan_tags=[(0x9100, 3)]),
        "knock_packets",
    ),
    (
        "vlan 4 tags",
        fr.ethernet(fr.ipv4(SRC4, DST4, 6, SYN), vlan_tags=[1, 2, 3, 4]),
        "knock_packets",
    ),
    (
        "vlan 5 tags",
        fr.ethernet(fr.ipv4(SRC4, DST4, 6, SYN), vlan_tags=[1, 2, 3, 4, 5]),
        "malformed",
    ),
    ("vlan cut", fr.ethernet(b"", vlan_tags=[1])[:16], "malformed"),
    ("vlan then arp", fr.ethernet(bytes(28), vlan_tags=[1], ethertype=0x0806), "ignored"),
]


@pytest.mark.parametrize(
    ("frame", "counter"), [c[1:] for c in PACKET_CASES], ids=[c[0] for c in PACKET_CASES]
)
def test_one_packet_counts_once(run: Run, frame: bytes, counter: str) -> None:
    _, stats, engine = run([frame])
    assert stats == expected(packets=1, **{counter: 1})
    assert engine.active_sources() == (counter == "knock_packets")


V4_PACKET = fr.ipv4(SRC4, DST4, 6, SYN)
V6_PACKET = fr.ipv6(SRC6, DST6, 6, SYN)
RAW_CASES = [
    (LINKTYPE_RAW, V4_PACKET, "knock_packets"),
    (LINKTYPE_RAW, V6_PACKET, "knock_packets"),
    (LINKTYPE_RAW_DLT12, V6_PACKET, "knock_packets"),
    (LINKTYPE_RAW_DLT14, V4_PACKET, "knock_packets"),
    (LINKTYPE_RAW, b"\x50" + V4_PACKET[1:], "malformed"),  # version 5: not IPv4 either
    (LINKTYPE_RAW, b"", "malformed"),
    (LINKTYPE_IPV4, V4_PACKET, "knock_packets"),
    (LINKTYPE_IPV4, V6_PACKET, "malformed"),  # the link type names the version
    (LINKTYPE_IPV6, V6_PACKET, "knock_packets"),
    (LINKTYPE_IPV6, V4_PACKET + bytes(20), "malformed"),
]


@pytest.mark.parametrize(("linktype", "packet", "counter"), RAW_CASES)
def test_links_without_header(run: Run, linktype: int, packet: bytes, counter: str) -> None:
    _, stats, _ = run([packet], linktype)
    assert stats == expected(packets=1, **{counter: 1})


@pytest.mark.parametrize("linktype", LINK_OPTIONS)
@pytest.mark.parametrize("tags", [[10], [(0x88A8, 100), 10]], ids=["802.1q", "802.1ad"])
def test_vlan_tagged_knocks_complete(run: Run, linktype: int, tags: list[Any]) -> None:
    message = random_message(6, 4)
    packets = [
        fr.frame(linktype, fr.ipv6(SRC6, DST6, 6, fr.tcp(1, p)), vlan_tags=tags)
        for p in LAYOUT.ports_for(message)
    ]
    records, stats, _ = run(packets, linktype)
    assert [message_of(r) for r in records] == [message]


def test_every_truncation_of_every_link_type_is_malformed(engine_cls: type, tmp_path: Path) -> None:
    for linktype in ALL_LINKTYPES:
        families = {LINKTYPE_IPV4: (4,), LINKTYPE_IPV6: (6,)}.get(linktype, (4, 6))
        frames = []
        for family in families:
            src, dst = SOURCES[family]
            frames.append(knock(src, dst, port(0, 1), "syn", linktype))
            frames.append(knock(src, dst, port(0, 1), "udp", linktype))
            frames.append(fr.spa_frame(LAYOUT, random_message(family), src, dst, linktype))
            if linktype in LINK_OPTIONS:
                frames.append(knock(src, dst, port(0, 1), "syn", linktype, vlan_tags=[1, 2]))
        path = tmp_path / f"cut{linktype}.pcap"
        count = 0
        with CaptureWriter(path, linktype) as writer:
            for frame in frames:
                for length in range(len(frame)):
                    writer.write(T0, 0, frame[:length], orig_len=len(frame))
                    count += 1
        engine = engine_cls(LAYOUT)
        assert len(read_all(engine, path)) == 0
        assert engine.stats() == expected(packets=count, malformed=count), linktype


def test_garbage_never_crashes_and_every_packet_counts_once(
    engine_cls: type, tmp_path: Path
) -> None:
    rng = random.Random(2024)
    for linktype in ALL_LINKTYPES:
        packets = []
        for number in range(150):
            family = (
                6 if linktype == LINKTYPE_IPV6 or (number % 2 and linktype != LINKTYPE_IPV4) else 4
            )
            src, dst = SOURCES[family]
            base = knock(src, dst, port(number % N4, 0), rng.choice(["syn", "udp"]), linktype)
            if number % 3 == 0:
                packets.append(rng.randbytes(rng.randrange(0, 120)))
            else:
                mutated = bytearray(base)
                for _ in range(rng.randrange(1, 4)):
                    mutated[rng.randrange(len(mutated))] = rng.randrange(256)
                packets.append(bytes(mutated[: rng.randrange(len(mutated) + 1)]))
        path = write_capture(tmp_path / f"g{linktype}.pcap", packets, linktype)
        engine = engine_cls(LAYOUT, capacity=16)
        read_all(engine, path)
        stats = engine.stats()
        assert stats["packets"] == len(packets)
        assert stats["packets"] == sum(
            stats[name] for name in ("knock_packets", "spa_packets", "malformed", "ignored")
        )


# --- file formats -------------------------------------------------------------------------


def test_pcap_and_pcapng_in_usec_and_nsec_give_identical_results(run: Run) -> None:
    rng = random.Random(5)
    packets: list[bytes] = []
    for family in (4, 6, 4):
        src, dst = SOURCES[family]
        packets += fr.knock_frames(LAYOUT, random_message(family, len(packets)), src, dst, 1)
        packets.append(knock(src, dst, port(3, 9)))  # a conflict, or a new partial knock
    packets.append(fr.spa_frame(LAYOUT, random_message(6), SRC6, DST6, 1))
    packets += [rng.randbytes(rng.randrange(60)) for _ in range(20)]
    rng.shuffle(packets)
    timed = [(number * 123_457, frame) for number, frame in enumerate(packets)]
    results = [
        run(timed, fmt=fmt, nanosecond=nanosecond, byte_order=order, knock_timeout=3.0)
        for fmt in ("pcap", "pcapng")
        for nanosecond in (False, True)
        for order in ("little", "big")
    ]
    reference_records, reference_stats, _ = results[0]
    assert reference_stats["packets"] == len(packets)
    for records, stats, _ in results[1:]:
        assert stats == reference_stats
        assert_records_equal(records, reference_records)
