"""The doorman's loop between capture and firewall: backlog, slices, replay-cache commits,
decision sinks and the stats snapshot.

Real pieces throughout: the capture engine reads a capture file of SPA datagrams (one
completion each), the replay cache is a SQLite file, the firewall is the dry run (or a
double of it that checks the replay cache on disk), and the firewall worker thread runs.
Only the live capture is left out (tests/test_e2e.py has it).
"""

from __future__ import annotations

import ipaddress
import logging
import random
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from knock_client.keys import write_key_file
from knock_client.protocol import DEFAULT_SPA_PORT, Action, Knock, Proto, seal, siv_of
from knockd_fast import frames
from knockd_fast._capture import engine_for
from knockd_fast.capture_spec import LINKTYPE_ETHERNET
from knockd_fast.config import load_config
from knockd_fast.daemon import (
    JUDGE_SLICE,
    LIGHT_TURN_PPS,
    MAX_JUDGE_SLICE,
    TURN_BURST,
    TURN_SECONDS,
    Capture,
    Doorman,
    TurnPacer,
    slice_size,
)
from knockd_fast.firewall.base import Grant
from knockd_fast.firewall.dryrun import DryRunFirewall
from knockd_fast.firewall.worker import FirewallWorker
from knockd_fast.judging import MIN_BACKLOG
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


def raised_caps(tmp_path: Path, grants: int = 1000, knocks: int = 1000):
    """The fixture's config with alice's caps raised (its [[users]] table comes last), for
    tests of bursts by one user that are not about the caps."""
    path = tmp_path / "config.toml"
    path.write_text(path.read_text() + f"max_grants = {grants}\nmax_knocks_per_minute = {knocks}\n")
    return load_config(path)


def spa_capture(path: Path, knockers: list[ipaddress.IPv4Address]) -> dict[str, bytes]:
    """One SPA datagram per knocker (each is one completion; a knocker listed twice sends
    the same message twice: a replay); returns each source's SIV."""
    sivs = {}
    with CaptureWriter(path, LINKTYPE_ETHERNET) as writer:
        for n, source in enumerate(knockers):
            salt = knockers.index(source)
            message = seal(Knock(Action.OPEN, Proto.TCP, 22, NOW, source, 7, salt), KEY)
            sivs[str(source)] = siv_of(message)
            datagram = frames.udp(40000, DEFAULT_SPA_PORT, message)
            writer.write(NOW, n, frames.ethernet(frames.ipv4(source, SERVER, 17, datagram)))
    return sivs


class Recorder:
    """A decision sink that keeps what it was given, slice by slice."""

    def __init__(self) -> None:
        self.slices: list[list] = []

    def write(self, decisions) -> None:  # noqa: ANN001
        self.slices.append(list(decisions))

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        pass


class CommittedFirst(DryRunFirewall):
    """A dry run that, for every grant it is asked to open, checks on its own connection to
    the replay cache's file that the message is already committed there."""

    def __init__(self, db: Path, sivs: dict[str, bytes]) -> None:
        super().__init__()
        self.db, self.sivs = db, sivs
        self.uncommitted: list[str] = []

    def open(self, grant):  # noqa: ANN001, ANN201
        with sqlite3.connect(self.db) as db:  # sees committed transactions only
            row = db.execute(
                "SELECT 1 FROM seen WHERE user_id = 7 AND siv = ?", (self.sivs[str(grant.source)],)
            ).fetchone()
        if row is None:
            self.uncommitted.append(str(grant.source))
        return super().open(grant)


class InlineWorker(FirewallWorker):
    """The firewall worker, applying each hand-over at once on the caller's thread: a change
    handed over too early reaches the firewall too early, every time, not only when the
    thread happens to be quick."""

    def submit(self, changes) -> None:  # noqa: ANN001
        for change in changes:
            self.apply(change)


def doorman(  # noqa: ANN001
    config, capture_file: Path, firewall=None, sinks=(), inline: bool = False
) -> tuple[Doorman, Capture]:
    engine = engine_for(config, [SERVER])  # the daemon's own: its modes and users refused in C
    engine.open_file(str(capture_file))
    capture = Capture("eth0", engine)
    replay = ReplayCache.for_state_dir(config.state_dir, now=NOW)
    firewall = firewall or DryRunFirewall()
    clock = lambda: NOW + 1.5  # noqa: E731
    worker = InlineWorker(firewall, clock) if inline else None
    door = Doorman(config, [capture], firewall, replay, sinks, clock=clock, worker=worker)
    return door, capture


def read_and_judge(door: Doorman, capture: Capture, *limits: int | None) -> list:
    """With the worker thread running: one read, then a slice per limit; the stats taken
    after each slice. The worker has applied everything once this returns."""
    door.worker.start()
    try:
        door.read(capture)
        snapshots = []
        for limit in limits:
            door.judge_backlog(limit)
            snapshots.append(door.stats())
    finally:
        door.worker.stop()
        door.replay.close()
    return snapshots


def test_a_burst_is_read_at_once_and_judged_in_slices_committed_before_granted(setup) -> None:
    tmp_path, _ = setup
    config = raised_caps(tmp_path)
    knockers = sources(3 * JUDGE_SLICE + 5)
    sivs = spa_capture(tmp_path / "burst.pcap", knockers)
    firewall = CommittedFirst(config.state_dir / DB_NAME, sivs)
    recorder = Recorder()
    door, capture = doorman(config, tmp_path / "burst.pcap", firewall, [recorder], inline=True)
    try:
        assert door.read(capture) == len(knockers)  # every packet read in one turn
        assert door.judge_backlog(JUDGE_SLICE) == JUDGE_SLICE  # then one slice judged
        assert door.judge_backlog(None) == len(knockers) - JUDGE_SLICE
    finally:
        door.replay.close()
    assert sorted(g.source for g in firewall.grants()) == knockers
    # Every grant reached the firewall thread only after its message was on disk.
    assert firewall.uncommitted == []
    # The sinks got each slice once, in order.
    assert [len(s) for s in recorder.slices] == [JUDGE_SLICE, len(knockers) - JUDGE_SLICE]
    judged = [d.source for s in recorder.slices for d in s]
    assert judged == [str(k) for k in knockers]
    assert all(d.accepted and d.interface == "eth0" for s in recorder.slices for d in s)
    assert door.backlog.dropped == 0


def test_a_firewall_double_that_checks_the_disk_would_catch_a_grant_before_its_commit(
    setup,
) -> None:
    """The check above can fail: asked to open while the slice's transaction is still open
    (as a doorman that handed changes over before committing would), the double says so."""
    tmp_path, config = setup
    sivs = spa_capture(tmp_path / "one.pcap", sources(1))
    firewall = CommittedFirst(config.state_dir / DB_NAME, sivs)
    door, capture = doorman(config, tmp_path / "one.pcap", firewall)
    door.read(capture)
    with door.replay.batch():
        (item,) = door.backlog.take(None)
        _, change = door.judge.decide(item[1], NOW + 1.5, item[0])
        firewall.open(change.grant)  # before the batch commits
    door.replay.close()
    assert firewall.uncommitted == ["198.18.0.0"]


def test_a_full_backlog_drops_new_completions_and_says_so(setup, caplog) -> None:
    tmp_path, config = setup
    knockers = sources(30)
    spa_capture(tmp_path / "flood.pcap", knockers)
    door, capture = doorman(config, tmp_path / "flood.pcap")
    assert door.backlog.limit == max(MIN_BACKLOG, config.capture.table_size)
    door.backlog.limit = 10
    with caplog.at_level(logging.WARNING, logger="knockd_fast"):
        read_and_judge(door, capture, None)
    assert door.backlog.dropped == 20
    # The oldest completions were kept and judged; the overflow was refused, not queued.
    assert sorted(g.source for g in door.firewall.grants()) == knockers[:10]
    warnings = [r.getMessage() for r in caplog.records if "judging backlog full" in r.getMessage()]
    assert len(warnings) == 1 and "dropped 20" in warnings[0]
    assert door.stats().backlog_dropped == 20


def test_stats_is_one_snapshot_of_every_counter(setup) -> None:
    tmp_path, config = setup
    knockers = sources(5)
    spa_capture(tmp_path / "five.pcap", knockers + knockers[:2])  # two replays
    door, capture = doorman(config, tmp_path / "five.pcap")
    before, _ = read_and_judge(door, capture, 3, None)
    stats = door.stats()  # with the worker stopped: all it did is counted
    assert before.backlog == 4 and stats.backlog == 0
    (only,) = stats.captures
    assert (only.interface, only.running) == ("eth0", True)
    assert only.counters["spa_packets"] == only.counters["completions"] == 7
    assert stats.capture_totals() == dict(only.counters)
    assert stats.decisions == {("accepted", "ok"): 5, ("rejected", "replay"): 2}
    assert (stats.firewall_backend, stats.firewall_applied, stats.firewall_failed) == (
        "dry-run",
        5,
        0,
    )
    assert (stats.firewall_absorbed, stats.firewall_dropped) == (0, 0)
    assert (stats.replay_entries, stats.replay_degraded) == (5, None)
    assert stats.stop_line().startswith("packets=7 knock_packets=0 spa_packets=7 completions=7 ")
    assert stats.stop_line().endswith(" pcap_ifdropped=0 backlog_dropped=0")


def test_a_failing_sink_loses_no_grant(setup, caplog) -> None:
    tmp_path, config = setup
    spa_capture(tmp_path / "one.pcap", sources(1))

    class Broken(Recorder):
        def write(self, decisions) -> None:  # noqa: ANN001
            raise RuntimeError("sink bug")

    recorder = Recorder()
    door, capture = doorman(config, tmp_path / "one.pcap", sinks=[Broken(), recorder])
    with caplog.at_level(logging.ERROR, logger="knockd_fast"):
        read_and_judge(door, capture, None)
    assert [g.source for g in door.firewall.grants()] == sources(1)
    assert len(recorder.slices) == 1
    assert "internal error in decision sink Broken" in caplog.text


def test_a_window_raised_by_reload_keeps_refusing_the_replays_of_the_old_window(setup) -> None:
    """Accepted under a 30 s window, replayed 31 s later after a SIGHUP raised it to 60 s:
    the cached entry must cover the new window (it used to expire at the old one)."""
    tmp_path, config = setup
    spa_capture(tmp_path / "one.pcap", sources(1))
    recorder = Recorder()
    door, capture = doorman(config, tmp_path / "one.pcap", sinks=[recorder], inline=True)
    door.read(capture)
    door.judge_backlog(None)
    text = (tmp_path / "config.toml").read_text()
    (tmp_path / "config.toml").write_text("[knock]\nwindow = 60\n" + text)
    door.reload()
    assert door.config.knock.window == 60 and door.replay.window == 60
    # The same datagram again, captured 31 s after it was sealed.
    message = seal(Knock(Action.OPEN, Proto.TCP, 22, NOW, sources(1)[0], 7, 0), KEY)
    with CaptureWriter(tmp_path / "again.pcap", LINKTYPE_ETHERNET) as writer:
        datagram = frames.udp(40000, DEFAULT_SPA_PORT, message)
        writer.write(NOW + 31, 0, frames.ethernet(frames.ipv4(sources(1)[0], SERVER, 17, datagram)))
    door.clock = lambda: NOW + 31.5
    capture.engine.open_file(str(tmp_path / "again.pcap"))
    door.read(capture)
    door.judge_backlog(None)
    door.replay.close()
    (first,), (again,) = recorder.slices
    assert (first.verdict, again.verdict, again.reason) == ("accepted", "rejected", "replay")


def test_a_message_that_cannot_become_a_grant_is_refused_and_not_used_up(setup) -> None:
    """A completion no grant can be made of (here an IPv6 source knocking an IPv4-mapped
    destination, which the engines now refuse themselves) is rejected before its message is
    remembered: the genuine copy of the same message is still accepted."""
    from knockd_fast.capture_spec import COMPLETION_DTYPE, KIND_SPA, address_key
    from knockd_fast.completions import completion_of
    from knockd_fast.judging import Judge

    tmp_path, config = setup
    source = ipaddress.IPv6Address("2001:db8::7")
    message = seal(Knock(Action.OPEN, Proto.TCP, 22, NOW, source, 7, 1), KEY)

    def record(destination: str):  # noqa: ANN202
        found = np.zeros(1, dtype=COMPLETION_DTYPE)[0]
        found["kind"], found["family"], found["length"] = KIND_SPA, 6, len(message)
        found["source"] = list(address_key(source))
        found["destination"] = list(address_key(ipaddress.ip_address(destination)))
        found["message"][: len(message)] = list(message)
        return completion_of(found)

    replay = ReplayCache(None)
    judge = Judge(config, replay)
    bad, change = judge.decide(record("::ffff:198.51.100.20"), NOW + 1)
    assert (bad.verdict, bad.reason, change) == ("rejected", "malformed", None)
    assert bad.detail.startswith("no grant: ") and len(replay) == 0
    good, change = judge.decide(record("2001:db8::1"), NOW + 1)
    assert (good.verdict, good.reason) == ("accepted", "ok") and change is not None


@pytest.mark.parametrize("modes", ['["syn", "udp", "spa"]', '["syn"]'])
def test_twenty_thousand_junk_datagrams_cost_a_few_log_lines(setup, caplog, modes) -> None:
    """The review's flood: 20,000 junk SPA datagrams made 20,004 log lines, with SPA
    disabled too. Now the engine refuses what needs no key (SPA off: every datagram; on:
    the headers naming no user here), the rest is logged as a sample per reason and a
    summary, and the one genuine knock in the middle of it is logged as ever."""
    from knockd_fast.sinks import LogSink

    tmp_path, _ = setup
    text = (tmp_path / "config.toml").read_text()
    (tmp_path / "config.toml").write_text(f"[knock]\nmodes = {modes}\n" + text)
    config = load_config(tmp_path / "config.toml")
    rng = random.Random(7)
    genuine = seal(Knock(Action.OPEN, Proto.TCP, 22, NOW, sources(1)[0], 7, 1), KEY)
    with CaptureWriter(tmp_path / "junk.pcap", LINKTYPE_ETHERNET) as writer:
        for n in range(20_001):
            source = ipaddress.IPv4Address("203.0.113.0") + n % 200
            payload = rng.randbytes(34)
            if n == 10_000:
                source, payload = sources(1)[0], genuine
            datagram = frames.udp(40000, DEFAULT_SPA_PORT, payload)
            writer.write(NOW, n, frames.ethernet(frames.ipv4(source, SERVER, 17, datagram)))
    door, capture = doorman(config, tmp_path / "junk.pcap", sinks=[LogSink()], inline=True)
    with caplog.at_level(logging.INFO, logger="knockd_fast.decisions"):
        while door.read(capture):
            door.judge_backlog(None)
        door._to_sinks("close")
    door.replay.close()
    said = [r.getMessage() for r in caplog.records if r.name == "knockd_fast.decisions"]
    assert len(said) <= 100, f"{len(said)} lines"
    accepted = [line for line in said if " accepted ok: " in line]
    refused = capture.engine.stats()
    if "spa" not in modes:  # the kernel filter leaves them out live; a file has them
        assert said == [] and refused["refused_mode"] == 20_001
        return
    assert len(accepted) == 1
    # Junk naming a user here is judged (shown, or counted in a summary when more than the
    # sample), the rest refused in C.
    summaries = [line for line in said if line.startswith("rejections ")]
    judged = [line for line in said if " rejected " in line]
    counted = sum(int(n) for n in re.findall(r" (\d+) \(\d+ shown\)", "".join(summaries)))
    counted = counted or len(judged)
    assert refused["refused_version"] > 18_000
    assert counted + refused["refused_version"] + refused["refused_user"] == 20_000


def test_a_completion_is_judged_at_its_capture_time_not_when_it_leaves_the_backlog(
    setup,
) -> None:
    """A knock captured in time but judged long after (a backlog that grew under a flood)
    is still fresh: it used to expire in the backlog."""
    tmp_path, config = setup
    spa_capture(tmp_path / "late.pcap", sources(3))
    recorder = Recorder()
    door, capture = doorman(config, tmp_path / "late.pcap", sinks=[recorder], inline=True)
    door.clock = lambda: NOW + 3600  # judged an hour later; the window is 30 s
    door.read(capture)
    door.judge_backlog(None)
    door.replay.close()
    (judged,) = recorder.slices
    assert [d.verdict for d in judged] == ["accepted"] * 3
    assert all(NOW <= d.time < NOW + 1 for d in judged)  # the decision says when it came
    # The grants last their time from when they are made, not from the capture.
    assert {g.expires for g in door.firewall.grants()} == {NOW + 3600 + 300}


def test_a_reload_tells_the_engines_which_users_and_modes_to_admit(setup) -> None:
    """User 7 renumbered to 8 and SPA turned off by SIGHUP: the engine refuses user 7's
    datagrams as `refused_mode` (SPA off) and, SPA back on, as `refused_user`."""
    tmp_path, config = setup
    spa_capture(tmp_path / "spa.pcap", sources(2))
    recorder = Recorder()
    door, capture = doorman(config, tmp_path / "spa.pcap", sinks=[recorder], inline=True)
    assert capture.engine.admission.user_ids == {7}
    text = (tmp_path / "config.toml").read_text().replace("id = 7", "id = 8")
    (tmp_path / "config.toml").write_text('[knock]\nmodes = ["syn"]\n' + text)
    door.reload()
    assert capture.engine.admission.user_ids == {8} and not capture.engine.admission.spa_mode
    door.read(capture)
    (tmp_path / "config.toml").write_text(text)
    door.reload()
    capture.engine.open_file(str(tmp_path / "spa.pcap"))
    door.read(capture)
    door.judge_backlog(None)
    door.replay.close()
    counters = capture.engine.stats()
    assert (counters["refused_mode"], counters["refused_user"]) == (2, 2)
    assert recorder.slices == [] and counters["completions"] == 0


def test_a_change_that_waits_for_a_restart_is_named_at_every_reload_with_both_values(
    setup, caplog
) -> None:
    """8 -> 10 digit bits, then a second SIGHUP with the file unchanged: still pending, and
    the judge keeps the layout the engines capture with (it rebuilds the alternatives)."""
    tmp_path, config = setup
    spa_capture(tmp_path / "spa.pcap", sources(1))
    door, _ = doorman(config, tmp_path / "spa.pcap", inline=True)
    text = (tmp_path / "config.toml").read_text()
    (tmp_path / "config.toml").write_text(
        '[knock]\ndigit_bits = 10\nwindow = 90\n' + text.replace('"eth0"', '["eth0", "eth1"]')
    )
    pending = (
        "reload: these apply at the next restart, it runs as started until then: "
        "knock.digit_bits 8 -> 10; capture.interface [eth0] -> [eth0, eth1]"
    )
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="knockd_fast"):
            door.reload()
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
            pending
        ]
        assert door.judge.config.knock.layout.digit_bits == 8
        assert door.judge.config.capture.interfaces == ("eth0",)
        assert door.judge.config.knock.window == 90, "what a reload may change, it changes"
    (tmp_path / "config.toml").write_text(text)  # back as it runs: nothing pending
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        door.reload()
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert door.judge.config.knock.window == 30
    door.replay.close()


# --- per-user caps, and grants a new configuration no longer entitles -------------------

KEY_BOB = bytes(range(64, 128))


def two_users(tmp_path: Path, alice_allow: str = '["22/tcp", "443/tcp"]', bob: bool = True):
    """The fixture's config with alice allowed ``alice_allow``, and bob (id 8, 22/tcp and
    443/tcp) unless ``bob`` is False; written again on each call (a reload reads it)."""
    if not (tmp_path / "bob.key").exists():
        write_key_file(tmp_path / "bob.key", KEY_BOB)
    text = (
        '[capture]\ninterface = "eth0"\n'
        f'[state]\ndirectory = "{tmp_path / "state"}"\n'
        '[[users]]\nid = 7\nname = "alice"\nkey_file = "alice.key"\n'
        f"allow = {alice_allow}\n"
    )
    if bob:
        text += '[[users]]\nid = 8\nname = "bob"\nkey_file = "bob.key"\n'
        text += 'allow = ["22/tcp", "443/tcp"]\n'
    (tmp_path / "config.toml").write_text(text)
    return load_config(tmp_path / "config.toml")


def sealed(user_id: int, source: ipaddress.IPv4Address, port: int = 22, salt: int = 0) -> bytes:
    knock = Knock(Action.OPEN, Proto.TCP, port, NOW, source, user_id, salt)
    return seal(knock, KEY if user_id == 7 else KEY_BOB)


def write_spa(path: Path, knocks: list[tuple[ipaddress.IPv4Address, bytes]]) -> Path:
    """One SPA datagram per (source, message), all captured at NOW."""
    with CaptureWriter(path, LINKTYPE_ETHERNET) as writer:
        for n, (source, message) in enumerate(knocks):
            datagram = frames.udp(40000, DEFAULT_SPA_PORT, message)
            writer.write(NOW, n, frames.ethernet(frames.ipv4(source, SERVER, 17, datagram)))
    return path


class HandOver(InlineWorker):
    """The inline worker, keeping every change handed over to it."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.handed: list = []

    def submit(self, changes) -> None:  # noqa: ANN001
        self.handed += changes
        super().submit(changes)


def judged_doorman(config, capture_file: Path | None, grants=()) -> Doorman:  # noqa: ANN001
    """A doorman with the dry run and a ``HandOver`` worker that has judged all of
    ``capture_file`` (None: nothing); ``grants`` as read back at start."""
    firewall = DryRunFirewall(history=0)
    for grant in grants:
        firewall.open(grant)
    clock = lambda: NOW + 1.5  # noqa: E731
    captures = []
    if capture_file is not None:
        engine = engine_for(config, [SERVER])
        engine.open_file(str(capture_file))
        captures = [Capture("eth0", engine)]
    door = Doorman(
        config,
        captures,
        firewall,
        ReplayCache(None),
        clock=clock,
        worker=HandOver(firewall, clock),
        grants=grants,
    )
    for capture in captures:
        while door.read(capture):
            door.judge_backlog(None)
    return door


def grants_of(door: Doorman) -> list[tuple[str, int, str]]:
    return [(str(g.source), g.port, g.user) for g in door.firewall.grants()]


def test_three_thousand_opens_from_one_key_stop_at_its_cap_and_another_user_still_opens(
    setup, caplog
) -> None:
    """The issue's attack: one key opens grants for 3,000 claimed-and-spoofed addresses.
    16 are opened and handed to the firewall; the rest are refused as limit without a
    firewall change, and bob's knock sent after them is handed over too."""
    tmp_path, _ = setup
    config = two_users(tmp_path)
    flood = [(source, sealed(7, source, salt=n)) for n, source in enumerate(sources(3000))]
    bob = ipaddress.IPv4Address("203.0.113.9")
    write_spa(tmp_path / "flood.pcap", [*flood, (bob, sealed(8, bob))])
    with caplog.at_level(logging.WARNING, logger="knockd_fast"):
        door = judged_doorman(config, tmp_path / "flood.pcap")
    assert door.decided == {("accepted", "ok"): 17, ("rejected", "limit"): 2984}
    handed = door.worker.handed
    # Bob's network waits one turn of the backlog, not behind the flood: among the first.
    assert len(handed) == 17 and "bob" in [change.grant.user for change in handed[:13]]
    held = grants_of(door)
    assert sum(user == "alice" for _, _, user in held) == 16
    assert ("203.0.113.9", 22, "bob") in held
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("limit:")]
    assert warnings == [
        "limit: max_grants 16 reached for 'alice': 16 live grants; knocks past it are "
        "refused (this warning at most once a minute)"
    ]


def test_a_reload_that_removes_a_user_closes_its_grants_through_the_worker(setup, caplog) -> None:
    tmp_path, _ = setup
    config = two_users(tmp_path)
    a, b, c = sources(3)
    knocks = [(a, sealed(7, a)), (b, sealed(7, b, port=443)), (c, sealed(8, c, port=443))]
    door = judged_doorman(config, write_spa(tmp_path / "three.pcap", knocks))
    assert len(door.firewall.grants()) == 3
    two_users(tmp_path, bob=False)
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        door.reload()
    assert grants_of(door) == [(str(a), 22, "alice"), (str(b), 443, "alice")]
    said = [r.getMessage() for r in caplog.records if r.name == "knockd_fast"]
    assert said == [
        "reload: closing 443/tcp for 198.18.0.2 to 192.0.2.1 (user bob) (user removed)",
        "firewall (dry run): closed 443/tcp for 198.18.0.2 to 192.0.2.1 (user bob)",
        f"reloaded {config.path}: 1 users",
    ]
    assert door.judge.limits.live_grants("bob", NOW) == []


def test_a_reload_that_removes_a_port_closes_those_grants_only(setup, caplog) -> None:
    tmp_path, _ = setup
    config = two_users(tmp_path)
    a, b, c = sources(3)
    knocks = [(a, sealed(7, a)), (b, sealed(7, b, port=443)), (c, sealed(8, c, port=443))]
    door = judged_doorman(config, write_spa(tmp_path / "three.pcap", knocks))
    two_users(tmp_path, alice_allow='["22/tcp"]')
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        door.reload()
    assert grants_of(door) == [(str(a), 22, "alice"), (str(c), 443, "bob")]
    assert (
        "reload: closing 443/tcp for 198.18.0.1 to 192.0.2.1 (user alice) (port no longer allowed)"
    ) in caplog.text
    door.reload()  # nothing more to close
    assert len(door.worker.handed) == 4


def test_grants_read_back_at_start_count_and_those_no_longer_entitled_are_closed(
    setup, caplog
) -> None:
    tmp_path, _ = setup
    config = two_users(tmp_path, alice_allow='["22/tcp"]', bob=False)
    a, b, c = sources(3)
    held = [
        Grant(a, "tcp", 22, SERVER, NOW + 300, "alice"),
        Grant(b, "tcp", 443, SERVER, NOW + 300, "alice"),  # no longer allowed
        Grant(c, "tcp", 22, SERVER, NOW + 300, "carol"),  # no longer a user
    ]
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        door = judged_doorman(config, None, grants=held)
    assert grants_of(door) == [(str(a), 22, "alice")]
    assert "start: closing 443/tcp for 198.18.0.1 to 192.0.2.1 (user alice) (port no " in (
        caplog.text
    )
    assert "start: closing 22/tcp for 198.18.0.2 to 192.0.2.1 (user carol) (user removed)" in (
        caplog.text
    )
    assert door.judge.limits.live_grants("alice", NOW) == [held[0]]


def test_a_burst_is_judged_in_larger_slices_up_to_a_bound() -> None:
    """Each slice is one replay-cache transaction and one hand-over to the firewall: a long
    backlog is judged in fewer, larger slices, never so large that reading the captures
    waits long (MAX_JUDGE_SLICE at ~40 µs each is ~40 ms)."""
    assert [slice_size(n) for n in (0, 1, 256, 1_000, 4_000, 65_536)] == [
        JUDGE_SLICE,
        JUDGE_SLICE,
        JUDGE_SLICE,
        250,
        1_000,
        MAX_JUDGE_SLICE,
    ]


def run_pacer(pacer: TurnPacer, gaps: list[float], packets: int = 10) -> list[float]:
    """When each turn ends, the loop honouring every pause; ``gaps`` are how long each turn
    (or the wait for its packets) takes on top."""
    now, ends = 0.0, []
    for gap in gaps:
        now += gap
        ends.append(now)
        now += pacer.pause(now, packets, 0)
    return ends


def test_light_turns_are_paced_after_a_burst_and_heavy_ones_never() -> None:
    """A trickle of packets wakes the loop every capture block (5 ms): after TURN_BURST turns
    back to back it turns once per TURN_SECONDS; a flood (packets read at over
    LIGHT_TURN_PPS) or a waiting backlog is never held back."""
    pacer = TurnPacer()
    pauses = [pacer.pause(0.001 * n, 10, 0) for n in range(TURN_BURST + 1)]
    assert pauses == [0.0] * TURN_BURST + [pytest.approx(TURN_SECONDS, rel=0.3)]
    ends = run_pacer(TurnPacer(), [0.005] * 500)
    assert len(ends) / ends[-1] == pytest.approx(1 / TURN_SECONDS, rel=0.05)

    heavy = TurnPacer()
    flood = int(LIGHT_TURN_PPS * 0.001) + 1  # a turn's worth, every millisecond
    assert all(heavy.pause(0.001 * n, flood, 0) == 0 for n in range(100))
    assert all(heavy.pause(0.1 + 0.001 * n, 1, 5) == 0 for n in range(100))
    assert heavy.pause(0.2, 1, 0) > 0  # the heavy turns spent the allowance


def test_a_lone_knock_after_a_quiet_spell_is_not_paced() -> None:
    """After (TURN_BURST + 1) x TURN_SECONDS without turns (one more than the burst: the last
    paced turn left the bucket a token short) the burst is back: the few turns a lone knock's
    packets span (a block each) follow one another at once."""
    pacer = TurnPacer()
    last = run_pacer(pacer, [0.005] * 50)[-1]
    quiet = (TURN_BURST + 1) * TURN_SECONDS
    later = [pacer.pause(last + quiet + 0.005 * n, 10, 0) for n in range(TURN_BURST)]
    assert later == [0.0] * TURN_BURST


@given(st.lists(st.floats(0.001, 0.05), min_size=1, max_size=300))
def test_turns_never_outrun_the_bucket(gaps: list[float]) -> None:
    """However the turns come, light ones stay within TURN_BURST + 1 plus one per
    TURN_SECONDS in any stretch of time."""
    ends = run_pacer(TurnPacer(), gaps)
    for first in range(0, len(ends), 7):
        for last in range(first, len(ends)):
            turns = last - first + 1
            assert turns <= TURN_BURST + 1 + (ends[last] - ends[first]) / TURN_SECONDS + 1e-6


def test_a_fleet_grant_stands_only_as_this_gateways_configuration_allows_it(setup) -> None:
    """What another gateway of the fleet opened is applied only for a user known here, a
    port they may open, an address this gateway protects, and no longer than its grants
    last: even a holder of the fleet key cannot open more here than a knock could."""
    tmp_path, config = setup
    door = Doorman(config, [], DryRunFirewall(), ReplayCache(None), clock=lambda: NOW,
                   destinations=[SERVER])  # fmt: skip
    client = ipaddress.IPv4Address("198.51.100.7")

    def grant(port=22, destination=SERVER, seconds=60, user="alice") -> Grant:
        return Grant(client, "tcp", port, destination, NOW + seconds, user)

    assert door.entitled(grant()) is None
    longest = config.grants.max_timeout + 60  # the clock skew a fleet allows
    assert door.entitled(grant(seconds=longest)) is None
    refusals = {
        "no user 'mallory' here": grant(user="mallory"),
        "user 'alice' may not open 23/tcp here": grant(port=23),
        "any address is not protected here": grant(destination=None),
        "192.0.2.9 is not protected here": grant(destination=ipaddress.IPv4Address("192.0.2.9")),
        "it lasts longer than grants.max_timeout": grant(seconds=longest + 1),
    }
    for why, refused in refusals.items():
        assert why in door.entitled(refused), why
