"""sd_notify, as systemd hears it: a real AF_UNIX datagram socket stands in for systemd's.

The unit tests drive ``knockd_fast.sdnotify`` against a real socket (path and abstract);
the live ones start the real ``knockd-fast run`` in namespaces (tests/e2e.py) with
``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` set, and read what it sends, with the sender's
credentials as systemd reads them (``NotifyAccess=main`` accepts only the main process).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e import SERVER_V4

from knockd_fast.sdnotify import ServiceNotifier, socket_address, watchdog_period


def live(test):
    """Needs namespaces and the Cython engine (live capture)."""
    return pytest.mark.netns(pytest.mark.extension(test))


WATCHDOG_USEC = 2_000_000  # systemd would kill after 2 s without WATCHDOG=1
PING_EVERY = WATCHDOG_USEC / 2e6


@dataclass(frozen=True)
class Notification:
    fields: dict[str, str]
    pid: int  # the sender's process, from SCM_CREDENTIALS as systemd reads it
    at: float  # time.monotonic() on arrival


class NotifySocket:
    """systemd's end: a bound AF_UNIX datagram socket collecting every notification."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.received: list[Notification] = []

    def _receive(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        size = socket.CMSG_SPACE(struct.calcsize("3i"))
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, size)
        except TimeoutError:
            return False
        pid = next(
            struct.unpack("3i", cdata)[0]
            for level, kind, cdata in ancillary
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
        )
        fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
        self.received.append(Notification(fields, pid, time.monotonic()))
        return True

    def wait(
        self, predicate: Callable[[Notification], bool], timeout: float = 10.0, since: int = 0
    ) -> Notification:
        """The first notification from index ``since`` that ``predicate`` accepts."""
        deadline = time.monotonic() + timeout
        checked = since
        while True:
            for note in self.received[checked:]:
                if predicate(note):
                    return note
            checked = len(self.received)
            left = deadline - time.monotonic()
            if not self._receive(left) and left <= 0:  # (what is queued is read first)
                raise AssertionError(f"no such notification in {timeout} s: {self.received}")

    def collect(self, seconds: float) -> None:
        """Everything that arrives in the next ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._receive(left)

    def pings(self, since: int = 0) -> list[Notification]:
        return [n for n in self.received[since:] if n.fields.get("WATCHDOG") == "1"]

    def close(self) -> None:
        self.sock.close()


def has(key: str, value: str = "1") -> Callable[[Notification], bool]:
    return lambda note: note.fields.get(key) == value


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


# --- the variables ----------------------------------------------------------------------


def test_socket_address_forms():
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@knockd/notify") == "\0knockd/notify"  # abstract: a leading NUL
    assert socket_address(None) is None
    assert socket_address("") is None
    with pytest.raises(ValueError, match="neither a path nor an abstract name"):
        socket_address("vsock:2:1234")
    with pytest.raises(ValueError):
        socket_address("@")  # an abstract name with no name
    with pytest.raises(ValueError):
        socket_address("relative/notify")


def test_watchdog_period_is_half_the_timeout_for_our_pid_only():
    assert watchdog_period("30000000", "4242", 4242) == 15.0
    assert watchdog_period("30000000", None, 4242) == 15.0  # no WATCHDOG_PID: ours
    assert watchdog_period("30000000", "1", 4242) is None  # inherited: another process's
    assert watchdog_period(None, "4242", 4242) is None
    assert watchdog_period("0", None, 4242) is None
    assert watchdog_period("-5", None, 4242) is None
    assert watchdog_period("soon", None, 4242) is None
    assert watchdog_period("30000000", "init", 4242) is None


def test_from_environment_takes_the_variables_out(notify_socket):
    environ = {
        "NOTIFY_SOCKET": notify_socket.address,
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid()),
        "PATH": "/usr/bin",
    }
    notifier = ServiceNotifier.from_environment(environ)
    assert environ == {"PATH": "/usr/bin"}  # the programs the daemon runs do not notify
    assert (notifier.address, notifier.watchdog_every) == (notify_socket.address, 15.0)
    notifier.close()


def test_watchdog_pid_of_another_process_disables_only_the_watchdog(notify_socket):
    environ = {
        "NOTIFY_SOCKET": notify_socket.address,
        "WATCHDOG_USEC": "1000",
        "WATCHDOG_PID": str(os.getpid() + 1),
    }
    notifier = ServiceNotifier.from_environment(environ)
    notifier.ready("up")
    notifier.turn()
    notifier.notify("STATUS=sentinel")
    notifier.close()
    notify_socket.wait(has("STATUS", "sentinel"), 5)
    assert [n.fields for n in notify_socket.received] == [
        {"READY": "1", "STATUS": "up"},
        {"STATUS": "sentinel"},
    ]


def test_unset_notify_socket_is_a_silent_no_op(caplog):
    notifier = ServiceNotifier.from_environment({"WATCHDOG_USEC": "1000"})
    assert not notifier.enabled and notifier.watchdog_every is None
    with caplog.at_level(logging.DEBUG, logger="knockd_fast"):
        notifier.ready("up")
        notifier.turn()
        with notifier.reloading():
            pass
        notifier.stopping()
    assert notifier._socket is None and not caplog.records


# --- the datagrams ----------------------------------------------------------------------


def test_abstract_socket_gets_ready_with_a_one_line_status():
    name = f"knockd-fast-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = NotifySocket("\0" + name)
    try:
        notifier = ServiceNotifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        notifier.ready("capturing on eth0,\n  iptables backend")
        note = listener.wait(has("READY"), 5)
        notifier.close()
    finally:
        listener.close()
    assert note.fields == {"READY": "1", "STATUS": "capturing on eth0, iptables backend"}
    assert note.pid == os.getpid()


def test_watchdog_pings_at_most_every_half_timeout(notify_socket):
    now = [100.0]
    notifier = ServiceNotifier(notify_socket.address, 15.0, clock=lambda: now[0])
    sent_at = []
    for moment in (100.0, 100.2, 114.9, 115.0, 115.1, 129.9, 130.5, 131.0):
        now[0] = moment
        before = len(notify_socket.received)
        notifier.turn()
        notify_socket.collect(0.02)
        if len(notify_socket.received) > before:
            sent_at.append(moment)
    notifier.close()
    assert sent_at == [100.0, 115.0, 130.5]  # the first turn at once, then every 15 s or more
    assert all(n.fields == {"WATCHDOG": "1"} for n in notify_socket.received)


def test_reloading_brackets_the_reload_even_when_it_fails(notify_socket):
    notifier = ServiceNotifier(notify_socket.address)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    with pytest.raises(RuntimeError), notifier.reloading():
        raise RuntimeError("a broken reload")
    notifier.stopping()
    notifier.close()
    notify_socket.wait(has("STOPPING"), 5)
    reloading, ready, stopping = (n.fields for n in notify_socket.received)
    assert reloading["RELOADING"] == "1"
    assert (
        before
        <= int(reloading["MONOTONIC_USEC"])
        <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    )
    assert ready == {"READY": "1"}
    assert stopping == {"STOPPING": "1", "STATUS": "stopping"}


def test_send_failure_is_logged_once_and_never_raised(tmp_path, caplog):
    notifier = ServiceNotifier(str(tmp_path / "no-such-socket"), 0.0)
    with caplog.at_level(logging.WARNING, logger="knockd_fast"):
        notifier.ready("up")
        for _ in range(3):
            notifier.turn()
        notifier.stopping()
    notifier.close()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("cannot notify systemd (READY=1): No such file or directory")


# --- the real daemon --------------------------------------------------------------------


@pytest.fixture
def under_systemd(monkeypatch, notify_socket):
    """The daemon's environment as systemd sets it under ``Type=notify`` and ``WatchdogSec``
    (WATCHDOG_PID left out: systemd knows the pid it forked, the harness does not)."""
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    return notify_socket


@live
def test_ready_watchdog_reload_stop(e2e, under_systemd):
    notes = under_systemd
    h = e2e()
    ready = notes.wait(has("READY"))
    assert ready.pid == h.proc.pid  # the main process: what NotifyAccess=main accepts
    assert ready.fields["STATUS"] == f"capturing on {h.interface}, iptables backend"
    # Ready means serving: a knock is judged and granted.
    h.knock("open", SERVER_V4, "2222/tcp")
    h.wait_log(r"^firewall: opened 2222/tcp for ")
    assert h.can_connect(SERVER_V4, 2222)

    notes.collect(0.05)  # what queued up meanwhile: arrival times are only read times
    mark = len(notes.received)
    notes.collect(3 * PING_EVERY + 0.5)
    pings = notes.pings(mark)
    assert len(pings) >= 3, notes.received
    assert all(p.pid == h.proc.pid for p in pings)
    gaps = [b.at - a.at for a, b in zip(pings, pings[1:], strict=False)]
    # Never more often than half the timeout (a little slack for the socket's delivery),
    # always well inside the timeout itself: systemd would never have fired.
    assert min(gaps) >= PING_EVERY - 0.05, gaps
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps

    mark = len(notes.received)
    h.send_signal(signal.SIGHUP)
    reloading = notes.wait(has("RELOADING"), since=mark)
    reloaded = notes.wait(has("READY"), since=notes.received.index(reloading))
    assert int(reloading.fields["MONOTONIC_USEC"]) > 0 and reloaded.at >= reloading.at
    h.wait_log(r"^reloaded ")

    mark = len(notes.received)
    h.stop()  # SIGTERM; exit status 0 and the stopped: line
    stopping = notes.wait(has("STOPPING"), 0, since=mark)
    assert stopping.pid == h.proc.pid
    assert not notes.pings(notes.received.index(stopping))


@live
def test_a_stuck_loop_starves_the_watchdog_and_its_abort_shows_where(e2e, under_systemd):
    """The loop blocks (a reload opening a config file that is now a FIFO nobody writes):
    its firewall thread lives on, yet the pings stop, so systemd would kill it; systemd's
    SIGABRT then prints each thread's Python stack, naming the call that hung."""
    notes = under_systemd
    h = e2e()
    notes.wait(has("READY"))
    notes.wait(lambda n: len(notes.pings()) >= 2)
    text = h.config_path.read_text()
    h.config_path.unlink()
    os.mkfifo(h.config_path, 0o600)
    h.send_signal(signal.SIGHUP)
    reloading = notes.wait(has("RELOADING"))
    notes.collect(3 * PING_EVERY)
    assert not notes.pings(notes.received.index(reloading)), notes.received
    assert h.running()
    assert len(os.listdir(f"/proc/{h.proc.pid}/task")) > 1  # the firewall thread is there

    h.proc.send_signal(signal.SIGABRT)  # what WatchdogSignal= sends by default
    assert h.proc.wait(10) == -signal.SIGABRT
    h.wait_log(r"^Fatal Python error: Aborted", 5, since=0)
    stack = h.log()
    assert "in load_config" in stack and "in reload" in stack, stack
    h.config_path.unlink()
    h.config_path.write_text(text)


@live
def test_watchdog_for_another_pid_is_not_fed(e2e, under_systemd, monkeypatch):
    """WATCHDOG_PID naming another process (inherited variables): READY=1, no pings."""
    monkeypatch.setenv("WATCHDOG_PID", "1")
    notes = under_systemd
    h = e2e()
    notes.wait(has("READY"))
    notes.collect(2 * PING_EVERY)
    assert not notes.pings(), notes.received
    h.stop()
    notes.wait(has("STOPPING"), 0)
