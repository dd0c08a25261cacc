"""End-to-end harness: the real daemon, the real client, real iptables, in namespaces.

A helper module, not a test file. ``doorman(...)`` builds two hosts (``netns.two_hosts``;
every namespace, veth and address here comes from tests/netns.py),
writes a configuration, starts ``knockd-fast run --json`` in the server namespace, closes
the protected ports with DROP rules (iptables-legacy and ip6tables-legacy: the same
xtables family as the daemon's grants, GUIDE section 5), starts real echo listeners on
them (IPv4 and IPv6) and yields a ``Harness`` with the helpers the tests use. Everything
is torn down on the way out, also when a test fails: the daemon and the helpers are
killed, the namespaces deleted (the veth pairs go with them).

The client namespace has a second address on the same link, ``OTHER_V4`` /
``OTHER_V6``: "another host" in the spoofing scenario sends from it. With
``second_link=True`` the server gets a second interface: a veth to a third namespace
(``Harness.client2``, 198.51.100.2 / 2001:db8:1::2 facing 198.51.100.1 / 2001:db8:1::1),
and the daemon captures on both (``capture.interface`` is then a list). ``capture="any"``
configures ``capture.interface = "any"`` instead of the links' interfaces: the daemon then
captures on every interface of the server namespace, loopback included, with a cooked
link type (LINUX_SLL from Debian 12's libpcap; LINUX_SLL2 from others).

The xtables lock: the daemon and every iptables command the harness runs that changes
something use a lock file in the test's directory (``Harness.lock_path``, through
``$XTABLES_LOCKFILE``), never the machine's ``/run/xtables.lock``; ``hold_lock()`` takes
it from another process. Listing rules (``iptables_rules``) needs no lock, so it uses yet
another private lock file and works while a test holds the daemon's.

Run as a script, this file is the packet tool the tests start inside a namespace::

    python tests/e2e.py serve PORT...                      echo listeners, v4 and v6
    python tests/e2e.py connect HOST PORT [--source A]     exit 0 iff a TCP connect works
    python tests/e2e.py udp HOST PORT HEX [--source A]     one datagram with that payload
    python tests/e2e.py syn HOST PORT... [--source A]      one bare SYN per port
    python tests/e2e.py session HOST PORT                  a held connection (see Session)
    python tests/e2e.py lock FILE                          flock FILE until stdin closes
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import netns
from netns import CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, End

from knockd_fast import __version__
from knockd_fast.decisions import JSON_KEYS
from knockd_fast.firewall.registry import KINDS

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
OTHER_V4, OTHER_V6 = "192.0.2.3", "2001:db8::3"  # "another host" on the client's link
# The second link (second_link=True): server and client2 addresses.
SERVER2_V4, CLIENT2_V4 = "198.51.100.1", "198.51.100.2"
SERVER2_V6, CLIENT2_V6 = "2001:db8:1::1", "2001:db8:1::2"
CONNECT_TIMEOUT = 1.5
START_TIMEOUT = 20.0
# The keys of a decision's JSON line, the live log's and `knockd-fast replay --json`'s.
DECISION_KEYS = JSON_KEYS


def server_address(family: int) -> str:
    return SERVER_V4 if family == 4 else SERVER_V6


def client_address(family: int) -> str:
    return CLIENT_V4 if family == 4 else CLIENT_V6


def other_address(family: int) -> str:
    return OTHER_V4 if family == 4 else OTHER_V6


def _console_script(name: str, module: str, marker: bytes) -> list[str]:
    """The venv's console script ``name`` if it is ours, else ``python -m module``."""
    for candidate in (Path(sys.executable).with_name(name), shutil.which(name)):
        if candidate and Path(candidate).is_file():
            with open(candidate, "rb") as script:
                if marker in script.read(4096):
                    return [str(candidate)]
    return [sys.executable, "-m", module]


def knockd_command() -> list[str]:
    return _console_script("knockd-fast", "knockd_fast.cli", b"knockd_fast")


def knock_command() -> list[str]:
    # Debian's knockd package ships an unrelated /usr/bin/knock (a C binary).
    return _console_script("knock", "knock_client.cli", b"knock_client")


def write_key(path: Path, nbytes: int = 64, mode: int = 0o600) -> bytes:
    """A random key of ``nbytes`` as one base64 line in a new file of ``mode``."""
    key = secrets.token_bytes(nbytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.b64encode(key).decode() + "\n")
    os.chmod(path, mode)
    return key


# --- configuration ---------------------------------------------------------------------


@dataclass
class User:
    id: int
    name: str
    allow: list[str]
    source: str | int | dict[str, int] = "exact"
    key_file: Path | None = None  # written by the harness when None
    key: bytes = field(default=b"", repr=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def render_config(
    interface: str | Sequence[str],
    state_dir: Path,
    users: Sequence[User],
    *,
    window: int = 30,
    default_timeout: int = 300,
    max_timeout: int = 3600,
    modes: Sequence[str] = ("syn", "udp", "spa"),
    extra: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The text of a daemon configuration; ``extra`` adds keys per table (tests of typos)."""
    tables: dict[str, dict[str, Any]] = {
        "knock": {"modes": list(modes), "window": window},
        "capture": {"interface": interface if isinstance(interface, str) else list(interface)},
        "grants": {"default_timeout": default_timeout, "max_timeout": max_timeout},
        "state": {"directory": state_dir},
    }
    for table, keys in (extra or {}).items():
        tables.setdefault(table, {}).update(keys)
    lines = []
    for table, keys in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in keys.items()]
        lines.append("")
    for user in users:
        lines.append("[[users]]")
        for key in ("id", "name", "key_file", "allow", "source"):
            lines.append(f"{key} = {_toml_value(getattr(user, key))}")
        lines.append("")
    return "\n".join(lines)


# --- commands in a namespace -----------------------------------------------------------


def ns_run(ns: str, argv: Sequence[str], timeout: float = 30, **kwargs: Any):
    """``ip netns exec ns argv`` with text output captured; no check."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def tool(ns: str, *args: Any, timeout: float = 30) -> subprocess.CompletedProcess:
    """This file as the packet tool inside ``ns``."""
    return ns_run(ns, [sys.executable, str(HERE), *args], timeout=timeout)


class Session:
    """A TCP connection held open from the client namespace to an echo listener.

    ``alive()`` sends one line over the same connection and is True iff it comes back.
    """

    def __init__(self, ns: str, host: str, port: int):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(HERE), "session", host, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if self._readline(CONNECT_TIMEOUT + 5) != "connected":
            self.close()
            raise RuntimeError(f"session to {host} port {port} did not connect")

    def _readline(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else ""

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        self.proc.stdin.write("ping\n")
        self.proc.stdin.flush()
        return self._readline(10) == "ok"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


# --- the harness -----------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One veth between the server and a client namespace, with its addresses."""

    server_if: str
    client: str  # the client namespace
    client_if: str
    server_v4: str
    client_v4: str
    server_v6: str
    client_v6: str
    server: str  # the server namespace

    def add(self) -> None:
        """Create the veth pair with its addresses, both ends up (IPv6 without DAD)."""
        netns.veth_link(
            End(self.server, self.server_if, (f"{self.server_v4}/24", f"{self.server_v6}/64")),
            End(self.client, self.client_if, (f"{self.client_v4}/24", f"{self.client_v6}/64")),
        )

    def delete(self) -> None:
        """Delete the veth pair (both ends), as a driver reload or an unplugged link does."""
        netns.delete_link(self.server, self.server_if)

    def set(self, state: str) -> None:
        """``ip link set`` the server's end down or up (the link stays, its state changes)."""
        netns.set_link(self.server, self.server_if, state)
        if state == "up":
            self.wait_up()

    def wait_up(self, timeout: float = 5.0) -> None:
        """Until both ends report carrier (a packet sent before is lost)."""
        netns.wait_carrier(((self.server, self.server_if), (self.client, self.client_if)), timeout)


class LockHolder:
    """Another process holding the xtables lock file (flock) until ``release()``."""

    def __init__(self, path: Path):
        self.path = path
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "lock", str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        line = self.proc.stdout.readline().strip() if ready else ""
        if line != "held":
            self.proc.kill()
            raise RuntimeError(f"could not take the lock {path}: {self.proc.communicate()}")
        self.held_at = time.monotonic()

    def release(self) -> float:
        """Let go of the lock (the holder exits); returns how long it was held."""
        # EOF on its stdin: the holder exits, closing (so unlocking) the file.
        self.proc.communicate(timeout=5)
        return time.monotonic() - self.held_at


class DaemonFailed(AssertionError):
    """The daemon did not do what the harness waited for; the message holds its log."""


@dataclass
class Harness:
    server: str
    client: str
    interface: str  # the first capture interface (the link to ``client``)
    directory: Path
    config_path: Path
    users: list[User]
    ports: tuple[int, ...]
    links: list[Link] = field(default_factory=list)  # links[0] to client, links[1] to client2
    capture: tuple[str, ...] = ()  # ``capture.interface`` when not the links' ("any")
    lines: list[str] = field(default_factory=list)  # the daemon's stderr, across restarts
    cursor: int = 0  # where wait_* start by default: the line count before the last action
    proc: subprocess.Popen | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None
    _helpers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def interfaces(self) -> list[str]:
        """The capture interfaces, in the order of the config (``["any"]`` for "any")."""
        return list(self.capture) or [link.server_if for link in self.links]

    @property
    def client2(self) -> str:
        """The namespace behind the second link (``second_link=True``)."""
        return self.links[1].client

    @property
    def lock_path(self) -> Path:
        """The xtables lock file the daemon (and the harness's iptables changes) use."""
        return self.directory / "xtables.lock"

    @property
    def env(self) -> dict[str, str]:
        """The environment of the daemon and of iptables commands that change rules."""
        return dict(os.environ, XTABLES_LOCKFILE=str(self.lock_path))

    # -- the daemon --

    def start(self) -> None:
        """Start ``knockd-fast run --json`` in the server namespace; wait for its start line."""
        assert self.proc is None or self.proc.poll() is not None, "the daemon is running"
        since = self.mark()
        argv = ["ip", "netns", "exec", self.server, *knockd_command()]
        argv += ["run", "-c", str(self.config_path), "--json"]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        self.start_line = self.wait_log(
            rf"^knockd-fast {re.escape(__version__)} on {re.escape(', '.join(self.interfaces))} ",
            START_TIMEOUT,
            since=since,
        )

    def hold_lock(self) -> LockHolder:
        """Take the daemon's xtables lock from another process (released at teardown)."""
        holder = LockHolder(self.lock_path)
        self._helpers.append(holder.proc)
        return holder

    def _read(self, proc: subprocess.Popen) -> None:
        for raw in proc.stderr:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM; the daemon must exit 0 within 10 s and log its ``stopped:`` line."""
        assert self.running(), "the daemon is not running"
        since = self.mark()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise DaemonFailed("no exit within 10 s of SIGTERM\n" + self.log()) from None
        self._reader.join(5)
        if code != 0:
            raise DaemonFailed(f"exit status {code} after SIGTERM\n" + self.log())
        self.wait_log(r"^stopped: ", 0, since=since)

    def kill9(self) -> None:
        assert self.running(), "the daemon is not running"
        self.proc.kill()
        self.proc.wait()
        self._reader.join(5)

    def restart(self) -> None:
        if self.running():
            self.stop()
        self.start()

    def send_signal(self, signum: int) -> None:
        self.cursor = self.mark()
        self.proc.send_signal(signum)

    # -- the log --

    def mark(self) -> int:
        with self._changed:
            return len(self.lines)

    def log(self, since: int = 0) -> str:
        """The log from line ``since`` as text: each JSON line's ``message`` (the daemon runs
        with ``--json``: every line is a JSON object), decision lines as they are."""
        with self._changed:
            return "\n".join(map(log_text, self.lines[since:]))

    def _wait(self, find: Callable[[str], Any], timeout: float, since: int | None, what: str):
        start = self.cursor if since is None else since
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    found = find(line)
                    if found is not None:
                        return found
                start = len(self.lines)
                finished = self._reader is None or not self._reader.is_alive()  # log complete
                left = deadline - time.monotonic()
                if left <= 0 or finished:
                    state = "running" if self.running() else f"exited {self.proc.returncode}"
                    raise DaemonFailed(
                        f"no {what} within {timeout} s (daemon {state}); log:\n{self.log()}"
                    )
                self._changed.wait(min(left, 0.5))

    def wait_log(self, pattern: str, timeout: float = 5.0, since: int | None = None) -> str:
        """The text (``log_text``) of the first log line from ``since`` (default: the last
        action) that ``pattern`` matches."""
        regex = re.compile(pattern)

        def find(line: str) -> str | None:
            text = log_text(line)
            return text if regex.search(text) else None

        return self._wait(
            find,
            timeout,
            since,
            f"log line matching {pattern!r}",
        )

    def decisions(self, since: int = 0) -> list[dict[str, Any]]:
        with self._changed:
            lines = self.lines[since:]
        return [found for found in map(_decision, lines) if found is not None]

    def wait_decision(
        self,
        predicate: Callable[[dict[str, Any]], bool] = lambda decision: True,
        timeout: float = 5.0,
        since: int | None = None,
    ) -> dict[str, Any]:
        """The first JSON decision from ``since`` (default: the last action) for which
        ``predicate`` holds."""

        def find(line: str) -> dict[str, Any] | None:
            decision = _decision(line)
            return decision if decision is not None and predicate(decision) else None

        return self._wait(find, timeout, since, "matching decision")

    # -- the client side --

    def user(self, name: str | None = None) -> User:
        return self.users[0] if name is None else next(u for u in self.users if u.name == name)

    def knock(
        self,
        action: str,
        target: str,
        port_spec: str,
        *extra: str,
        ns: str | None = None,
        user: str | None = None,
        user_id: int | None = None,
        key_file: Path | None = None,
    ) -> dict[str, Any]:
        """Run ``knock ACTION TARGET PORT --json ...`` in the client namespace; its JSON."""
        account = self.user(user)
        argv = [*knock_command(), action, target, port_spec, "--json"]
        argv += ["--user", str(account.id if user_id is None else user_id)]
        argv += ["--key-file", str(key_file or account.key_file), *extra]
        env = dict(
            os.environ,
            HOME=str(self.directory / "home"),
            XDG_CONFIG_HOME=str(self.directory / "home" / ".config"),
        )
        self.cursor = self.mark()
        done = ns_run(ns or self.client, argv, env=env)
        assert done.returncode == 0, f"knock {action} failed: {done.stderr.strip()}"
        return json.loads(done.stdout)

    def send_udp(self, target: str, port: int, payload: bytes, *, source=None, ns=None) -> None:
        """One datagram with ``payload`` from the client namespace (from ``source``)."""
        args = ["udp", target, port, payload.hex()] + (["--source", source] if source else [])
        self.cursor = self.mark()
        done = tool(ns or self.client, *args)
        assert done.returncode == 0, done.stderr

    def send_syn(
        self, target: str, ports: Sequence[int], *, source=None, ns=None, sport=0, spray=False
    ) -> None:
        """One SYN per port (non-blocking connect, closed at once) from the client side, all
        from one source port (``sport``, else the kernel's choice), or with ``spray`` each
        from its own."""
        args = ["syn", target, *ports] + (["--source", source] if source else [])
        args += ["--sport", sport] + (["--spray"] if spray else [])
        self.cursor = self.mark()
        done = tool(ns or self.client, *args)
        assert done.returncode == 0, done.stderr

    def can_connect(self, target: str, port: int, *, source=None, ns=None) -> bool:
        """A real TCP connect (and one echoed line) within CONNECT_TIMEOUT seconds."""
        args = ["connect", target, port] + (["--source", source] if source else [])
        done = tool(ns or self.client, *args, "--timeout", CONNECT_TIMEOUT)
        assert done.returncode in (0, 1), done.stderr
        return done.returncode == 0

    def session(self, target: str, port: int) -> Session:
        held = Session(self.client, target, port)
        self._helpers.append(held.proc)
        return held

    # -- the server side --

    def iptables_rules(self, family: int | None = None) -> list[str]:
        """``iptables-legacy -S`` then ``ip6tables-legacy -S`` in the server namespace
        (or only the one of ``family``). Reading needs no lock (the kernel hands out a
        consistent copy): a private lock file lets this work while ``hold_lock()`` holds
        the daemon's."""
        env = dict(os.environ, XTABLES_LOCKFILE=str(self.directory / "reader.lock"))
        rules = []
        for command in {4: ["iptables-legacy"], 6: ["ip6tables-legacy"]}.get(
            family, ["iptables-legacy", "ip6tables-legacy"]
        ):
            done = ns_run(self.server, [command, "-S"], env=env)
            assert done.returncode == 0, done.stderr
            rules += done.stdout.splitlines()
        return rules

    def iptables(self, *args: Any, family: int = 4) -> subprocess.CompletedProcess:
        """``iptables-legacy ARGS`` (``ip6tables-legacy`` for family 6) in the server
        namespace, under the daemon's xtables lock file; no check."""
        command = "iptables-legacy" if family == 4 else "ip6tables-legacy"
        return ns_run(self.server, [command, *args], env=self.env)

    def grant_rules(self) -> list[str]:
        return [rule for rule in self.iptables_rules() if rule.startswith("-A KNOCKD-FAST ")]

    def knockd(self, *args: str, ns: str | None = None) -> subprocess.CompletedProcess:
        """``knockd-fast ARGS`` (in the server namespace by default)."""
        return ns_run(ns or self.server, [*knockd_command(), *args], env=self.env)

    def write_config(self, interfaces: Sequence[str] | None = None, **settings: Any) -> None:
        """Write the config: ``interfaces`` (default: every link's; one as a plain string)."""
        names = list(self.interfaces if interfaces is None else interfaces)
        self.config_path.write_text(
            render_config(
                names[0] if len(names) == 1 else names,
                self.directory / "state",
                self.users,
                **settings,
            )
        )


def log_text(line: str) -> str:
    """A log line's text: the ``message`` of a JSON log object, else the line itself (a
    decision's JSON line, or a line of a daemon run without ``--json``)."""
    if line.startswith("{"):
        try:
            entry = json.loads(line)
        except ValueError:
            return line
        if isinstance(entry, dict) and isinstance(entry.get("message"), str):
            return entry["message"]
    return line


def _decision(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        decision = json.loads(line)
    except ValueError:
        return None
    return decision if isinstance(decision, dict) and "verdict" in decision else None


def _spawn_listener(ns: str, ports: Sequence[int]) -> subprocess.Popen:
    argv = ["ip", "netns", "exec", ns, sys.executable, str(HERE), "serve", *map(str, ports)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    line = proc.stdout.readline().strip() if ready else ""
    if line != "ready":
        proc.kill()
        raise RuntimeError(f"listener did not start: {line!r} {proc.communicate()[1]}")
    return proc


@contextlib.contextmanager
def doorman(
    directory: Path,
    *,
    users: Sequence[User] | None = None,
    ports: Sequence[int] = (2222,),
    start: bool = True,
    second_link: bool = False,
    capture: str | Sequence[str] = (),
    backend: str = "iptables",
    **settings: Any,
) -> Iterator[Harness]:
    """Two hosts, a configured daemon, closed ports with listeners; yields the ``Harness``.

    ``users`` defaults to alice (id 7), allowed every one of ``ports`` over tcp; their
    keys are written into ``directory``. ``settings`` go to ``render_config`` (window,
    default_timeout, max_timeout, modes). With ``start=False`` nothing runs yet. With
    ``second_link`` a third namespace hangs off a second server interface, and the daemon
    captures on both. ``capture`` (e.g. ``"any"``) is the ``capture.interface`` to configure
    instead of the links' interfaces. ``backend`` is ``grants.backend``: the backends that
    write the legacy xtables (``registry.KINDS``: iptables, ipset) get the DROP rules in
    iptables-legacy, the family of their grants (GUIDE section 5); ``backend="nftables"``
    configures ``grants.protect`` = the ports instead (the daemon's own chain drops them
    unless granted) and adds no iptables DROP rules.
    """
    if backend != "iptables":
        extra = {table: dict(keys) for table, keys in (settings.pop("extra", None) or {}).items()}
        grants = extra.setdefault("grants", {})
        grants.setdefault("backend", backend)
        if backend == "nftables":
            grants.setdefault("protect", [f"{port}/tcp" for port in ports])
        settings["extra"] = extra
    directory = Path(directory)
    (directory / "home").mkdir(parents=True, exist_ok=True)
    users = list(users or [User(7, "alice", [f"{port}/tcp" for port in ports])])
    for user in users:
        if user.key_file is None:
            user.key_file = directory / f"{user.name}.key"
            user.key = write_key(user.key_file)
    with contextlib.ExitStack() as stack:
        server, client, interface = stack.enter_context(netns.two_hosts())
        client_if = "kfc" + interface[3:]
        netns.add_address(client, client_if, f"{OTHER_V4}/24")
        # Deprecated: the client's own connections keep CLIENT_V6 as their source.
        netns.add_address(client, client_if, f"{OTHER_V6}/64", deprecated=True)
        harness = Harness(
            server, client, interface, directory, directory / "config.toml", users, tuple(ports)
        )
        harness.capture = (capture,) if isinstance(capture, str) else tuple(capture)
        suffix = interface[3:]
        harness.links.append(
            Link(interface, client, client_if, SERVER_V4, CLIENT_V4, SERVER_V6, CLIENT_V6, server)
        )
        if second_link:
            # Deleting the namespaces (on the way out, also on failure) deletes the veth.
            client2 = stack.enter_context(netns.network_namespace("kfd"))
            link = Link(
                f"kft{suffix}",
                client2,
                f"kfd{suffix}",
                SERVER2_V4,
                CLIENT2_V4,
                SERVER2_V6,
                CLIENT2_V6,
                server,
            )
            link.add()
            harness.links.append(link)
        harness.write_config(**settings)
        stack.callback(_teardown, harness)
        harness._helpers.append(_spawn_listener(server, ports))
        if start:
            harness.start()
            if KINDS[backend] == "legacy xtables":
                close_ports(harness)
        yield harness


def close_ports(harness: Harness) -> None:
    """DROP the protected ports (after the daemon put its jump first in INPUT)."""
    for family in (4, 6):
        for port in harness.ports:
            done = harness.iptables(
                "-A", "INPUT", "-p", "tcp", "--dport", port, "-j", "DROP", family=family
            )
            assert done.returncode == 0, done.stderr


def _teardown(harness: Harness) -> None:
    if harness.proc is not None and harness.proc.poll() is None:
        harness.proc.kill()
        harness.proc.wait()
    for helper in harness._helpers:  # listeners, sessions, lock holders
        if helper.poll() is None:
            helper.kill()
        helper.communicate()


# --- a state directory on a file system of its own --------------------------------------


class VolumeUnavailable(Exception):
    """No ``mkfs.ext4``, loop devices or ext4 here."""


@dataclass(frozen=True)
class Volume:
    """A small ext4 in an image file, loop-mounted on ``path`` with ``errors=remount-ro``."""

    path: Path
    device: str  # "loop3"

    def fail(self) -> None:
        """Make the file system read-only under everyone using it, files already open
        included, as the kernel does after an I/O error (``errors=remount-ro``): every
        write fails from now on with EROFS.

        A read-only remount cannot do this to a running daemon. A bind mount made after
        the daemon opened its files does not cover them (they stay open through the mount
        they were opened through), and a mount they were opened through refuses to turn
        read-only while they are open for writing (EBUSY).
        """
        trigger = Path("/sys/fs/ext4", self.device, "trigger_fs_error")
        trigger.write_text("knockd-fast test: the state directory goes read-only\n")


@contextlib.contextmanager
def ext4_volume(path: Path, image: Path, size_mib: int = 16) -> Iterator[Volume]:
    """Mount a fresh ext4 of ``size_mib`` (in ``image``) on ``path``; always unmount it.

    Mount it before the daemon starts (``doorman(..., start=False)``): ``ip netns exec``
    gives the daemon a copy of the mounts of the moment. Leave it after the daemon and
    its namespaces are gone; the loop device goes with the last unmount (autoclear).
    """
    if os.geteuid() != 0 or not all(shutil.which(name) for name in ("mkfs.ext4", "findmnt")):
        raise VolumeUnavailable("needs root, mkfs.ext4 and findmnt")
    path.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as handle:
        handle.truncate(size_mib << 20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        raise VolumeUnavailable(f"mkfs.ext4: {made.stderr.strip()}")
    argv = ["mount", "-t", "ext4", "-o", "loop,errors=remount-ro", str(image), str(path)]
    mounted = subprocess.run(argv, capture_output=True, text=True)
    if mounted.returncode != 0:
        raise VolumeUnavailable(f"{' '.join(argv)}: {mounted.stderr.strip()}")
    try:
        source = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE", "--mountpoint", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        yield Volume(path, Path(source).name)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            # Still busy (a process of ours holds it): detach now, freed when it exits.
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# --- the packet tool (runs inside a namespace) -----------------------------------------


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _socket(host: str, kind: int, source: str | None) -> socket.socket:
    sock = socket.socket(_family(host), kind)
    if source:
        sock.bind((source, 0))
    return sock


def _serve(ports: Sequence[int]) -> int:
    listeners = []
    for port in ports:
        for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, port))
            sock.listen(64)
            listeners.append(sock)
    print("ready", flush=True)
    peers: list[socket.socket] = []
    while True:
        readable, _, _ = select.select(listeners + peers, [], [])
        for sock in readable:
            if sock in listeners:
                peer, _ = sock.accept()
                peers.append(peer)
                continue
            try:
                data = sock.recv(4096)
                if data:
                    sock.sendall(data)
                    continue
            except OSError:
                pass
            peers.remove(sock)
            sock.close()


def _connect(host: str, port: int, source: str | None, timeout: float) -> int:
    with _socket(host, socket.SOCK_STREAM, source) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            sock.sendall(b"hello\n")
            return 0 if sock.recv(16) == b"hello\n" else 1
        except OSError:
            return 1


def _session(host: str, port: int) -> int:
    with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT + 3) as sock:
        print("connected", flush=True)
        sock.settimeout(5)
        for line in sys.stdin:
            try:
                sock.sendall(line.encode())
                echoed = sock.recv(4096)
            except OSError:
                echoed = b""
            print("ok" if echoed == line.encode() else "fail", flush=True)
    return 0


def _syn(host: str, ports: Sequence[int], source: str | None, sport: int, spray: bool) -> int:
    """One bare SYN per port: all from one source port, as the client sends a knock (``sport``,
    or one the kernel picks for the first), or with ``spray`` each from a port of its own, as
    a blind spoofer's packets come."""
    for port in ports:
        sock = socket.socket(_family(host), socket.SOCK_STREAM)
        try:
            if not spray:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if source or not spray:
                sock.bind((source or ("::" if ":" in host else "0.0.0.0"), 0 if spray else sport))
                sport = sock.getsockname()[1]
            sock.setblocking(False)
            result = sock.connect_ex((host, port))
            if result not in (0, errno.EINPROGRESS, errno.ECONNREFUSED):
                raise OSError(result, os.strerror(result))
        finally:
            sock.close()
    return 0


def _hold_lock(path: str) -> int:
    """flock ``path`` (the xtables lock: what ``iptables -w`` takes) until stdin closes."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.read()
    os.close(fd)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="packet tool of the end-to-end tests")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("ports", type=int, nargs="+")
    connect = sub.add_parser("connect")
    connect.add_argument("host")
    connect.add_argument("port", type=int)
    connect.add_argument("--timeout", type=float, default=CONNECT_TIMEOUT)
    udp = sub.add_parser("udp")
    udp.add_argument("host")
    udp.add_argument("port", type=int)
    udp.add_argument("payload", type=bytes.fromhex)
    syn = sub.add_parser("syn")
    syn.add_argument("host")
    syn.add_argument("ports", type=int, nargs="+")
    syn.add_argument("--sport", type=int, default=0, help="source port (0: the kernel's)")
    syn.add_argument("--spray", action="store_true", help="a source port per SYN")
    session = sub.add_parser("session")
    session.add_argument("host")
    session.add_argument("port", type=int)
    lock = sub.add_parser("lock")
    lock.add_argument("file")
    for command in (connect, udp, syn):
        command.add_argument("--source")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args.ports)
    if args.command == "connect":
        return _connect(args.host, args.port, args.source, args.timeout)
    if args.command == "udp":
        with _socket(args.host, socket.SOCK_DGRAM, args.source) as sock:
            sock.sendto(args.payload, (args.host, args.port))
        return 0
    if args.command == "syn":
        return _syn(args.host, args.ports, args.source, args.sport, args.spray)
    if args.command == "lock":
        return _hold_lock(args.file)
    return _session(args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
