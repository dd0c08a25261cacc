"""Knocks that fail before judging: both capture twins report them with their source
(``sweep`` and ``failed_knocks``), and the daemon turns a source's repeated failures into a
hint that the client's layout may differ from the server's (issue 13: a client with another
``digit_bits`` or ``base_port`` got nothing at all in the log)."""

from __future__ import annotations

import ipaddress
import re
import secrets
import tempfile
from pathlib import Path

import numpy as np
import pytest
import twins

from knock_client.protocol import Action, Knock, KnockLayout, Proto, seal
from knockd_fast import frames
from knockd_fast.capture_spec import (
    FAILED_KNOCK_DTYPE,
    FAILED_REASONS,
    FAILED_RING_CAPACITY,
    FAILED_TIMED_OUT,
    MIN_REPORTED_DIGITS,
    key_address,
)
from knockd_fast.hints import FailedKnockHints
from knockd_fast.pcapfile import CaptureWriter

SERVER = KnockLayout()  # base_port 20000, digit_bits 8
T0 = 1_800_000_000
SERVER_TIMEOUT = 10.0  # the engines' default knock_timeout
USER_ID = 7
KEY = bytes(range(64))
CLIENT, OTHER, DESTINATION = "198.51.100.7", "198.51.100.8", "192.0.2.1"


def knock_frames(client_layout: KnockLayout, source: str, sport: int, user_id: int = USER_ID):
    """The SYNs of one knock as a client with ``client_layout`` sends them."""
    knock = Knock(Action.OPEN, Proto.TCP, 22, T0, ipaddress.ip_address(source), user_id,
                  secrets.randbits(24))  # fmt: skip
    ports = client_layout.ports_for(seal(knock, KEY))
    return [
        frames.ethernet(frames.ip(source, DESTINATION, 6, frames.tcp(sport, port)))
        for port in ports
        if port <= 0xFFFF
    ]


def run_twin(name: str, knocks: list[list[bytes]], sweep_after: float, **options):
    """Feed the knocks (1 ms apart) to a fresh engine of twin ``name``, sweep at
    ``sweep_after`` seconds past T0; (completions, failed knocks, stats, freed)."""
    engine = twins.module(name).CaptureEngine(SERVER, user_ids=[USER_ID], **options)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "knocks.pcap"
        with CaptureWriter(path, 1) as writer:
            number = 0
            for knock in knocks:
                for frame in knock:
                    writer.write(T0, number * 1000, frame)
                    number += 1
        engine.open_file(str(path))
        records = []
        while engine.dispatch():
            records.append(engine.drain())
        records.append(engine.drain())
        freed = engine.sweep(T0 + sweep_after)
        failed = engine.failed_knocks()
        engine.close()
    return np.concatenate(records), failed, engine.stats(), freed


def both_twins(knocks, sweep_after, **options):
    """What each twin gives; the twins must agree byte for byte."""
    results = {name: run_twin(name, knocks, sweep_after, **options) for name in twins.TWIN_NAMES}
    first = next(iter(results.values()))
    for name, result in results.items():
        assert result[0].tobytes() == first[0].tobytes(), f"{name}: completions differ"
        assert result[1].tobytes() == first[1].tobytes(), f"{name}: failed knocks differ"
        assert result[2] == first[2] and result[3] == first[3], f"{name}: counters differ"
    return first


@pytest.mark.parametrize(
    ("client", "reasons"),
    [
        # 10-bit ports: only the first 9 land in the server's range, in the wrong segments.
        (KnockLayout(digit_bits=10), {"timed_out"}),
        # 7-bit digits: two client segments share each server segment and conflict.
        (KnockLayout(digit_bits=7), {"timed_out"}),
        # One port off: every digit shifted, and the header names another user (or none).
        (KnockLayout(base_port=20001), {"refused_user", "refused_version", "timed_out"}),
    ],
    ids=["digit_bits 10", "digit_bits 7", "base_port 20001"],
)
def test_a_client_with_another_layout_is_reported_with_its_source(client, reasons) -> None:
    knocks = [knock_frames(client, CLIENT, 40000 + n) for n in range(2)]
    completions, failed, stats, freed = both_twins(knocks, sweep_after=SERVER_TIMEOUT + 1)
    assert len(completions) == 0, "nothing reaches the judge"
    assert len(failed) == 2, failed
    assert {FAILED_REASONS[int(r)] for r in failed["reason"]} <= reasons
    for record in failed:
        assert str(key_address(bytes(record["source"]))) == CLIENT
        assert record["family"] == 4 and record["segments"] == 34
        if record["reason"] == FAILED_TIMED_OUT:
            assert MIN_REPORTED_DIGITS <= record["filled"] < 34
    if client.digit_bits == 7:
        assert all(failed["alternatives"] > 0), "the 7-bit digits conflict"
    assert stats["expired"] == freed == sum(failed["reason"] == FAILED_TIMED_OUT)


def test_the_sweep_frees_only_partial_knocks_past_the_timeout_and_reports_only_real_tries():
    genuine_but_cut = knock_frames(SERVER, CLIENT, 40000)[:-1]  # one packet lost
    stray = knock_frames(SERVER, OTHER, 40001)[: MIN_REPORTED_DIGITS - 1]  # a scan's few
    knocks = [genuine_but_cut, stray]
    _, failed, stats, freed = both_twins(knocks, sweep_after=SERVER_TIMEOUT - 1)
    assert (len(failed), freed, stats["expired"]) == (0, 0, 0), "nothing timed out yet"
    _, failed, stats, freed = both_twins(knocks, sweep_after=SERVER_TIMEOUT + 1)
    assert (freed, stats["expired"]) == (2, 2)
    assert len(failed) == 1, "the stray packets are no client trying"
    assert (failed[0]["filled"], failed[0]["sport"]) == (33, 40000)


def test_a_genuine_knock_completes_and_is_not_reported() -> None:
    completions, failed, stats, freed = both_twins(
        [knock_frames(SERVER, CLIENT, 40000)], sweep_after=SERVER_TIMEOUT + 1
    )
    assert len(completions) == 1 and len(failed) == 0 and freed == 0


def test_reports_past_the_ring_are_dropped_and_still_counted() -> None:
    # Whole knocks naming no user of the server: each a refusal report.
    knocks = [
        knock_frames(SERVER, f"203.0.113.{n % 250 + 1}", 1024 + n, user_id=99)
        for n in range(FAILED_RING_CAPACITY + 10)
    ]
    _, failed, stats, _ = both_twins(knocks, sweep_after=0)
    assert len(failed) == FAILED_RING_CAPACITY
    assert stats["refused_user"] == FAILED_RING_CAPACITY + 10


# --- the hint ---------------------------------------------------------------------------


def failures(source: str, reason: int, count: int, filled: int = 9) -> np.ndarray:
    records = np.zeros(count, FAILED_KNOCK_DTYPE)
    records["reason"] = reason
    records["family"] = 4
    records["filled"] = filled
    records["segments"] = 34
    records["sport"] = np.arange(40000, 40000 + count)  # each knock its own port
    records["source"] = list(ipaddress.IPv6Address(f"::ffff:{source}").packed)
    return records


def test_one_failure_is_no_hint_two_from_one_source_are_and_the_line_is_rate_limited() -> None:
    hints = FailedKnockHints(SERVER)
    hints.observe(failures(CLIENT, FAILED_TIMED_OUT, 1), "eth0", T0)
    hints.observe(failures(OTHER, FAILED_TIMED_OUT, 1), "eth0", T0)
    assert hints.hint(T0) is None, "a lone failure (a lost packet) is no hint"
    hints.observe(failures(CLIENT, FAILED_TIMED_OUT, 1), "eth0", T0 + 5)
    line = hints.hint(T0 + 5)
    assert line is not None
    assert line.startswith(
        "hint: knocks keep failing before they can be judged: 2 from 198.51.100.7 on eth0 "
        "(timed out with 9 of 34 digits). If these are your clients, their "
        "base_port/digit_bits may differ from the server's (base_port 20000, digit_bits 8;"
    ), line
    assert line.fields["sources"][0]["source"] == CLIENT
    hints.observe(failures(OTHER, FAILED_TIMED_OUT, 1), "eth0", T0 + 10)
    assert hints.hint(T0 + 10) is None, "at most one line a minute"
    assert "2 from 198.51.100.8 " in hints.hint(T0 + 70)
    hints.observe(failures(CLIENT, FAILED_TIMED_OUT, 3), "eth0", T0 + 200)
    assert hints.hint(T0 + 200) is None, "a source hinted at is not named again for an hour"


def test_failures_further_apart_than_the_window_are_no_hint() -> None:
    hints = FailedKnockHints(SERVER)
    hints.observe(failures(CLIENT, FAILED_TIMED_OUT, 1), "eth0", T0)
    hints.observe(failures(CLIENT, FAILED_TIMED_OUT, 1), "eth0", T0 + 601)
    assert hints.hint(T0 + 601) is None


def test_a_flood_of_spoofed_sources_is_bounded_and_named_in_one_line() -> None:
    hints = FailedKnockHints(SERVER)
    for n in range(5000):
        hints.observe(failures(str(ipaddress.IPv4Address(0xC6120000 + n)), 3, 2), "eth0", T0)
    assert len(hints._sources) <= 4096
    line = hints.hint(T0)
    assert line is not None and len(re.findall(r"\d from 198\.18\.", line)) == 3
    assert "; and 4093 more sources." in line, "the 4096 tracked, 3 of them named"
    assert "naming no user of this server" in line
