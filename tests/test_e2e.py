"""End to end: the real `knockd-fast run` and `knock`, real libpcap and iptables, in namespaces.

Reachability is always proven with a real TCP connect to a real listener behind a DROP
rule (tests/e2e.py has the harness); decisions are read from the daemon's own JSON log.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e import (
    CLIENT_V4,
    DECISION_KEYS,
    SERVER_V4,
    SERVER_V6,
    User,
    VolumeUnavailable,
    client_address,
    close_ports,
    doorman,
    ext4_volume,
    knockd_command,
    ns_run,
    other_address,
    render_config,
    server_address,
    write_key,
)
from netns import NetnsUnavailable

from knock_client.protocol import Action, Knock, KnockLayout, Proto, encode_header, seal
from knockd_fast import __version__

pytestmark = pytest.mark.netns

live = pytest.mark.extension  # live capture needs the Cython engine
PORT, PORT_B, PORT_C = 2222, 2223, 2224
SPA_PORT = KnockLayout().spa_port


def family_args(family: int) -> tuple[str, ...]:
    return ("-6",) if family == 6 else ("-4",)


def iso_seconds(stamp: str) -> float:
    """Unix seconds of a decision's ``time`` (``2026-11-27T10:46:26.123Z``)."""
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def accepted(action: str, port: int = PORT):
    def check(decision: dict) -> bool:
        return decision["action"] == action and decision["port"] == port

    return check


def open_and_wait(h, target: str, port: int = PORT, *extra: str) -> dict:
    """Knock open; the decision must be accepted and the grant in the firewall."""
    sent = h.knock("open", target, f"{port}/tcp", *extra)
    decision = h.wait_decision(accepted("open", port))
    assert (decision["verdict"], decision["reason"]) == ("accepted", "ok"), decision
    h.wait_log(rf"^firewall: opened {port}/tcp for ")
    return sent


def firewall_caught_up(h, port: int) -> None:
    """A sentinel through the first-in-first-out firewall thread: a close of ``port`` (which
    holds no grant) is accepted and carried out, so every change decided before it has been
    applied too. Proves a negative (nothing was granted) without guessing a delay."""
    h.knock("close", SERVER_V4, f"{port}/tcp", "--mode", "spa")
    assert h.wait_decision(accepted("close", port))["verdict"] == "accepted"
    h.wait_log(rf"^firewall: no grant to close for {port}/tcp ")


def json_messages(stderr: str) -> list[str]:
    """The messages of a ``run --json`` standard error, each line a JSON object with its
    time and level (the exit line of a failed start too)."""
    messages = []
    for line in stderr.splitlines():
        entry = json.loads(line)
        assert {"time", "level", "message"} <= entry.keys(), line
        messages.append(entry["message"])
    return messages


def status_grants(h) -> list[str]:
    """The grant lines of ``knockd-fast status`` (after its first line, before the counters)."""
    text = h.knockd("status", "-c", str(h.config_path)).stdout
    return text.split("\n\n")[0].splitlines()[1:]


def sealed(user: User, claimed: str, timestamp: int, port: int = PORT) -> bytes:
    knock = Knock(
        Action.OPEN,
        Proto.TCP,
        port,
        timestamp,
        ipaddress.ip_address(claimed),
        user.id,
        secrets.randbits(24),
    )
    return seal(knock, user.key)


# --- open and close --------------------------------------------------------------------


@live
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["syn", "udp", "spa"])
def test_open_then_close(e2e, mode, family):
    h = e2e()
    target = server_address(family)
    assert not h.can_connect(target, PORT), "the DROP rule does not hold before any knock"

    open_and_wait(h, target, PORT, "--mode", mode, *family_args(family))
    decision = h.decisions()[-1]
    assert decision["source"] == client_address(family)
    assert decision["destination"] == target
    assert decision["interface"] == h.interface
    assert h.can_connect(target, PORT)
    status = h.knockd("status", "-c", str(h.config_path))
    assert status.returncode == 0 and f"{client_address(family)} -> {target} 2222/tcp" in (
        status.stdout
    ), status
    assert status.stdout.startswith(f"knockd-fast runs (pid {h.proc.pid}; "), status.stdout

    h.knock("close", target, f"{PORT}/tcp", "--mode", mode, *family_args(family))
    decision = h.wait_decision(accepted("close"))
    assert decision["verdict"] == "accepted", decision
    h.wait_log(r"^firewall: closed 2222/tcp for ")
    assert not h.can_connect(target, PORT)
    assert h.grant_rules() == []
    h.stop()


# --- expiry ----------------------------------------------------------------------------


@live
def test_grant_expires_by_itself(e2e):
    h = e2e(default_timeout=3)
    open_and_wait(h, SERVER_V4)
    decided = h.decisions()[-1]["time"]
    (rule,) = h.grant_rules()
    expires = int(re.search(r"expires=(\d+)", rule).group(1))
    # The grant lasts default_timeout from when it was made: the capture time the decision
    # logs, or the second after when it was judged across a second's edge.
    assert int(iso_seconds(decided)) + 3 <= expires <= int(iso_seconds(decided)) + 4, rule
    assert h.can_connect(SERVER_V4, PORT)
    h.wait_log(r"^firewall: expired 2222/tcp for 192\.0\.2\.2 ", timeout=8)
    assert time.time() >= expires, "expired before its time"  # late is fine on a busy box
    assert not h.can_connect(SERVER_V4, PORT)
    assert h.grant_rules() == []
    status = status_grants(h)
    assert status == ["no live grants"], status
    h.stop()


# --- replays and spoofed sources -------------------------------------------------------


@live
@pytest.mark.parametrize("first,again", [("spa", "spa"), ("syn", "syn"), ("syn", "spa")])
def test_a_captured_message_sent_again_is_a_replay(e2e, first, again):
    h = e2e(ports=(PORT, PORT_B))
    sent = open_and_wait(h, SERVER_V4, PORT, "--mode", first)
    h.knock("close", SERVER_V4, f"{PORT}/tcp", "--mode", "spa")
    h.wait_log(r"^firewall: closed ")
    assert not h.can_connect(SERVER_V4, PORT)

    if again == "spa":
        h.send_udp(SERVER_V4, SPA_PORT, bytes.fromhex(sent["message"]))
    else:
        h.send_syn(SERVER_V4, sent["ports"])
    decision = h.wait_decision()
    assert (decision["verdict"], decision["reason"]) == ("rejected", "replay"), decision
    assert decision["source"] == CLIENT_V4 and decision["user"] == "alice"
    firewall_caught_up(h, PORT_B)  # a wrongly granted replay would be in the firewall by now
    assert h.grant_rules() == []
    assert not h.can_connect(SERVER_V4, PORT)
    h.stop()


@live
@pytest.mark.parametrize("family", [4, 6])
def test_the_same_message_from_another_source_is_refused(e2e, family):
    h = e2e()
    target, other = server_address(family), other_address(family)
    unsent = h.knock("open", target, f"{PORT}/tcp", "--mode", "spa", "--dry-run")
    assert unsent["sent"] is False and unsent["fields"]["claimed_ip"] == client_address(family)
    message = bytes.fromhex(unsent["message"])

    h.send_udp(target, SPA_PORT, message, source=other)
    decision = h.wait_decision()
    assert (decision["source"], decision["reason"]) == (other, "source_mismatch"), decision
    assert decision["verdict"] == "rejected"
    assert not h.can_connect(target, PORT, source=other)

    # The refused copy did not use the message up: its owner can still send it.
    h.send_udp(target, SPA_PORT, message)
    decision = h.wait_decision()
    assert (decision["source"], decision["verdict"]) == (client_address(family), "accepted")
    h.wait_log(r"^firewall: opened ")
    assert h.can_connect(target, PORT)
    assert not h.can_connect(target, PORT, source=other)

    h.send_udp(target, SPA_PORT, message, source=other)
    assert h.wait_decision()["reason"] == "source_mismatch"
    assert not h.can_connect(target, PORT, source=other)
    assert len(h.grant_rules()) == 1
    h.stop()


# --- messages that fail a check --------------------------------------------------------


@live
def test_bad_messages_are_refused_with_their_reason(e2e):
    h = e2e()
    alice = h.user()
    wrong_key = h.directory / "wrong.key"
    write_key(wrong_key)
    now = int(time.time())

    h.knock("open", SERVER_V4, f"{PORT}/tcp", key_file=wrong_key)
    assert h.wait_decision()["reason"] == "authentication"
    # A user id with no key here is refused by the capture engine: counted, never judged.
    h.knock("open", SERVER_V4, f"{PORT}/tcp", "--mode", "spa", user_id=99)
    h.send_udp(SERVER_V4, SPA_PORT, sealed(alice, CLIENT_V4, now - 600))
    assert h.wait_decision()["reason"] == "expired"
    h.send_udp(SERVER_V4, SPA_PORT, sealed(alice, CLIENT_V4, now + 600))
    assert h.wait_decision()["reason"] == "from_future"
    h.knock("open", SERVER_V4, f"{PORT_B}/tcp", "--mode", "udp")
    assert h.wait_decision()["reason"] == "not_allowed"

    rejected = h.decisions()
    assert [d["reason"] for d in rejected] == [
        "authentication", "expired", "from_future", "not_allowed"
    ], rejected
    assert all(d["source"] == CLIENT_V4 for d in rejected)
    assert h.grant_rules() == []
    assert not h.can_connect(SERVER_V4, PORT)
    # ... and a good knock still works afterwards.
    open_and_wait(h, SERVER_V4)
    assert h.can_connect(SERVER_V4, PORT)
    h.stop()
    stopped = h.wait_log(r"^stopped: ", 0, since=0)
    assert " refused_user=1 " in stopped and " refused_version=0 " in stopped, stopped


@live
def test_a_knock_with_a_spoofed_conflicting_digit_still_opens(e2e):
    h = e2e()
    layout = KnockLayout()
    genuine = encode_header(h.user().id)[0]  # segment 0 holds the clear header's first byte
    poison = layout.base_port + (genuine ^ 0x01)
    # From the knock's own source port: an attacker who guessed it, or a stray retransmit.
    sport = 40000 + secrets.randbelow(20000)
    h.send_syn(SERVER_V4, [poison], sport=sport)
    sent = open_and_wait(h, SERVER_V4, PORT, "--no-shuffle", "--source-port", str(sport))
    assert sent["ports"][0] == layout.base_port + genuine != poison
    assert h.can_connect(SERVER_V4, PORT)
    h.stop()
    stopped = h.wait_log(r"^stopped: ", 0, since=0)
    assert " conflicts=1 " in stopped, stopped
    assert [d["reason"] for d in h.decisions()] == ["ok"]


@live
def test_blind_spoofed_syns_from_the_knockers_address_do_not_break_its_knocks(e2e):
    """A blind attacker who knows the client's address and the layout, but not the source
    port of its next knock, sprays SYNs from that address to random digits of every segment
    (each from a port of its own): 200 before each knock (the review's attack broke 10 of 10
    knocks so), and the knock still opens and closes."""
    h = e2e()
    layout, rng = KnockLayout(), secrets.SystemRandom()

    def spray(count: int) -> None:
        ports = [
            layout.base_port + rng.randrange(34) * layout.segment_size + rng.randrange(256)
            for _ in range(count)
        ]
        h.send_syn(SERVER_V4, ports, spray=True)

    for action in ("open", "close", "open"):
        spray(200)
        h.knock(action, SERVER_V4, f"{PORT}/tcp")
        decision = h.wait_decision(accepted(action))
        assert (decision["verdict"], decision["reason"]) == ("accepted", "ok"), decision
        h.wait_log(rf"^firewall: {'opened' if action == 'open' else 'closed'} {PORT}/tcp ")
    assert h.can_connect(SERVER_V4, PORT)
    assert [d["reason"] for d in h.decisions()] == ["ok"] * 3, "no failed knock was logged"
    h.stop()


# --- crash and restart -----------------------------------------------------------------


@live
def test_kill9_then_restart_keeps_live_grants_and_drops_expired_ones(e2e):
    h = e2e(ports=(PORT, PORT_B), default_timeout=300, max_timeout=3600)
    sent_a = open_and_wait(h, SERVER_V4, PORT, "--duration", "600")
    session = h.session(SERVER_V4, PORT)
    assert session.alive()
    open_and_wait(h, SERVER_V4, PORT_B, "--duration", "3")
    h.kill9()  # B's 3 s have just begun: nothing can remove it now, whatever the load
    rule_b = next(rule for rule in h.grant_rules() if "--dport 2223 " in rule)
    expires_b = int(re.search(r"expires=(\d+)", rule_b).group(1))
    time.sleep(max(0.0, expires_b + 1.2 - time.time()))
    assert rule_b in h.grant_rules(), "nobody runs to remove B while the daemon is dead"
    h.start()
    assert "grants kept 1, expired 1" in h.start_line, h.start_line

    grants = h.grant_rules()
    assert len(grants) == 1 and "--dport 2222 " in grants[0], grants
    for family in (4, 6):
        hooked = [rule for rule in h.iptables_rules(family) if rule.startswith("-A INPUT ")]
        assert hooked[0] == "-A INPUT -j KNOCKD-FAST", hooked
        assert hooked.count("-A INPUT -j KNOCKD-FAST") == 1, hooked
    assert session.alive(), "the restart cut a live session"
    assert h.can_connect(SERVER_V4, PORT)
    assert not h.can_connect(SERVER_V4, PORT_B)
    # The replay cache survived the kill -9 (docs/protocol.md section 7: across restarts).
    h.send_udp(SERVER_V4, SPA_PORT, bytes.fromhex(sent_a["message"]))
    assert h.wait_decision()["reason"] == "replay"
    # The restarted daemon still serves knocks.
    h.knock("close", SERVER_V4, f"{PORT}/tcp")
    h.wait_log(r"^firewall: closed 2222/tcp ")
    assert not h.can_connect(SERVER_V4, PORT)
    h.stop()


@live
def test_a_second_daemon_on_the_same_state_directory_is_refused_and_changes_nothing(e2e):
    h = e2e()
    open_and_wait(h, SERVER_V4, PORT)
    rules = h.iptables_rules()
    second = h.knockd("run", "-c", str(h.config_path), "--json")
    state = h.directory / "state"
    assert second.returncode == 1, second
    assert json_messages(second.stderr) == [
        f"knockd-fast: error: another knockd-fast (pid {h.proc.pid}) runs on {state}; "
        "stop it first"
    ], second.stderr
    assert h.iptables_rules() == rules, "the refused daemon touched the firewall"
    assert h.running() and h.can_connect(SERVER_V4, PORT)
    h.stop()
    status = h.knockd("status", "-c", str(h.config_path))
    assert status.returncode == 3, status
    assert status.stdout.splitlines()[0] == (
        f"knockd-fast is not running (state directory {state}, backend iptables): no knock "
        "is judged; the kernel still ends each grant below at its expiry"
    ), status.stdout
    h.start()  # the lock went with the first daemon
    assert h.running()
    h.stop()


# --- configuration refused before anything starts --------------------------------------


def _bad_configs(directory: Path, interface: str):
    """(name, config text, the dotted key the error must name) for each broken setup."""
    state = directory / "state"

    def user(key_file: Path) -> list[User]:
        return [User(7, "alice", ["2222/tcp"], key_file=key_file)]

    good = directory / "good.key"
    write_key(good)
    loose = directory / "loose.key"
    write_key(loose, mode=0o644)
    short = directory / "short.key"
    write_key(short, nbytes=16)
    return {
        "unknown_key": (
            render_config(interface, state, user(good), extra={"grants": {"default_timeuot": 3}}),
            "grants.default_timeuot",
        ),
        "wrong_type": (render_config(interface, state, user(good), window="30"), "knock.window"),
        "world_readable_key": (render_config(interface, state, user(loose)), "users[0].key_file"),
        "missing_key": (
            render_config(interface, state, user(directory / "nope.key")),
            "users[0].key_file",
        ),
        "short_key": (render_config(interface, state, user(short)), "users[0].key_file"),
        "bad_toml": ("[knock\nwindow = 30\n", "not valid TOML"),
    }


@pytest.mark.parametrize(
    "case",
    ["unknown_key", "wrong_type", "world_readable_key", "missing_key", "short_key", "bad_toml"],
)
def test_a_broken_configuration_is_one_line_and_exit_2(netns, tmp_path, case):
    text, key = _bad_configs(tmp_path, "lo")[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    done = ns_run(netns, [*knockd_command(), "run", "-c", path, "--json"], timeout=20)
    assert done.returncode == 2, done
    lines = json_messages(done.stderr)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"knockd-fast: error: {path}: {key}"), lines[0]
    assert done.stdout == ""
    assert "KNOCKD-FAST" not in ns_run(netns, ["iptables-legacy", "-S"]).stdout
    assert not (tmp_path / "state").exists()


@live
@pytest.mark.parametrize("destinations", [[], ["192.0.2.1"]])
def test_a_missing_interface_is_one_line_and_exit_1(netns, tmp_path, destinations):
    key = tmp_path / "alice.key"
    write_key(key)
    path = tmp_path / "config.toml"
    path.write_text(
        render_config(
            "kfnope0",
            tmp_path / "state",
            [User(7, "alice", ["2222/tcp"], key_file=key)],
            extra={"capture": {"destinations": destinations}},
        )
    )
    done = ns_run(netns, [*knockd_command(), "run", "-c", path, "--json"], timeout=20)
    assert done.returncode == 1, done
    lines = json_messages(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("knockd-fast: error: interface kfnope0: "), lines
    assert "KNOCKD-FAST" not in ns_run(netns, ["iptables-legacy", "-S"]).stdout


# --- offline replay of a capture --------------------------------------------------------


@live
@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")
def test_replay_command_judges_a_recorded_capture_without_touching_the_firewall(e2e):
    h = e2e()
    capture = h.directory / "knocks.pcap"
    # --immediate-mode: without it, packets still in the kernel's ring at SIGTERM are lost.
    # -s 512 -B 8192: in immediate mode each packet takes a frame of the snaplen, and at
    # tcpdump's default 262144 bytes its 2 MiB ring holds about 8: a burst (34 SYNs, 34
    # RSTs) overflowed it whenever tcpdump was not scheduled at once (a busy machine).
    argv = ["tcpdump", "--immediate-mode", "-U", "-n", "-s", "512", "-B", "8192"]
    argv += ["-i", h.interface, "-w", capture]
    tcpdump = subprocess.Popen(
        ["ip", "netns", "exec", h.server, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([tcpdump.stderr], [], [], 10)
        assert ready and "listening on" in tcpdump.stderr.readline()
        sent = open_and_wait(h, SERVER_V4, PORT, "--mode", "syn")
        h.send_udp(SERVER_V4, SPA_PORT, bytes.fromhex(sent["message"]))
        assert h.wait_decision()["reason"] == "replay"
        # tcpdump writes each packet as it comes (-U): wait until the last one is in the file.
        deadline = time.monotonic() + 10
        while bytes.fromhex(sent["message"]) not in capture.read_bytes():
            assert time.monotonic() < deadline, "tcpdump did not record the replayed datagram"
            time.sleep(0.05)
    finally:
        tcpdump.send_signal(signal.SIGTERM)
        tcpdump.communicate(timeout=10)
    live_decisions = h.decisions()

    before = h.iptables_rules()
    done = h.knockd("replay", "-c", str(h.config_path), str(capture), "--json")
    assert done.returncode == 0, done.stderr
    assert h.iptables_rules() == before
    replayed = [json.loads(line) for line in done.stdout.splitlines()]
    assert all(tuple(decision) == DECISION_KEYS for decision in replayed), replayed
    assert [(d["verdict"], d["reason"]) for d in replayed] == [
        ("accepted", "ok"),
        ("rejected", "replay"),
    ], replayed
    for offline, online in zip(replayed, live_decisions, strict=True):
        assert offline["source"] == CLIENT_V4 and offline["destination"] == SERVER_V4
        assert (offline["user"], offline["action"], offline["port"], offline["proto"]) == (
            "alice",
            "open",
            PORT,
            "tcp",
        )
        assert {k: online[k] for k in DECISION_KEYS if k not in ("time", "interface")} == {
            k: offline[k] for k in DECISION_KEYS if k not in ("time", "interface")
        }
        assert (online["interface"], offline["interface"]) == (h.interface, None)
    assert "completions=2" in done.stderr
    assert "with the configuration as it is now" in done.stderr.splitlines()[0], done.stderr
    h.stop()


# --- SIGHUP ----------------------------------------------------------------------------


@live
def test_sighup_reloads_users_and_keeps_running_on_a_broken_file(e2e):
    h = e2e(ports=(PORT, PORT_B), users=[User(7, "alice", ["2222/tcp"])])
    open_and_wait(h, SERVER_V4, PORT)
    h.knock("open", SERVER_V4, f"{PORT_B}/tcp")
    assert h.wait_decision()["reason"] == "not_allowed"

    h.user().allow = ["2222/tcp", "2223/tcp"]
    h.write_config()
    h.send_signal(signal.SIGHUP)
    h.wait_log(r"^reloaded .*: 1 users")
    open_and_wait(h, SERVER_V4, PORT_B)
    assert h.can_connect(SERVER_V4, PORT_B)
    assert h.can_connect(SERVER_V4, PORT), "the reload lost a grant"
    assert len(h.grant_rules()) == 2

    h.config_path.write_text("[knock\nthis is not TOML\n")
    h.send_signal(signal.SIGHUP)
    h.wait_log(r"^reload failed, keeping the running configuration: ")
    h.knock("close", SERVER_V4, f"{PORT_B}/tcp")
    decision = h.wait_decision()
    assert (decision["action"], decision["verdict"]) == ("close", "accepted"), decision
    h.wait_log(r"^firewall: closed 2223/tcp ")
    assert not h.can_connect(SERVER_V4, PORT_B)
    assert h.can_connect(SERVER_V4, PORT)
    assert h.running()
    h.stop()


@live
def test_with_json_every_log_line_is_one_json_object_with_its_time(e2e):
    """`run --json`: the start, decisions, firewall changes (with their grant's fields),
    expiry, reloads (a setting waiting for a restart, a refused file) and the stop line are
    each one JSON object with a time: nothing for a log system to parse out of text."""
    h = e2e(default_timeout=2)
    open_and_wait(h, SERVER_V4)
    h.wait_log(r"^firewall: expired 2222/tcp ", timeout=8)
    h.write_config(default_timeout=2, extra={"knock": {"digit_bits": 10}})
    h.send_signal(signal.SIGHUP)
    h.wait_log(r"^reloaded ")
    h.config_path.write_text("[knock\nthis is not TOML\n")
    h.send_signal(signal.SIGHUP)
    h.wait_log(r"^reload failed, keeping the running configuration: ")
    h.stop()
    entries = [json.loads(line) for line in h.lines]
    for entry in entries:
        assert isinstance(entry, dict) and "time" in entry, entry
        assert iso_seconds(entry["time"]) == pytest.approx(time.time(), abs=60), entry

    def event(name: str, **fields) -> dict:
        return next(e for e in entries if e.get("event") == name and fields.items() <= e.items())

    start = event("start")
    assert (start["version"], start["pid"], start["interfaces"]) == (
        __version__, h.proc.pid, [h.interface])  # fmt: skip
    opened = event("firewall", change="opened")
    assert {k: opened[k] for k in ("port", "proto", "source", "destination", "user")} == {
        "port": PORT, "proto": "tcp", "source": CLIENT_V4, "destination": SERVER_V4,
        "user": "alice"}  # fmt: skip
    assert opened["level"] == "info" and opened["message"].startswith("firewall: opened 2222/tcp")
    assert event("firewall", change="expired", port=PORT)["source"] == CLIENT_V4
    assert event("reload", level="warning")["pending"] == ["knock.digit_bits 8 -> 10"]
    assert event("reload", level="error")["error"].startswith(f"{h.config_path}: ")
    assert event("stop")["counters"]["packets"] > 0
    assert sum("verdict" in e for e in entries) == 1, "the knock's decision"


@live
def test_a_client_with_another_digit_bits_gets_a_hint_in_the_log(e2e):
    """Its digits land in the wrong segments: nothing is judged, but after its second try
    the log says whose knocks keep failing and what to compare (issue 13: nothing at all)."""
    h = e2e(extra={"knock": {"knock_timeout": 1}})
    for _ in range(2):
        h.knock("open", SERVER_V4, f"{PORT}/tcp", "--digit-bits", "10")
    hint = h.wait_log(r"^hint: knocks keep failing", timeout=15)
    # 10-bit ports: segments 0-7 land in the 8-bit range, and segment 8 when its digit < 512.
    assert re.search(
        rf"2 from {re.escape(CLIENT_V4)} on {h.interface} \(timed out with [89] of 34 digits\)",
        hint,
    ), hint
    assert "base_port 20000, digit_bits 8" in hint
    assert h.decisions() == [], "nothing reached the judge"
    entry = next(json.loads(line) for line in h.lines if '"event": "hint"' in line)
    assert entry["level"] == "warning" and entry["sources"][0]["source"] == CLIENT_V4
    open_and_wait(h, SERVER_V4)  # the right layout still opens
    h.stop()


@live
def test_sighup_that_takes_a_port_away_closes_its_grant_in_the_kernel(e2e):
    h = e2e(ports=(PORT, PORT_B), users=[User(7, "alice", ["2222/tcp", "2223/tcp"])])
    open_and_wait(h, SERVER_V4, PORT)
    open_and_wait(h, SERVER_V4, PORT_B)
    h.user().allow = ["2222/tcp"]
    h.write_config()
    h.send_signal(signal.SIGHUP)
    h.wait_log(r"^reload: closing 2223/tcp for \S+ to \S+ \(user alice\) \(port no longer allowed")
    h.wait_log(r"^firewall: closed 2223/tcp ")
    assert not h.can_connect(SERVER_V4, PORT_B)
    assert h.can_connect(SERVER_V4, PORT), "the reload closed a grant still allowed"
    assert len(h.grant_rules()) == 1
    h.stop()


@live
def test_interface_down_and_up_keeps_grants_and_capture(e2e):
    h = e2e()
    open_and_wait(h, SERVER_V4, PORT)
    for state in ("down", "up"):
        subprocess.run(["ip", "-n", h.server, "link", "set", h.interface, state], check=True)
        time.sleep(0.5)
    assert h.running(), "losing the link must not stop the daemon"
    assert len(h.grant_rules()) == 1, "the grant survived the outage"
    h.knock("close", SERVER_V4, f"{PORT}/tcp")
    decision = h.wait_decision()
    assert (decision["action"], decision["verdict"]) == ("close", "accepted"), decision
    h.stop()


@live
def test_interface_deleted_and_recreated_resumes_capture_without_restart(e2e):
    h = e2e()
    open_and_wait(h, SERVER_V4, PORT)
    mark = h.mark()
    h.links[0].delete()
    h.wait_log(r"^capture on .* lost: ", timeout=10, since=mark)
    assert h.running(), "losing the interface must not stop the daemon"
    # The same veth again, as after a driver reload or a re-plugged link.
    h.links[0].add()
    h.wait_log(r"^capture on .* resumed after ", timeout=10, since=mark)
    assert len(h.grant_rules()) == 1, "the grant survived the outage"
    h.knock("close", SERVER_V4, f"{PORT}/tcp")
    decision = h.wait_decision()
    assert (decision["action"], decision["verdict"]) == ("close", "accepted"), decision
    h.wait_log(rf"^firewall: closed {PORT}/tcp ")
    h.stop()


@live
def test_rules_removed_by_hand_never_crash_and_the_chain_is_restored(e2e):
    h = e2e()
    open_and_wait(h, SERVER_V4, PORT)
    # Someone empties our chain by hand (a flush): the daemon's next sweep puts the live
    # grant back, and says so; the close knock then removes it for good.
    mark = h.mark()
    assert h.iptables("-F", "KNOCKD-FAST").returncode == 0
    h.wait_log(r"^firewall: what the grants live in was gone .* re-added 1 live", since=mark)
    assert h.can_connect(SERVER_V4, PORT)
    h.knock("close", SERVER_V4, f"{PORT}/tcp")
    assert h.wait_decision()["verdict"] == "accepted"
    h.wait_log(rf"^firewall: closed {PORT}/tcp ", since=mark)
    # Someone removes the jump and our chain altogether: the sweep (or the next grant,
    # whichever comes first) restores them, and nothing closed comes back.
    mark = h.mark()
    for argv in (["-D", "INPUT", "-j", "KNOCKD-FAST"], ["-X", "KNOCKD-FAST"]):
        assert h.iptables(*argv).returncode == 0
    h.wait_log(r"^firewall: (what the grants live in was gone|open failed)", since=mark)
    assert not h.can_connect(SERVER_V4, PORT)
    open_and_wait(h, SERVER_V4, PORT)
    assert h.can_connect(SERVER_V4, PORT)
    assert "-A INPUT -j KNOCKD-FAST" in h.iptables_rules(4)
    assert h.running()
    h.stop()


@live
def test_a_full_state_directory_degrades_to_memory_and_keeps_serving(e2e):
    h = e2e()
    open_and_wait(h, SERVER_V4, PORT)
    # The disk fills up: every further write of the daemon's files fails (EFBIG).
    limited = subprocess.run(["prlimit", "--pid", str(h.proc.pid), "--fsize=0"])
    assert limited.returncode == 0
    mark = h.mark()
    h.knock("close", SERVER_V4, f"{PORT}/tcp")
    assert h.wait_decision()["verdict"] == "accepted"
    h.wait_log(r"replay cache .*memory", since=mark)
    h.wait_log(rf"^firewall: closed {PORT}/tcp ", since=mark)
    sent = open_and_wait(h, SERVER_V4, PORT)
    assert h.can_connect(SERVER_V4, PORT), "nothing granted is lost"
    # Replays are still refused, from memory.
    h.cursor = h.mark()
    h.send_udp(SERVER_V4, SPA_PORT, bytes.fromhex(sent["message"]))
    assert h.wait_decision()["reason"] == "replay"
    assert h.running()
    h.stop()


@live
def test_a_state_directory_turned_read_only_degrades_to_memory_and_keeps_serving(tmp_path):
    """The file system of the state directory turns read-only under the running daemon
    (as after an I/O error with ``errors=remount-ro``): its open replay cache can no longer
    write. The daemon says so once, goes on from memory, and loses nothing granted."""
    directory = tmp_path / "e2e"
    with contextlib.ExitStack() as stack:
        try:
            # Entered first, so left last: unmounted once the daemon and namespaces are gone.
            volume = stack.enter_context(ext4_volume(directory / "state", tmp_path / "state.img"))
            h = stack.enter_context(doorman(directory, ports=(PORT, PORT_B, PORT_C), start=False))
        except (NetnsUnavailable, VolumeUnavailable) as error:
            pytest.skip(f"cannot set up: {error}")
        h.start()
        close_ports(h)
        assert (volume.path / "replay.sqlite3").is_file(), "the replay cache is on the volume"
        open_and_wait(h, SERVER_V4, PORT_B)  # granted while the state directory is writable
        # A write in the state directory, as the daemon's own mounts see it.
        probe = ["nsenter", "-t", str(h.proc.pid), "-m", "--"]
        probe += ["sh", "-c", f": > {volume.path / 'probe'}"]
        assert subprocess.run(probe, capture_output=True).returncode == 0

        mark = h.mark()
        volume.fail()
        refused = subprocess.run(probe, capture_output=True, text=True)
        assert refused.returncode != 0 and "Read-only file system" in refused.stderr, refused
        sent = open_and_wait(h, SERVER_V4, PORT, "--mode", "syn")
        h.wait_log(
            r"^replay cache \S+/replay\.sqlite3: cannot write: .+; continuing in memory only",
            since=mark,
        )
        assert h.can_connect(SERVER_V4, PORT)
        h.knock("close", SERVER_V4, f"{PORT}/tcp", "--mode", "spa")
        h.wait_log(rf"^firewall: closed {PORT}/tcp ")
        assert not h.can_connect(SERVER_V4, PORT)

        # The same knock's packets again: refused, from memory.
        h.send_syn(SERVER_V4, sent["ports"])
        decision = h.wait_decision()
        assert (decision["verdict"], decision["reason"]) == ("rejected", "replay"), decision
        firewall_caught_up(h, PORT_C)  # a wrongly granted replay would be in the firewall by now
        assert not h.can_connect(SERVER_V4, PORT)
        # The grant made before the file system failed is still there.
        grants = h.grant_rules()
        assert len(grants) == 1 and f"--dport {PORT_B} " in grants[0], grants
        assert h.can_connect(SERVER_V4, PORT_B)
        log = h.log(since=mark)
        assert len(re.findall(r"^replay cache ", log, re.M)) == 1, "warned once:\n" + log
        assert h.running()
        h.stop()


# --- several capture interfaces ----------------------------------------------------------


def knock_via(h, link, action: str, port: int, family: int = 4) -> dict:
    """Knock from the client behind ``link`` to the server's address on it; the decision
    must be accepted, logged as coming through that link's interface, and carried out."""
    target, source = (
        (link.server_v4, link.client_v4)
        if family == 4
        else (
            link.server_v6,
            link.client_v6,
        )
    )
    h.knock(action, target, f"{port}/tcp", family_args(family)[0], ns=link.client)
    decision = h.wait_decision(
        lambda d: (d["source"], d["action"], d["port"]) == (source, action, port)
    )
    assert (decision["verdict"], decision["reason"]) == ("accepted", "ok"), decision
    assert (decision["interface"], decision["destination"]) == (link.server_if, target), decision
    verb = "opened" if action == "open" else "closed"
    h.wait_log(rf"^firewall: {verb} {port}/tcp for {re.escape(source)} ")
    return decision


@live
def test_two_interfaces_a_knock_through_each_opens_the_port_for_its_source(e2e):
    h = e2e(second_link=True)
    a, b = h.links
    assert h.start_line.startswith(
        f"knockd-fast {__version__} on {a.server_if}, {b.server_if} protecting "
    ), h.start_line
    protected = h.start_line.split(" protecting ", 1)[1].split(";", 1)[0].split(", ")
    protected = [address for address in protected if not address.startswith("fe80:")]
    assert sorted(protected) == sorted([a.server_v4, a.server_v6, b.server_v4, b.server_v6]), (
        h.start_line
    )  # the union of both interfaces' addresses (and their link-local ones)
    assert not h.can_connect(a.server_v4, PORT)
    assert not h.can_connect(b.server_v4, PORT, ns=b.client)

    knock_via(h, a, "open", PORT)
    assert h.can_connect(a.server_v4, PORT)
    assert not h.can_connect(b.server_v4, PORT, ns=b.client), "A's grant opened the port for B"
    knock_via(h, b, "open", PORT)
    knock_via(h, b, "open", PORT, family=6)
    assert h.can_connect(b.server_v4, PORT, ns=b.client)
    assert h.can_connect(b.server_v6, PORT, ns=b.client)
    status = h.knockd("status", "-c", str(h.config_path))
    assert status.returncode == 0, status
    for link in (a, b):
        line = f"{link.client_v4} -> {link.server_v4} 2222/tcp user=alice "
        assert line in status.stdout, status.stdout
    assert f"{b.client_v6} -> {b.server_v6} 2222/tcp " in status.stdout, status.stdout

    # Changing the interface list is a restart's business: a reload warns and keeps both.
    h.write_config(interfaces=[a.server_if])
    h.send_signal(signal.SIGHUP)
    h.wait_log(
        r"^reload: these apply at the next restart, it runs as started until then: "
        rf"capture\.interface \[{a.server_if}, {b.server_if}\] -> \[{a.server_if}\]$"
    )
    h.wait_log(r"^reloaded .*: 1 users")
    knock_via(h, b, "close", PORT)
    assert not h.can_connect(b.server_v4, PORT, ns=b.client)
    assert h.can_connect(a.server_v4, PORT)

    h.stop()
    # The stop line sums the counters; one line per interface comes before it.
    per_if = {
        name: line
        for name in (a.server_if, b.server_if)
        for line in [h.wait_log(rf"^stopped capture on {name}: ", 0, since=0)]
    }
    assert " completions=1 " in per_if[a.server_if], per_if
    assert " completions=3 " in per_if[b.server_if], per_if
    assert " completions=4 " in h.wait_log(r"^stopped: ", 0, since=0)


@live
def test_one_link_down_and_up_while_the_other_keeps_working(e2e):
    h = e2e(second_link=True, ports=(PORT, PORT_B))
    a, b = h.links
    knock_via(h, a, "open", PORT)
    a.set("down")
    knock_via(h, b, "open", PORT)  # the other link captures on
    assert h.can_connect(b.server_v4, PORT, ns=b.client)
    a.set("up")
    assert h.can_connect(a.server_v4, PORT), "A's grant survived its link going down"
    knock_via(h, a, "open", PORT_B)  # the link that came back captures again
    assert h.can_connect(a.server_v4, PORT_B)
    knock_via(h, b, "close", PORT)
    assert not h.can_connect(b.server_v4, PORT, ns=b.client)
    assert h.can_connect(a.server_v4, PORT)
    assert h.running()
    assert " lost: " not in h.log(), "a link that is only down is no lost capture"
    h.stop()


@live
def test_one_interface_lost_and_back_while_the_other_keeps_capturing(e2e):
    h = e2e(second_link=True)
    a, b = h.links
    knock_via(h, a, "open", PORT)
    mark = h.mark()
    a.delete()
    h.wait_log(rf"^capture on {a.server_if} lost: .*; reopening every 1 s, grants kept$")
    knock_via(h, b, "open", PORT)  # while A is gone
    assert h.can_connect(b.server_v4, PORT, ns=b.client)
    a.add()  # the same veth again, as after a driver reload or a re-plugged link
    h.wait_log(rf"^capture on {a.server_if} resumed after \d+\.\d s$", timeout=10, since=mark)
    assert not re.search(rf"^capture on {b.server_if} ", h.log(), re.M), "B was never lost"
    assert len(h.grant_rules()) == 2, "the grants survived the outage"
    assert h.can_connect(a.server_v4, PORT)
    knock_via(h, a, "close", PORT)  # A captures again, with a fresh handle
    assert not h.can_connect(a.server_v4, PORT)
    assert h.can_connect(b.server_v4, PORT, ns=b.client)
    h.stop()


# --- interface = "any" --------------------------------------------------------------------

LINKTYPE_OF_ANY = """
from knock_client.protocol import KnockLayout
from knockd_fast._capture import CaptureEngine
engine = CaptureEngine(KnockLayout(), capacity=16)
engine.open_live("any", buffer_bytes=1 << 20)
print(engine.linktype)
engine.close()
"""


@live
# Every mode and both families through the cooked header (the rest of the path is the same
# as on Ethernet, which test_open_then_close covers in full).
@pytest.mark.parametrize("mode,family", [("syn", 4), ("syn", 6), ("udp", 6), ("spa", 4)])
def test_interface_any_acts_on_a_knock_through_the_cooked_link_type(e2e, mode, family):
    h = e2e(capture="any")
    assert h.start_line.startswith(f"knockd-fast {__version__} on any protecting "), h.start_line
    protected = h.start_line.split(" protecting ", 1)[1].split(";", 1)[0].split(", ")
    protected = [address for address in protected if not address.startswith("fe80:")]
    # Every address of the namespace, the loopback's included (docs/admin.md section 4).
    assert sorted(protected) == sorted(["127.0.0.1", "::1", SERVER_V4, SERVER_V6]), h.start_line
    # "any" is a cooked capture: the engine reads LINUX_SLL (113; Debian 12's libpcap 1.10
    # hands it out by default) or LINUX_SLL2 (276) headers, not Ethernet ones.
    linktype = ns_run(h.server, [sys.executable, "-c", LINKTYPE_OF_ANY])
    assert linktype.stdout.strip() in ("113", "276"), linktype

    target, source = server_address(family), client_address(family)
    assert not h.can_connect(target, PORT), "the DROP rule does not hold before any knock"
    open_and_wait(h, target, PORT, "--mode", mode, *family_args(family))
    decision = h.decisions()[-1]
    assert (decision["source"], decision["destination"]) == (source, target), decision
    assert decision["interface"] == "any", decision
    assert h.can_connect(target, PORT)
    assert not h.can_connect(target, PORT, source=other_address(family)), "for that source only"

    h.knock("close", target, f"{PORT}/tcp", "--mode", mode, *family_args(family))
    decision = h.wait_decision(accepted("close"))
    assert (decision["verdict"], decision["reason"]) == ("accepted", "ok"), decision
    h.wait_log(rf"^firewall: closed {PORT}/tcp for {re.escape(source)} ")
    assert not h.can_connect(target, PORT)
    assert h.grant_rules() == []
    h.stop()
    # Each knock judged once: no copy of its packets seen on a second interface.
    judged = [(d["action"], d["verdict"], d["reason"]) for d in h.decisions()]
    assert judged == [("open", "accepted", "ok"), ("close", "accepted", "ok")], judged
    assert " completions=2 " in h.wait_log(r"^stopped: ", 0, since=0)


# --- the xtables lock held by another process --------------------------------------------

BUSY = r"xtables lock held by another process \(waited 1 s\)"
ADD_GRANT = r"iptables: add grant 192\.0\.2\.2 -> 192\.0\.2\.1 2222/tcp: "


@live
def test_xtables_lock_held_during_a_knock_delays_the_grant_until_released(e2e):
    h = e2e()
    mark = h.mark()
    holder = h.hold_lock()
    h.knock("open", SERVER_V4, f"{PORT}/tcp")
    decision = h.wait_decision(accepted("open"))
    assert (decision["verdict"], decision["reason"]) == ("accepted", "ok"), decision
    h.wait_log(rf"^firewall: open failed \({ADD_GRANT}{BUSY}\); retrying in 0\.1 s$")
    # Nothing is granted while the lock is held, and nobody claims otherwise.
    assert h.grant_rules() == []
    status = status_grants(h)
    assert status == ["no live grants"], status
    released = h.mark()
    holder.release()
    h.wait_log(
        r"^firewall: opened 2222/tcp for 192\.0\.2\.2 to 192\.0\.2\.1 ", timeout=10, since=released
    )
    assert h.can_connect(SERVER_V4, PORT)
    log = h.log(since=mark)
    # However long the lock was held, the retries follow the documented pauses, and the
    # grant came with one of them, before the last attempt.
    retries = re.findall(r"^firewall: open failed \(.*; retrying in (\S+) s$", log, re.M)
    assert 1 <= len(retries) <= 3 and retries == ["0.1", "0.5", "2.0"][: len(retries)], log
    assert "failed after" not in log and "cannot restore" not in log, log
    assert h.running()
    # Later knocks work as usual.
    h.knock("close", SERVER_V4, f"{PORT}/tcp")
    h.wait_log(r"^firewall: closed 2222/tcp ")
    assert not h.can_connect(SERVER_V4, PORT)
    open_and_wait(h, SERVER_V4, PORT)
    assert h.can_connect(SERVER_V4, PORT)
    h.stop()


@live
def test_xtables_lock_held_past_every_retry_fails_cleanly_and_knocks_work_after(e2e):
    h = e2e(ports=(PORT, PORT_B))
    open_and_wait(h, SERVER_V4, PORT_B)  # a grant made before the lock is taken
    mark = h.mark()
    holder = h.hold_lock()
    h.knock("open", SERVER_V4, f"{PORT}/tcp")
    assert h.wait_decision(accepted("open"))["verdict"] == "accepted"
    failed = h.wait_log(r"^firewall: open failed after 4 attempts: ", timeout=15)
    assert holder.proc.poll() is None, "the lock was held all along"
    assert re.search(
        rf"after 4 attempts: {ADD_GRANT}{BUSY}; "
        r"not granted: 2222/tcp for 192\.0\.2\.2 to 192\.0\.2\.1 \(user alice\)$",
        failed,
    ), failed
    h.wait_log(r"^firewall: view reconciled from the firewall: 1 live grants$", since=mark)
    log = h.log(since=mark)
    retries = re.findall(r"^firewall: open failed \(.*; retrying in (\S+) s$", log, re.M)
    assert retries == ["0.1", "0.5", "2.0"], log
    assert BUSY.replace("\\", "") in log and "cannot restore" not in log, log
    assert h.running(), "a failed firewall change must not stop the daemon"
    # No phantom grant: the firewall, `status` and reachability agree, lock still held.
    rules = h.grant_rules()
    assert len(rules) == 1 and "--dport 2223 " in rules[0], rules
    status = status_grants(h)
    assert len(status) == 1 and " 2223/tcp user=alice " in status[0], status
    assert not h.can_connect(SERVER_V4, PORT)
    assert h.can_connect(SERVER_V4, PORT_B)

    holder.release()
    open_and_wait(h, SERVER_V4, PORT)  # a fresh knock (the failed one's message is spent)
    assert h.can_connect(SERVER_V4, PORT)
    assert len(h.grant_rules()) == 2
    h.knock("close", SERVER_V4, f"{PORT_B}/tcp")
    h.wait_log(r"^firewall: closed 2223/tcp ")
    assert not h.can_connect(SERVER_V4, PORT_B)
    h.stop()
