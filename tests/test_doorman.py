"""The doorman's loop between capture and firewall: backlog, slices, replay-cache commits.

Real pieces throughout: the capture engine reads a capture file of SPA datagrams (one
completion each), the replay cache is a SQLite file, the firewall is the dry run, and the
firewall worker thread runs. Only the live capture is left out (tests/test_e2e.py has it).
"""

from __future__ import annotations

import ipaddress
import logging
import sqlite3
from pathlib import Path

import pytest

from knock_client.keys import write_key_file
from knock_client.protocol import DEFAULT_SPA_PORT, Action, Knock, Proto, seal
from knockd_fast import frames
from knockd_fast._capture import CaptureEngine
from knockd_fast.capture_spec import LINKTYPE_ETHERNET
from knockd_fast.config import load_config
from knockd_fast.daemon import JUDGE_SLICE, MIN_BACKLOG, Capture, Doorman
from knockd_fast.firewall.dryrun import DryRunFirewall
from knockd_fast.pcapfile import CaptureWriter
from knockd_fast.replay import DB_NAME, ReplayCache

NOW = 1_795_771_200
KEY = bytes(range(64))
SERVER = ipaddress.IPv4Address("192.0.2.1")


def sources(count: int) -> list[ipaddress.IPv4Address]:
    return [ipaddress.IPv4Address("198.18.0.0") + n for n in range(count)]


@pytest.fixture
def setup(tmp_path: Path):
    write_key_file(tmp_path / "alice.key", KEY)
    (tmp_path / "config.toml").write_text(
        '[capture]\ninterface = "eth0"\n'
        f'[state]\ndirectory = "{tmp_path / "state"}"\n'
        '[[users]]\nid = 7\nname = "alice"\nkey_file = "alice.key"\nallow = ["22/tcp"]\n'
    )
    return tmp_path, load_config(tmp_path / "config.toml")


def spa_capture(path: Path, knockers: list[ipaddress.IPv4Address]) -> None:
    """One SPA datagram per knocker: each is one completion for the engine."""
    with CaptureWriter(path, LINKTYPE_ETHERNET) as writer:
        for n, source in enumerate(knockers):
            knock = Knock(Action.OPEN, Proto.TCP, 22, NOW, source, 7, n)
            datagram = frames.udp(40000, DEFAULT_SPA_PORT, seal(knock, KEY))
            writer.write(NOW, n, frames.ethernet(frames.ipv4(source, SERVER, 17, datagram)))


def doorman(tmp_path: Path, config, capture_file: Path) -> tuple[Doorman, Capture]:  # noqa: ANN001
    engine = CaptureEngine(config.knock.layout, destinations=[SERVER])
    engine.open_file(str(capture_file))
    capture = Capture("eth0", engine)
    firewall = DryRunFirewall()
    replay = ReplayCache.for_state_dir(config.state_dir, now=NOW)
    door = Doorman(config, [capture], firewall, replay, clock=lambda: NOW + 1.5)
    return door, capture


def test_a_burst_is_read_at_once_and_judged_in_slices(setup) -> None:
    tmp_path, config = setup
    knockers = sources(3 * JUDGE_SLICE + 5)
    spa_capture(tmp_path / "burst.pcap", knockers)
    door, capture = doorman(tmp_path, config, tmp_path / "burst.pcap")
    door.worker.start()
    try:
        assert door.read(capture) == len(knockers)  # every packet read in one turn
        assert door.judge_backlog(JUDGE_SLICE) == JUDGE_SLICE  # then one slice judged
        # The slice's messages are on disk before its grants reach the firewall thread.
        db = sqlite3.connect(config.state_dir / DB_NAME)
        assert db.execute("SELECT COUNT(*) FROM seen").fetchone() == (JUDGE_SLICE,)
        assert door.judge_backlog(None) == len(knockers) - JUDGE_SLICE
        assert db.execute("SELECT COUNT(*) FROM seen").fetchone() == (len(knockers),)
        db.close()
    finally:
        door.worker.stop()
        door.replay.close()
    assert sorted(g.source for g in door.firewall.grants()) == knockers
    assert door.backlog_dropped == 0


def test_a_full_backlog_drops_new_completions_and_says_so(setup, caplog) -> None:
    tmp_path, config = setup
    knockers = sources(30)
    spa_capture(tmp_path / "flood.pcap", knockers)
    door, capture = doorman(tmp_path, config, tmp_path / "flood.pcap")
    assert door.backlog_limit == max(MIN_BACKLOG, config.capture.table_size)
    door.backlog_limit = 10
    door.worker.start()
    try:
        with caplog.at_level(logging.WARNING, logger="knockd_fast"):
            door.read(capture)
            door.judge_backlog(None)
    finally:
        door.worker.stop()
        door.replay.close()
    assert door.backlog_dropped == 20
    # The oldest completions were kept and judged; the overflow was refused, not queued.
    assert sorted(g.source for g in door.firewall.grants()) == knockers[:10]
    warnings = [r.getMessage() for r in caplog.records if "judging backlog full" in r.getMessage()]
    assert len(warnings) == 1 and "dropped 20" in warnings[0]
