"""Network namespaces and packet capture for tests (a helper module, not a test file).

Every namespace is named ``kf-<pid>-<n>``, so parallel runs never collide, and is
deleted on the way out, also when the test fails. Nothing here touches the host's
own interfaces or firewall: commands run through ``ip netns exec``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SNIFF_SCRIPT = Path(__file__).with_name("sniff.py")
_serial = itertools.count()


class NetnsUnavailable(Exception):
    """Not root, or the kernel/container does not allow ``ip netns add``."""


def run_in(ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` of ``argv`` inside namespace ``ns``."""
    return subprocess.run(["ip", "netns", "exec", ns, *argv], **kwargs)


@contextlib.contextmanager
def network_namespace(prefix: str = "kf") -> Iterator[str]:
    """Create a namespace with ``lo`` up, yield its name, and always delete it."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("not running as root")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("iproute2's `ip` command is not installed")
    name = f"{prefix}-{os.getpid()}-{next(_serial)}"
    added = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if added.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add {name}` failed: {added.stderr.strip()}")
    try:
        run_in(name, ["ip", "link", "set", "lo", "up"], check=True, capture_output=True)
        yield name
    finally:
        _kill_members(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _kill_members(ns: str) -> None:
    # Only processes a test started can live in a namespace it created.
    listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in listed.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


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


SERVER_V4, CLIENT_V4 = "192.0.2.1", "192.0.2.2"
SERVER_V6, CLIENT_V6 = "2001:db8::1", "2001:db8::2"


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[str, str, str]]:
    """Namespaces (server, client) joined by a veth; yields (server, client, server iface).

    Server 192.0.2.1 / 2001:db8::1, client 192.0.2.2 / 2001:db8::2 (documentation ranges);
    IPv6 addresses skip duplicate address detection so they work at once.
    """
    with network_namespace("kfs") as server, network_namespace("kfc") as client:
        suffix = server.split("-", 1)[1].replace("-", "")[-9:]
        server_if, client_if = f"kfs{suffix}", f"kfc{suffix}"
        steps = [
            [
                "ip",
                "link",
                "add",
                server_if,
                "netns",
                server,
                "type",
                "veth",
                "peer",
                "name",
                client_if,
                "netns",
                client,
            ],
        ]
        for ns, iface, v4, v6 in (
            (server, server_if, SERVER_V4, SERVER_V6),
            (client, client_if, CLIENT_V4, CLIENT_V6),
        ):
            steps += [
                ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{v4}/24", "dev", iface],
                ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{v6}/64", "dev", iface, "nodad"],
                ["ip", "netns", "exec", ns, "ip", "link", "set", iface, "up"],
            ]
        for argv in steps:
            subprocess.run(argv, check=True, capture_output=True)
        # Deleting a namespace deletes the veth pair with it.
        yield server, client, server_if
