"""Network namespaces, veth links and packet capture for tests, benchmarks and the demo.

A helper module, not a test file. Namespaces are named ``<prefix>-<pid>-<n>``, so
parallel runs never collide; each has ``lo`` up and is always deleted on the way out,
also on failure, after every process in it is killed (only processes we started can
live in a namespace we created). Links are veth pairs between two namespaces, with
optional MAC addresses; addresses (IPv4 or IPv6, with prefix; IPv6 without duplicate
address detection, optionally deprecated) go on one at a time or many in one
``ip -batch``. Nothing here touches the host's own interfaces or firewall: every command
runs through ``ip -n NS`` or ``ip netns exec NS``.

Run as a script, this file gives the demo (and a shell) the same two hosts::

    python3 tests/netns.py up TAG      namespaces TAG-server and TAG-client, veth TAGs / TAGc
    python3 tests/netns.py down TAG    kill what runs in them, delete them (gone is fine)

``up`` prints the names as shell assignments (``server=... client=... server_if=...
client_if=...``); TAG is ``kf`` + letters + digits (the caller's pid), at most 14 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SNIFF_SCRIPT = Path(__file__).with_name("sniff.py")
IFNAMSIZ = 15  # the kernel's limit on an interface name, in bytes
SERVER_V4, CLIENT_V4 = "192.0.2.1", "192.0.2.2"
SERVER_V6, CLIENT_V6 = "2001:db8::1", "2001:db8::2"
_serial = itertools.count()


class NetnsUnavailable(Exception):
    """Not root, or the kernel/container does not allow ``ip netns add``."""


def run_in(ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` of ``argv`` inside namespace ``ns``."""
    return subprocess.run(["ip", "netns", "exec", ns, *argv], **kwargs)


def in_named_namespace() -> bool:
    """Whether this process runs in a namespace made by ``ip netns add`` (not the host's):
    what a script that changes the firewall checks before it does."""
    found = subprocess.run(["ip", "netns", "identify", str(os.getpid())], capture_output=True)
    return found.returncode == 0 and bool(found.stdout.strip())


def ip(*args: str, batch: str | None = None) -> None:
    """``ip ARGS`` (with ``batch`` on its stdin); a one-line RuntimeError if it fails."""
    done = subprocess.run(["ip", *args], input=batch, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


# --- namespaces ------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (free in a fresh namespace too, on its loopback)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def namespace_name(prefix: str = "kf") -> str:
    """A fresh ``<prefix>-<pid>-<n>``: unique among this process's and other runs'."""
    return f"{prefix}-{os.getpid()}-{next(_serial)}"


def add_namespace(name: str) -> None:
    """``ip netns add name`` with ``lo`` up; NetnsUnavailable if namespaces cannot be made."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("not running as root")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("iproute2's `ip` command is not installed")
    added = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if added.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add {name}` failed: {added.stderr.strip()}")
    try:
        ip("-n", name, "link", "set", "lo", "up")
    except BaseException:
        delete_namespace(name)
        raise


def delete_namespace(name: str, timeout: float = 5.0) -> None:
    """Kill every process in namespace ``name``, then delete it (and its veth ends).

    Call it only on a namespace this run created: whatever runs there was started by us.
    Listing and killing repeat until none is left, so a child forked meanwhile dies too.
    A namespace already gone is no error.
    """
    deadline = time.monotonic() + timeout
    while True:
        listed = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        pids = [int(pid) for pid in listed.stdout.split() if pid.isdigit()]
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextlib.contextmanager
def network_namespace(prefix: str = "kf") -> Iterator[str]:
    """Create a namespace ``<prefix>-<pid>-<n>`` with ``lo`` up, yield its name, and
    always delete it, its processes killed first."""
    name = namespace_name(prefix)
    add_namespace(name)
    try:
        yield name
    finally:
        delete_namespace(name)


# --- links and addresses ---------------------------------------------------------------


@dataclass(frozen=True)
class End:
    """One end of a veth pair: its namespace, interface name, addresses, MAC address."""

    ns: str
    iface: str
    addresses: tuple[str, ...] = ()  # with prefix: "192.0.2.1/24", "2001:db8::1/64"
    mac: str | None = None  # the kernel picks one when None


def add_veth(a: End, b: End) -> None:
    """The veth pair between ``a`` and ``b`` (names and MACs only; both ends stay down).

    Made from inside ``a.ns`` with the peer created in ``b.ns``: neither end ever
    appears among the host's own interfaces.
    """
    for end in (a, b):
        if len(end.iface.encode()) > IFNAMSIZ:
            raise ValueError(f"interface name {end.iface!r} is longer than {IFNAMSIZ} bytes")
    mac_a = ["address", a.mac] if a.mac else []
    mac_b = ["address", b.mac] if b.mac else []
    ip("-n", a.ns, "link", "add", a.iface, *mac_a, "type", "veth",
       "peer", "name", b.iface, "netns", b.ns, *mac_b)  # fmt: skip


def _address_command(iface: str, address: str, deprecated: bool) -> list[str]:
    argv = ["addr", "add", address, "dev", iface]
    if ":" in address:
        argv.append("nodad")  # usable at once, not "tentative" for a second or two
    if deprecated:
        argv += ["preferred_lft", "0"]  # never picked as a source unless bound to
    return argv


def add_address(ns: str, iface: str, address: str, *, deprecated: bool = False) -> None:
    """``address`` (with prefix, IPv4 or IPv6) on ``iface``; IPv6 without DAD;
    ``deprecated`` (``preferred_lft 0``): only a socket bound to it sends from it."""
    ip("-n", ns, *_address_command(iface, address, deprecated))


def add_addresses(ns: str, iface: str, addresses: Iterable[str]) -> None:
    """Many addresses (as ``add_address``) in one ``ip -batch``: hundreds in well under a
    second, where one ``ip`` per address takes several milliseconds each."""
    batch = "".join(" ".join(_address_command(iface, a, False)) + "\n" for a in addresses)
    if batch:
        ip("-n", ns, "-batch", "-", batch=batch)


def set_link(ns: str, iface: str, state: str) -> None:
    """``ip link set iface up`` or ``down`` in ``ns``."""
    if state not in ("up", "down"):
        raise ValueError(f"link state must be 'up' or 'down', not {state!r}")
    ip("-n", ns, "link", "set", iface, state)


def delete_link(ns: str, iface: str) -> None:
    """Delete ``iface`` in ``ns`` (for a veth: both ends), as an unplugged link."""
    ip("-n", ns, "link", "del", iface)


def has_carrier(ns: str, iface: str) -> bool:
    """Whether ``iface`` in ``ns`` exists and reports carrier (LOWER_UP)."""
    done = subprocess.run(["ip", "-n", ns, "-j", "link", "show", iface], capture_output=True)
    if done.returncode != 0:
        return False
    return "LOWER_UP" in json.loads(done.stdout)[0].get("flags", [])


def wait_carrier(ends: Iterable[tuple[str, str]], timeout: float = 5.0) -> None:
    """Until every (namespace, interface) reports carrier: a packet sent before is lost."""
    ends = list(ends)
    deadline = time.monotonic() + timeout
    while not all(has_carrier(ns, iface) for ns, iface in ends):
        if time.monotonic() > deadline:
            names = ", ".join(iface for _, iface in ends)
            raise RuntimeError(f"no carrier on {names} within {timeout} s")
        time.sleep(0.05)


def add_neighbour(ns: str, iface: str, address: str, mac: str) -> None:
    """A permanent neighbour entry: ``address`` is at ``mac`` (no ARP / ND needed)."""
    ip("-n", ns, "neigh", "replace", address, "lladdr", mac, "dev", iface)


def veth_link(a: End, b: End, *, timeout: float = 5.0) -> None:
    """The veth pair between ``a`` and ``b`` with their addresses, both ends up and
    reporting carrier."""
    add_veth(a, b)
    for end in (a, b):
        for address in end.addresses:
            add_address(end.ns, end.iface, address)
        set_link(end.ns, end.iface, "up")
    wait_carrier(((a.ns, a.iface), (b.ns, b.iface)), timeout)


# --- two hosts -------------------------------------------------------------------------


def server_end(ns: str, iface: str) -> End:
    """The server's end of ``two_hosts``: 192.0.2.1/24, 2001:db8::1/64."""
    return End(ns, iface, (f"{SERVER_V4}/24", f"{SERVER_V6}/64"))


def client_end(ns: str, iface: str) -> End:
    """The client's end of ``two_hosts``: 192.0.2.2/24, 2001:db8::2/64."""
    return End(ns, iface, (f"{CLIENT_V4}/24", f"{CLIENT_V6}/64"))


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[str, str, str]]:
    """Namespaces (server, client) joined by a veth; yields (server, client, server iface).

    Server 192.0.2.1 / 2001:db8::1, client 192.0.2.2 / 2001:db8::2 (documentation ranges);
    IPv6 addresses skip duplicate address detection so they work at once. The client's
    interface is ``kfc`` + the server's after its ``kfs``.
    """
    with network_namespace("kfs") as server, network_namespace("kfc") as client:
        suffix = server.split("-", 1)[1].replace("-", "")[-9:]
        server_if, client_if = f"kfs{suffix}", f"kfc{suffix}"
        # Deleting a namespace deletes the veth pair with it.
        veth_link(server_end(server, server_if), client_end(client, client_if))
        yield server, client, server_if


# --- firewall tools and packet capture -------------------------------------------------


_LISTENER = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""
_CONNECT = (
    "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)"
    ".close()"
)


@contextlib.contextmanager
def tcp_listener(server_ns: str, client_ns: str, port: int) -> Iterator[Any]:
    """A TCP listener on ``port`` of every address of ``server_ns`` (IPv4 and IPv6), ready
    before this yields ``connects(address)``: whether a connection from ``client_ns`` to
    that address gets through. The listener is killed on the way out."""
    listener = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, sys.executable, "-c", _LISTENER, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([listener.stdout], [], [], 10)
        assert ready and listener.stdout.readline().strip() == "ready"

        def connects(address: str) -> bool:
            argv = [sys.executable, "-c", _CONNECT, address, str(port)]
            return run_in(client_ns, argv, capture_output=True, timeout=10).returncode == 0

        yield connects
    finally:
        listener.kill()
        listener.communicate()


def iptables_commands() -> tuple[str, str]:
    """(iptables, ip6tables): the legacy variants if installed, else the default ones."""
    for pair in (("iptables-legacy", "ip6tables-legacy"), ("iptables", "ip6tables")):
        if all(shutil.which(tool) for tool in pair):
            return pair
    raise RuntimeError("iptables is not installed (apt-get install -y iptables)")


class Sniffer:
    """``tests/sniff.py`` running inside a namespace; ``packets()`` once the block is left.

    Entering returns only after the sniffer's socket is bound, so every packet sent
    inside the block is recorded; leaving stops it (SIGTERM) and waits for it.
    """

    def __init__(self, ns: str, out: Path, iface: str = "lo", max_seconds: float = 60.0):
        self.out = Path(out)
        self.argv = [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            str(SNIFF_SCRIPT),
            "--iface",
            iface,
            "--seconds",
            str(max_seconds),
            "--out",
            str(self.out),
        ]
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Sniffer:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], 10.0)
            line = self.proc.stdout.readline().strip() if ready else ""
            if line != "ready":
                raise RuntimeError(f"sniffer did not start: {line!r} {self._stop()!r}")
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        errors = self._stop()
        if exc_info[0] is None and self.proc.returncode not in (0, -signal.SIGTERM):
            raise RuntimeError(f"sniffer exited with {self.proc.returncode}: {errors}")

    def _stop(self) -> str:
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, errors = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, errors = proc.communicate()
        return errors.strip()

    def packets(self) -> list[dict[str, Any]]:
        with open(self.out) as lines:
            return [json.loads(line) for line in lines if line.strip()]


# --- the command line (the demo) -------------------------------------------------------

TAG = re.compile(r"kf[a-z]*[0-9]+")


def _tag(text: str) -> str:
    # Names made from it must stay ours (``down`` kills what runs in them) and fit IFNAMSIZ.
    if not TAG.fullmatch(text) or len(text) > IFNAMSIZ - 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want kf, letters, digits; at most 14 bytes")
    return text


def tagged_names(tag: str) -> dict[str, str]:
    """The two hosts of ``up TAG``: namespaces and interfaces."""
    return {
        "server": f"{tag}-server",
        "client": f"{tag}-client",
        "server_if": f"{tag}s",
        "client_if": f"{tag}c",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="two hosts in network namespaces, for a shell")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("up", "down"):
        sub.add_parser(command).add_argument("tag", type=_tag)
    args = parser.parse_args(argv)
    names = tagged_names(args.tag)
    if args.command == "down":
        for ns in (names["server"], names["client"]):
            delete_namespace(ns)
        return 0
    made = []  # not network_namespace(): these must outlive this process, until ``down``
    try:
        for ns in (names["server"], names["client"]):
            add_namespace(ns)
            made.append(ns)
        veth_link(
            server_end(names["server"], names["server_if"]),
            client_end(names["client"], names["client_if"]),
        )
    except BaseException as error:
        for ns in made:
            delete_namespace(ns)
        if isinstance(error, NetnsUnavailable | RuntimeError):
            print(f"netns: {error}", file=sys.stderr)
            return 1
        raise
    print(" ".join(f"{key}={value}" for key, value in names.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
