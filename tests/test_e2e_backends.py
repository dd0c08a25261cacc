"""End to end, the same scenarios on every firewall backend: iptables, ipset, nftables.

The real daemon and client, real libpcap and real firewall, in namespaces (tests/e2e.py's
``doorman(..., backend=...)``: iptables and ipset get DROP rules in iptables-legacy, the
family they write; nftables protects the port in its own chain). Per backend:

- knock, connect, close (refused after), over IPv4 and IPv6, with two protected
  destinations: a grant to one address of the server does not open the other one;
- extend: a second open asking for longer outlives the first expiry (the kernel's remaining
  time grew, where the backend keeps kernel timeouts: ipset, nftables);
- automatic expiry with the daemon alive (the port closes, the log says expired);
- kill -9 with a 3 s grant and no restart: the kernel closes the port within about a second
  of its expiry (iptables: the rule's time match stops matching; ipset and nftables: the
  kernel times the entry out).

Two daemon runs per backend. Reachability is always a real TCP connect to a listener.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import json
import re
import shutil
import time
from dataclasses import dataclass

import pytest
from e2e import SERVER_V4, SERVER_V6, close_ports, doorman, ns_run
from netns import NetnsUnavailable, add_address

from knockd_fast.firewall.registry import KINDS

PORT = 2222
SECOND = {4: "192.0.2.10", 6: "2001:db8::10"}  # a second address of the server, same link
FIRST = {4: SERVER_V4, 6: SERVER_V6}
IPT = ("iptables-legacy", "ip6tables-legacy")


def _missing(backend: str) -> str | None:
    """Why ``backend`` cannot run here, or None."""
    tools = {"iptables": IPT, "ipset": ("ipset", *IPT), "nftables": ("nft",)}[backend]
    absent = [name for name in tools if not shutil.which(name)]
    if backend == "nftables" and not ctypes.util.find_library("nftables"):
        absent.append("libnftables")
    return f"{', '.join(absent)} not installed" if absent else None


BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(bool(_missing(name)), reason=_missing(name) or ""))
    for name in ("iptables", "ipset", "nftables")
]

pytestmark = [
    pytest.mark.netns,
    pytest.mark.extension,  # live capture needs the Cython engine
    pytest.mark.parametrize("backend", BACKENDS),
]


@pytest.fixture
def e2e(tmp_path, backend):
    """``e2e(**options)``: a started ``Harness`` on ``backend``, whose daemon protects both
    the server's first addresses and ``SECOND`` (``capture.destinations``)."""
    with contextlib.ExitStack() as stack:

        def make(**options):
            destinations = [FIRST[4], SECOND[4], FIRST[6], SECOND[6]]
            extra = {"capture": {"destinations": destinations}}
            try:
                h = stack.enter_context(
                    doorman(tmp_path / "e2e", backend=backend, start=False, extra=extra, **options)
                )
            except NetnsUnavailable as error:
                pytest.skip(f"network namespaces unavailable: {error}")
            add_address(h.server, h.interface, f"{SECOND[4]}/24")
            add_address(h.server, h.interface, f"{SECOND[6]}/64")
            h.start()
            if KINDS[backend] == "legacy xtables":
                close_ports(h)
            return h

        yield make


# --- what the kernel holds, per backend --------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One grant as the kernel holds it: its text, the expiry its comment carries, and the
    kernel's own remaining seconds (None for iptables: its rules have no timeout)."""

    text: str
    expires: int
    remaining: float | None


def _expires(text: str) -> int:
    return int(re.search(r"expires=(\d+)", text).group(1))


def entries(h, backend: str) -> list[Entry]:
    if backend == "iptables":
        return [Entry(rule, _expires(rule), None) for rule in h.grant_rules()]
    if backend == "ipset":
        found = []
        for name in (f"knockd-fast-v{v}{any_}" for v in (4, 6) for any_ in ("", "-any")):
            done = ns_run(h.server, ["ipset", "list", name])
            assert done.returncode == 0, done.stderr
            for line in done.stdout.split("Members:\n", 1)[1].strip().splitlines():
                timeout = float(re.search(r" timeout (\d+)", line).group(1))
                found.append(Entry(line, _expires(line), timeout))
        return found
    done = ns_run(h.server, ["nft", "-j", "list", "table", "inet", "knockd_fast"])
    assert done.returncode == 0, done.stderr
    items = json.loads(done.stdout)["nftables"]
    elems = [e["elem"] for i in items if "set" in i for e in i["set"].get("elem", [])]
    return [Entry(json.dumps(e), _expires(e["comment"]), float(e["expires"])) for e in elems]


def only_entry(h, backend: str) -> Entry:
    found = entries(h, backend)
    assert len(found) == 1, found
    return found[0]


def opened(h, target: str, *extra: str) -> None:
    """Knock open ``PORT`` on ``target``; wait until the firewall holds the grant."""
    family = "-6" if ":" in target else "-4"
    h.knock("open", target, f"{PORT}/tcp", family, *extra)
    h.wait_log(rf"^firewall: opened {PORT}/tcp for \S+ to {re.escape(target)} ", timeout=10)


def closed(h, target: str) -> None:
    family = "-6" if ":" in target else "-4"
    h.knock("close", target, f"{PORT}/tcp", family)
    h.wait_log(rf"^firewall: closed {PORT}/tcp for \S+ to {re.escape(target)} ", timeout=10)


# --- the scenarios -------------------------------------------------------------------------


def test_knock_connect_close_v4_v6_two_destinations(e2e, backend) -> None:
    h = e2e(default_timeout=300, max_timeout=3600)
    for family in (4, 6):
        a, b = FIRST[family], SECOND[family]
        assert not h.can_connect(a, PORT) and not h.can_connect(b, PORT), "closed before"
        opened(h, a)
        assert h.can_connect(a, PORT)
        assert not h.can_connect(b, PORT), "a grant to A opened B"
        opened(h, b)
        assert h.can_connect(b, PORT)
        closed(h, a)
        assert not h.can_connect(a, PORT), "connected after the close"
        assert h.can_connect(b, PORT), "closing A closed B"
        closed(h, b)
        assert not h.can_connect(b, PORT), "connected after the close"
        assert entries(h, backend) == []
    h.stop()


def test_extend_expiry_and_kill9(e2e, backend) -> None:
    h = e2e(default_timeout=3, max_timeout=3600)

    # Extend: the second open asks for longer; the grant outlives the first expiry.
    opened(h, SERVER_V4)
    first = only_entry(h, backend)
    assert h.can_connect(SERVER_V4, PORT)
    mark = h.mark()
    opened(h, SERVER_V4, "--duration", "60")
    longer = only_entry(h, backend)
    assert longer.expires >= first.expires + 50, (first, longer)
    if longer.remaining is not None:  # the kernel's own timeout was refreshed
        assert longer.remaining > 50 > first.remaining + 10, (first, longer)
    time.sleep(max(0.0, first.expires + 1.5 - time.time()))
    assert h.can_connect(SERVER_V4, PORT), "closed at the first expiry despite the extension"
    assert not re.search(r"^firewall: expired ", h.log(since=mark), re.M), h.log(since=mark)
    closed(h, SERVER_V4)
    assert not h.can_connect(SERVER_V4, PORT)

    # Automatic expiry, the daemon alive.
    opened(h, SERVER_V4)
    expires = only_entry(h, backend).expires
    assert h.can_connect(SERVER_V4, PORT)
    h.wait_log(rf"^firewall: expired {PORT}/tcp for 192\.0\.2\.2 to 192\.0\.2\.1 ", timeout=10)
    assert time.time() >= expires, "expired before its time"  # late is fine on a busy box
    assert not h.can_connect(SERVER_V4, PORT)
    assert entries(h, backend) == []

    # kill -9 with a 3 s grant, no restart: the kernel closes the port at its expiry.
    opened(h, SERVER_V4)
    entry = only_entry(h, backend)
    assert h.can_connect(SERVER_V4, PORT)
    h.kill9()
    time.sleep(max(0.0, entry.expires + 1.0 - time.time()))
    assert not h.can_connect(SERVER_V4, PORT), "open more than a second after the expiry"
    if backend == "iptables":  # nobody removed the rule; its time match stopped matching
        assert entries(h, backend) == [entry]
    else:
        assert entries(h, backend) == [], "the kernel removed the entry itself"
