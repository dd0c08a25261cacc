#!/usr/bin/env python3
"""knockd-fast and Debian's knockd side by side on a live interface (`make bench-live`).

Two namespaces joined by a veth pair (192.0.2.1 server, 192.0.2.2 client: documentation
addresses). The server's firewall drops everything it is sent, so only the capture sees
the packets. ``tcpreplay`` (from Debian) replays generated captures onto the client end
of the veth, at fixed rates and at top speed, while one daemon at a time captures on the
server end:

``knockd-fast``  ``knockd-fast run`` with the benchmark key (make_pcap.BENCH_KEY) and the
                 ``dry-run`` grants backend: the sweep measures capture and judging, not
                 iptables (``make bench-firewall`` measures that; the flood test below
                 uses the real iptables backend).
``knockd``       Debian's knockd 0.8 with three doors whose 34-port sequences lie inside
                 the knock range, ``command = /bin/true``, logging to a file.

Workloads (sub-command ``sweep``): K concurrent sources for K = 100, 1,000, 16,000,
100,000; knockd-fast gets real sealed messages (ports shuffled), knockd gets door
sequences (in order), with the same sources, packet counts and interleaving
(make_pcap.plan_knocks, no background); plus the spoofed flood (make_pcap.make_flood). Per
run: CPU seconds of the daemon process per million packets sent (utime + stime from
/proc/PID/stat, from just before the replay until the daemon has gone idle after it),
packets the kernel dropped for the daemon's capture socket (PACKET_STATISTICS, read
from a duplicate of the daemon's socket taken with pidfd_getfd: the same counter for
both daemons), and knocks completed (accepted decisions / knockd's "OPEN SESAME").

Sub-command ``flood``: the flood replayed in a loop at top speed while 100 genuine
knocks (knock_client's library, real TCP SYNs from the client namespace, each to its own
port) arrive; the daemon uses the iptables backend; reports how many opened and the time
from a knock's last packet to the daemon's "firewall: opened" log line (read as it is
written: an upper bound on the time the rule is in place).

Sub-command ``interleaved``: 10,000 knocks interleaved packet by packet from distinct
sources in one capture: ``knockd-fast replay`` must accept all; the same shape of capture
(door sequences) is replayed live to knockd at a fixed rate.

``all`` runs the three and writes bench/results/live-<time>.json and a PNG plot. A
measurement, never a test: it asserts nothing and fails only when a tool fails.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import datetime
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))
import make_pcap  # noqa: E402  (bench/ is not a package)
import netns  # noqa: E402  (tests/netns.py: the namespace helper tests and the demo use)
from run import machine_info  # noqa: E402

from knock_client.protocol import KnockLayout  # noqa: E402
from knockd_fast import frames  # noqa: E402

RESULTS = make_pcap.RESULTS_DIR
SERVER = "192.0.2.1"
CLIENT = "192.0.2.2"
SWEEP_KS = (100, 1_000, 16_000, 100_000)
SWEEP_PACKETS = 1_000_000  # at least; K = 100,000 needs 3.4M for one whole knock each
KNOCK_WINDOW = 3600  # message lifetime: the sweep's messages are sealed when it starts
# How long one knock may take, both daemons: at K = 100,000 and 20,000 packets/s a
# source's 34 packets are spread over the whole 170-second replay.
KNOCK_TIMEOUT = 300
TABLE_SIZE = 262_144  # engine slots: K = 100,000 in progress at once must fit
DOORS = 3
KNOCKD_SEQ_MAX = 32  # knockd refuses longer sequences ("too many ports in knock sequence")
GENUINE_PORT_BASE = 10_000  # flood test: knock i opens GENUINE_PORT_BASE + i
SOL_PACKET, PACKET_STATISTICS = 263, 6
SYS_PIDFD_GETFD = 438  # x86_64 and aarch64 alike
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def sh(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


# --- the wire ---------------------------------------------------------------------------------


@dataclass
class Wire:
    server: str  # namespace names
    client: str
    server_if: str
    client_if: str


@contextlib.contextmanager
def wire(genuine_sources: int = 0) -> Iterator[Wire]:
    """Two namespaces on a veth; the server drops all input; always torn down."""
    tag = f"kfl{os.getpid() % 100000}"
    with netns.network_namespace("kfls") as server, netns.network_namespace("kflc") as client:
        w = Wire(server, client, f"{tag}s", f"{tag}c")
        # The generated frames carry frames.SRC_MAC -> frames.DST_MAC: give the veth ends
        # those addresses, so the server's stack sees them as its own unicast traffic.
        netns.veth_link(
            netns.End(w.client, w.client_if, (f"{CLIENT}/24",), frames.SRC_MAC.hex(":")),
            netns.End(w.server, w.server_if, (f"{SERVER}/24",), frames.DST_MAC.hex(":")),
        )
        netns.add_neighbour(w.client, w.client_if, SERVER, frames.DST_MAC.hex(":"))
        for tool in ("iptables-legacy", "ip6tables-legacy"):
            # Dropped before routing (raw table): the capture has seen them already, and the
            # sender's CPU, which runs the receiving stack of a veth, goes to sending.
            sh("ip", "netns", "exec", w.server, tool, "-t", "raw", "-A", "PREROUTING", "-j", "DROP")
            sh("ip", "netns", "exec", w.server, tool, "-P", "INPUT", "DROP")
        yield w


def tcpreplay_argv(w: Wire, pcap: Path, rate: str, loops: int = 1) -> list[str]:
    """tcpreplay of ``pcap`` onto the client end; rate "top" or packets per second."""
    speed = ["--topspeed"] if rate == "top" else [f"--pps={rate}"]
    return ["ip", "netns", "exec", w.client, "tcpreplay", "-q", "--preload-pcap",
            f"--loop={loops}", *speed, "-i", w.client_if, str(pcap)]  # fmt: skip


def replay(w: Wire, pcap: Path, rate: str, loops: int = 1) -> dict[str, float]:
    """Run ``tcpreplay_argv`` to the end; its summary."""
    return parse_tcpreplay(sh(*tcpreplay_argv(w, pcap, rate, loops)).stdout)


def parse_tcpreplay(out: str) -> dict[str, float]:
    sent = re.search(r"Actual: (\d+) packets .*? in ([\d.]+) seconds", out)
    rated = re.search(r"Rated: .*?([\d.]+) pps", out)
    failed = re.search(r"Failed packets:\s+(\d+)", out)
    if not sent or not rated:
        raise RuntimeError(f"cannot read tcpreplay's summary: {out!r}")
    return {
        "packets": int(sent.group(1)),
        "seconds": float(sent.group(2)),
        "pps": float(rated.group(1)),
        "failed": int(failed.group(1)) if failed else 0,
    }


# --- measuring a process from outside ----------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of all the process's threads, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wait_idle(pid: int, quiet: float = 1.0, limit: float = 120.0) -> float:
    """Wait until the process has used no CPU for ``quiet`` seconds; return its CPU time."""
    deadline = time.monotonic() + limit
    last, since = cpu_seconds(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = cpu_seconds(pid)
        if now - last > 1.5 / CLOCK_TICKS:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    return cpu_seconds(pid)


_libc = ctypes.CDLL(None, use_errno=True)


def capture_counters(pid: int) -> dict[str, int]:
    """Kernel counters of the process's packet sockets: {"received": n, "dropped": n}.

    PACKET_STATISTICS on a duplicate of the daemon's own socket (pidfd_getfd needs the
    right to ptrace it: root). Reading resets the kernel's counters, so a call before a
    run zeroes them and a call after reads that run's. "received" counts what passed the
    daemon's BPF filter, dropped included.
    """
    totals = {"received": 0, "dropped": 0, "sockets": 0}
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = _libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                continue
            with socket.socket(fileno=fd) as sock:
                if sock.family != socket.AF_PACKET:
                    continue
                raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
                packets, drops = struct.unpack_from("II", raw)
                totals["received"] += packets  # the kernel adds drops to tp_packets
                totals["dropped"] += drops
                totals["sockets"] += 1
    finally:
        os.close(pidfd)
    return totals


class LineLog:
    """A daemon's log file followed by a thread, each line stamped when it appears.

    A file, not a pipe: a pipe that the benchmark reads too slowly would block the
    daemon's writes and be measured as the daemon's cost. Polled every millisecond, so a
    stamp is at most ~1 ms late.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[float, str]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        with open(self.path, errors="replace") as f:
            partial = ""
            while True:
                chunk = f.readline()
                if chunk:
                    partial += chunk
                    if partial.endswith("\n"):
                        self.lines.append((time.time(), partial.rstrip("\n")))
                        partial = ""
                elif self._done.is_set():
                    return
                else:
                    time.sleep(0.001)

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        seen = start
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                stamp, line = self.lines[seen]
                seen += 1
                if regex.search(line):
                    return stamp, line
            time.sleep(0.01)
        tail = "\n".join(line for _, line in self.lines[-20:])
        raise RuntimeError(f"no line matching {pattern!r} within {timeout} s:\n{tail}")

    def join(self, timeout: float = 10) -> None:
        self._done.set()
        self._thread.join(timeout)


# --- the daemons ---------------------------------------------------------------------------


class Daemon:
    name = ""

    def __init__(self, w: Wire, work: Path) -> None:
        self.w, self.work = w, work
        self.proc: subprocess.Popen | None = None
        self.log: LineLog | None = None

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log:
            self.log.join()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def completed(self) -> int:
        raise NotImplementedError


def knockd_fast_command() -> str:
    """The venv's ``knockd-fast`` (make puts the venv first on PATH), else the one beside
    this Python."""
    return shutil.which("knockd-fast") or str(Path(sys.executable).with_name("knockd-fast"))


class KnockdFast(Daemon):
    name = "knockd-fast"

    def __init__(
        self,
        w: Wire,
        work: Path,
        backend: str = "dry-run",
        allow: Sequence[str] = ("22/tcp",),
        grants_extra: str = "",
    ):
        super().__init__(w, work)
        key = work / "bench.key"
        from knock_client.keys import write_key_file

        if not key.exists():
            write_key_file(key, make_pcap.BENCH_KEY)
        state = work / f"state-{time.monotonic_ns()}"
        # The sweep's messages are sealed before this daemon starts: give it a replay cache
        # with its history (an empty one), or it refuses them as sealed before it started.
        from knockd_fast.replay import ReplayCache

        ReplayCache.for_state_dir(state).close()
        self.config = work / "knockd-fast.toml"
        self.config.write_text(
            f"[knock]\nwindow = {KNOCK_WINDOW}\nknock_timeout = {KNOCK_TIMEOUT}\n"
            f'[capture]\ninterface = "{w.server_if}"\ntable_size = {TABLE_SIZE}\n'
            f'[grants]\nbackend = "{backend}"\ndefault_timeout = 600\n{grants_extra}'
            f'[state]\ndirectory = "{state}"\n'
            f'[[users]]\nid = {make_pcap.USER_ID}\nname = "bench"\nkey_file = "bench.key"\n'
            f"allow = {json.dumps(list(allow))}\n"
            # One user knocks for every source of the sweep: its caps must not count.
            "max_grants = 65536\nmax_knocks_per_minute = 60000\n"
        )

    def start(self) -> KnockdFast:
        argv = [knockd_fast_command(), "run", "-c", str(self.config), "--json"]
        path = self.work / f"knockd-fast-{time.monotonic_ns()}.log"
        with open(path, "w") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.w.server, *argv], stdout=out, stderr=out
            )
        self.log = LineLog(path)
        self.log.wait_for(r"knockd-fast \S+ on ", 30)  # the start line (a JSON object's text)
        return self

    def decisions(self) -> list[dict]:
        found = []
        for _, line in self.log.lines:
            # With --json every line is an object: the decisions are those with a verdict.
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if "verdict" in entry:
                        found.append(entry)
        return found

    def completed(self) -> int:
        return sum(d.get("verdict") == "accepted" for d in self.decisions())


class Knockd(Daemon):
    name = "knockd"

    def __init__(self, w: Wire, work: Path, doors: list[list[int]]) -> None:
        super().__init__(w, work)
        self.logfile = work / f"knockd-{time.monotonic_ns()}.log"
        self.config = work / "knockd.conf"
        sections = [f"[options]\n    logfile = {self.logfile}\n"]
        for n, ports in enumerate(doors):
            sections.append(
                f"[door{n}]\n    sequence = {','.join(map(str, ports))}\n"
                f"    seq_timeout = {KNOCK_TIMEOUT}\n    tcpflags = syn\n    command = /bin/true\n"
            )
        self.config.write_text("\n".join(sections))

    def start(self) -> Knockd:
        argv = ["knockd", "-i", self.w.server_if, "-c", str(self.config)]
        path = self.work / f"knockd-{time.monotonic_ns()}.out"
        with open(path, "w") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.w.server, *argv], stdout=out, stderr=out
            )
        self.log = LineLog(path)
        # knockd's log file is buffered until it exits: it is ready once its packet
        # socket is open.
        deadline = time.monotonic() + 20
        while self.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if capture_counters(self.pid)["sockets"]:
                    return self
            time.sleep(0.05)
        said = " ".join(line for _, line in self.log.lines)
        raise RuntimeError(f"knockd did not start: {said} {self._logtext()!r}")

    def _logtext(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def completed(self) -> int:
        return self._logtext().count("OPEN SESAME")


def door_sequences(layout: KnockLayout, count: int = DOORS) -> list[list[int]]:
    """knockd doors of one port per segment (the first 32 of a message's 34), in range."""
    rng = np.random.default_rng(20261127)
    digits = rng.integers(layout.segment_size, size=(count, KNOCKD_SEQ_MAX))
    segments = np.arange(KNOCKD_SEQ_MAX) * layout.segment_size
    return (layout.base_port + segments + digits).tolist()


def knockd_ports(doors: list[list[int]], ports: list[list[int]]) -> list[list[int | None]]:
    """Knock k becomes door k % 3's sequence, in order, in the same packet slots; the
    slots past knockd's 32-port maximum are left out of its capture."""
    found: list[list[int | None]] = []
    for k, sent in enumerate(ports):
        door: list[int | None] = list(doors[k % len(doors)])
        found.append((door + [None] * (len(sent) - len(door)))[: len(sent)])
    return found


# --- captures ------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    sources: int
    fast: Path  # capture for knockd-fast
    knockd: Path  # the same shape for knockd
    packets: int
    complete_knocks: int
    extra: dict = field(default_factory=dict)


def knock_workload(
    work: Path, sources: int, packets: int | None, timestamp: int, layout: KnockLayout
) -> Workload:
    """Two captures of one plan: sealed messages (shuffled) and door sequences (in order)."""
    plan = make_pcap.plan_knocks(sources, packets, background_share=0.0, out_dir=work)
    fast = work / f"live-k{sources}-fast.pcap"
    knockd = work / f"live-k{sources}-knockd.pcap"
    ports = make_pcap.knock_ports(plan, layout, seed=1, timestamp=timestamp)
    make_pcap.write_knocks(plan, ports, fast)
    doors = door_sequences(layout)
    make_pcap.write_knocks(plan, knockd_ports(doors, ports), knockd)
    return Workload(
        f"K={sources:,}",
        sources,
        fast,
        knockd,
        plan.shape.packets,
        plan.shape.complete_knocks,
        {"knocks": plan.shape.knocks},
    )


# --- the measurements ----------------------------------------------------------------------


def measure(daemon: Daemon, w: Wire, pcap: Path, rate: str) -> dict[str, object]:
    """One replay of ``pcap`` at ``rate`` into a freshly started ``daemon``."""
    with daemon:
        daemon.start()
        time.sleep(0.3)
        capture_counters(daemon.pid)  # zero the kernel's counters
        cpu0 = cpu_seconds(daemon.pid)
        sent = replay(w, pcap, rate)
        cpu1 = wait_idle(daemon.pid)
        counters = capture_counters(daemon.pid)
        # knockd-fast hands grants to a thread and logs decisions as it goes: let the
        # log catch up before counting.
        time.sleep(0.5)
        result = {
            "daemon": daemon.name,
            "rate": rate,
            "sent": sent["packets"],
            "replay_pps": round(sent["pps"]),
            "replay_seconds": sent["seconds"],
            "replay_failed": sent["failed"],
            "cpu_seconds": round(cpu1 - cpu0, 3),
            "cpu_us_per_packet": round((cpu1 - cpu0) / sent["packets"] * 1e6, 3),
            # What the daemon really read: packets its filter passed, minus the dropped.
            "cpu_us_per_packet_read": round(
                (cpu1 - cpu0) / max(1, counters["received"] - counters["dropped"]) * 1e6, 3
            ),
            "capture_received": counters["received"],
            "capture_dropped": counters["dropped"],
            "capture_sockets": counters["sockets"],
        }
    result["completed"] = daemon.completed()
    return result


def sweep(
    w: Wire,
    work: Path,
    ks: Sequence[int],
    rates: Sequence[str],
    daemons: Sequence[str],
    flood: bool,
    say,  # noqa: ANN001
) -> list[dict]:
    layout = KnockLayout()
    timestamp = int(time.time())
    rows = []
    workloads: list[Workload] = []
    for k in ks:
        say(f"writing the captures for K = {k:,}")
        workloads.append(knock_workload(work, k, max(SWEEP_PACKETS, k * 34), timestamp, layout))
    if flood:
        spoofed = make_pcap.make_flood(1_000_000, 130_000)
        workloads.append(Workload(
            "flood", 130_000, spoofed.path, spoofed.path, spoofed.packets, 0, {"spoofed": True}
        ))  # fmt: skip
    doors = door_sequences(layout)
    for load in workloads:
        for rate in rates:
            for daemon in (KnockdFast(w, work), Knockd(w, work, doors)):
                if daemon.name not in daemons:
                    continue
                pcap = load.fast if daemon.name == "knockd-fast" else load.knockd
                say(f"{load.name} at {rate} pps: {daemon.name}")
                row = measure(daemon, w, pcap, rate)
                row.update(workload=load.name, sources=load.sources,
                           expected_knocks=load.complete_knocks)  # fmt: skip
                say("  " + json.dumps(row))
                rows.append(row)
    return rows


SENDER = r"""
import json, sys, time
from knock_client.protocol import Action, Knock, KnockLayout, Proto, seal
from knock_client.send import resolve, send_syn
import ipaddress, random
args = json.load(open(sys.argv[1]))
key = bytes.fromhex(args["key"])
layout = KnockLayout()
dest = resolve(args["server"])
out = []
for i in range(args["count"]):
    port = args["port_base"] + i
    msg = seal(Knock(Action.OPEN, Proto.TCP, port, int(time.time()),
                     ipaddress.ip_address(args["client"]), args["user"],
                     random.getrandbits(24)), key)
    ports = layout.ports_for(msg)
    random.shuffle(ports)
    send_syn(dest, ports)
    out.append([port, time.time()])
    time.sleep(args["gap"])
print(json.dumps(out))
"""


# The flood-latency run's backends: the [grants] lines each needs, and how to list what it
# holds in the kernel with the text each grant's port appears as there.
FLOOD_BACKENDS = {
    "iptables": ("", ("iptables-legacy", "-S"), "--dport {port}"),
    "ipset": ("", ("ipset", "list"), "tcp:{port}"),
    "nftables": ("nft_sets_only = true\n", ("nft", "list", "table", "inet", "knockd_fast"),
                 "tcp . {port}"),
}  # fmt: skip


def flood_latency(  # noqa: ANN201
    w: Wire, work: Path, count: int, say, backend: str = "iptables"  # noqa: ANN001
):
    """Genuine knocks into a running top-speed flood, granted by ``backend``."""
    flood = make_pcap.make_flood(1_000_000, 130_000)
    allow = [f"{GENUINE_PORT_BASE + n}/tcp" for n in range(count)]
    grants_extra, list_argv, grant_text = FLOOD_BACKENDS[backend]
    daemon = KnockdFast(w, work, backend=backend, allow=allow, grants_extra=grants_extra)
    plan = work / "genuine.json"
    plan.write_text(json.dumps({
        "key": make_pcap.BENCH_KEY.hex(), "server": SERVER, "client": CLIENT,
        "user": make_pcap.USER_ID, "count": count, "port_base": GENUINE_PORT_BASE,
        "gap": 0.05,
    }))  # fmt: skip
    with daemon:
        daemon.start()
        capture_counters(daemon.pid)
        cpu0 = cpu_seconds(daemon.pid)
        flooder = subprocess.Popen(
            tcpreplay_argv(w, flood.path, "top", loops=8),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2.0)  # preload, then the flood is at full rate
        say(f"flood running; {count} genuine knocks")
        sender = sh("ip", "netns", "exec", w.client, sys.executable, "-c", SENDER, str(plan))
        knocked = json.loads(sender.stdout)
        flood_alive = flooder.poll() is None
        out, err = flooder.communicate(timeout=300)
        if flooder.returncode:
            raise RuntimeError(f"tcpreplay failed: {err.strip()}")
        flood_stats = parse_tcpreplay(out)
        cpu1 = wait_idle(daemon.pid)
        counters = capture_counters(daemon.pid)
        time.sleep(1.0)
        opened: dict[int, float] = {}
        for stamp, line in daemon.log.lines:
            match = re.search(rf"firewall: opened (\d+)/tcp for {re.escape(CLIENT)} ", line)
            if match and int(match.group(1)) not in opened:
                opened[int(match.group(1))] = stamp
        rules = sh("ip", "netns", "exec", w.server, *list_argv).stdout
    latencies = sorted(
        (opened[port] - sent_at) * 1000 for port, sent_at in knocked if port in opened
    )
    decisions = daemon.decisions()
    # Where the time goes, per knock: the kernel's capture time of its last packet (the
    # decision's "time", in ms) and when its decision line and its "opened" line appeared.
    logged = {}
    for stamp, line in daemon.log.lines:
        if line.startswith("{") and '"verdict": "accepted"' in line:
            with contextlib.suppress(ValueError, KeyError):
                decision = json.loads(line)
                captured = datetime.datetime.strptime(
                    decision["time"], "%Y-%m-%dT%H:%M:%S.%fZ"
                ).replace(tzinfo=datetime.UTC)
                logged.setdefault(decision["port"], (captured.timestamp(), stamp))
    stages: dict[str, list[float]] = {"sent_to_captured": [], "captured_to_judged": [],
                                      "judged_to_opened": []}  # fmt: skip
    for port, sent_at in knocked:
        if port in opened and port in logged:
            captured, judged = logged[port]
            stages["sent_to_captured"].append((captured - sent_at) * 1000)
            stages["captured_to_judged"].append((judged - captured) * 1000)
            stages["judged_to_opened"].append((opened[port] - judged) * 1000)
    return {
        "genuine_knocks": count,
        "opened": len(latencies),
        "backend": backend,
        "grants_in_kernel": sum(grant_text.format(port=p) in rules for p, _ in knocked),
        "verdicts": _tally(d.get("verdict") for d in decisions),
        "latency_ms_p50": _percentile(latencies, 50),
        "latency_ms_p99": _percentile(latencies, 99),
        "latency_ms_max": round(latencies[-1], 2) if latencies else None,
        # each stage's p50 and p99 (ms); the capture time has ms resolution
        "latency_stages_ms": {
            stage: [_percentile(values, 50), _percentile(values, 99)]
            for stage, values in stages.items()
        },
        "flood_running_at_last_knock": flood_alive,
        "flood_packets": flood_stats["packets"],
        "flood_pps": round(flood_stats["pps"]),
        "daemon_cpu_seconds": round(cpu1 - cpu0, 3),
        "capture_received": counters["received"],
        "capture_dropped": counters["dropped"],
    }


def interleaved(w: Wire, work: Path, knocks: int, rate: str, say) -> dict[str, object]:  # noqa: ANN001
    """``knocks`` knocks from distinct sources interleaved packet by packet."""
    layout = KnockLayout()
    plan = make_pcap.plan_knocks(knocks, None, background_share=0.0, out_dir=work)
    fast = work / f"interleaved-{knocks}-fast.pcap"
    knockd_pcap = work / f"interleaved-{knocks}-knockd.pcap"
    ports = make_pcap.knock_ports(plan, layout, seed=1)  # dated START_SEC: replay judges
    make_pcap.write_knocks(plan, ports, fast)  # at packet time, which is START_SEC on
    doors = door_sequences(layout)
    make_pcap.write_knocks(plan, knockd_ports(doors, ports), knockd_pcap)
    config = KnockdFast(w, work).config
    exe = knockd_fast_command()
    say(f"knockd-fast replay of {knocks:,} interleaved knocks")
    started = time.perf_counter()
    done = subprocess.run(
        [exe, "replay", "-c", str(config), "--json", str(fast)], capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"knockd-fast replay failed: {done.stderr.strip()}")
    verdicts = _tally(json.loads(line).get("verdict") for line in done.stdout.splitlines())
    say(f"knockd at {rate} pps, same shape")
    knockd_row = measure(Knockd(w, work, doors), w, knockd_pcap, rate)
    return {
        "knocks": knocks,
        "packets": plan.shape.packets,
        "knockd_fast_replay": {"verdicts": verdicts, "seconds": round(seconds, 2)},
        "knockd_live": knockd_row,
    }


def _tally(values) -> dict[str, int]:  # noqa: ANN001
    return dict(collections.Counter(map(str, values)))


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


# --- report --------------------------------------------------------------------------------


def format_sweep(rows: list[dict]) -> str:
    head = (
        f"{'workload':>10} {'rate':>6} {'daemon':>11} {'sent':>9} {'pps':>8} {'CPU s':>6} "
        f"{'us/sent':>8} {'us/read':>8} {'dropped':>9} {'knocks done':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        knocks = f"{r['completed']:,}/{r['expected_knocks']:,}"
        lines.append(
            f"{r['workload']:>10} {r['rate']:>6} {r['daemon']:>11} {r['sent']:>9,} "
            f"{r['replay_pps']:>8,} {r['cpu_seconds']:>6.2f} {r['cpu_us_per_packet']:>8.2f} "
            f"{r['cpu_us_per_packet_read']:>8.2f} {r['capture_dropped']:>9,} {knocks:>15}"
        )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[dict]:
    """knockd's CPU per packet over knockd-fast's, per workload and rate."""
    found = []
    keyed = {(r["workload"], r["rate"], r["daemon"]): r for r in rows}
    for (load, rate, daemon), row in keyed.items():
        other = keyed.get((load, rate, "knockd"))
        if daemon == "knockd-fast" and other and row["cpu_us_per_packet_read"] > 0:
            found.append({
                "workload": load, "rate": rate,
                "knockd_over_knockd_fast": round(
                    other["cpu_us_per_packet_read"] / row["cpu_us_per_packet_read"], 1),
            })  # fmt: skip
    return found


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    knock_rows = [r for r in rows if r["workload"] != "flood"]
    for daemon, marker in (("knockd-fast", "o"), ("knockd", "s")):
        rates = sorted({r["rate"] for r in knock_rows})
        for rate, style in zip(rates, ("-", "--", ":", "-."), strict=False):
            points = sorted(
                (r["sources"], r["cpu_us_per_packet_read"])
                for r in knock_rows
                if r["daemon"] == daemon and r["rate"] == rate
            )
            if points:
                xs, ys = zip(*points, strict=True)
                label = f"{daemon}, {rate}{'' if rate == 'top' else ' pps'}"
                ax.plot(xs, ys, style, marker=marker, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent sources K")
    ax.set_ylabel("daemon CPU µs per packet read (received - dropped)")
    ax.set_title("Live capture on a veth: CPU per packet against concurrent sources")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("all", "sweep", "flood", "interleaved"), default="all",
                        nargs="?")  # fmt: skip
    parser.add_argument("--ks", default=",".join(map(str, SWEEP_KS)))
    parser.add_argument("--rates", default="20000,top", help="pps values and/or 'top'")
    parser.add_argument("--daemons", default="knockd-fast,knockd")
    parser.add_argument("--no-flood", action="store_true", help="sweep: skip the flood workload")
    parser.add_argument("--genuine", type=int, default=100)
    parser.add_argument("--flood-backend", choices=tuple(FLOOD_BACKENDS), default="iptables",
                        help="flood: the backend that grants the genuine knocks")  # fmt: skip
    parser.add_argument("--interleaved", type=int, default=10_000)
    parser.add_argument("--interleaved-rate", default="20000")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for tool in ("tcpreplay", "knockd", "iptables-legacy"):
        if shutil.which(tool) is None:
            print(f"bench-live: {tool} is not installed (make deps)", file=sys.stderr)
            return 1

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    # `kill` and Ctrl-C alike unwind through wire(), which deletes the namespaces.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result: dict[str, object] = {"machine": machine_info()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kf-live-", dir=args.out_dir))
    try:
        with wire() as w:
            if args.what in ("all", "sweep"):
                ks = [int(k) for k in args.ks.split(",")]
                rows = sweep(
                    w,
                    work,
                    ks,
                    args.rates.split(","),
                    args.daemons.split(","),
                    not args.no_flood,
                    say,
                )
                result["sweep"] = rows
                result["ratios"] = ratios(rows)
            if args.what in ("all", "flood"):
                result["flood"] = flood_latency(w, work, args.genuine, say, args.flood_backend)
                say(json.dumps(result["flood"]))
            if args.what in ("all", "interleaved"):
                result["interleaved"] = interleaved(
                    w, work, args.interleaved, args.interleaved_rate, say
                )
                say(json.dumps(result["interleaved"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out_dir / f"live-{args.what}-{stamp}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nresults: {out}")
    if "sweep" in result:
        print(format_sweep(result["sweep"]))
        for r in result["ratios"]:
            print(f"  {r['workload']} at {r['rate']}: knockd needs "
                  f"{r['knockd_over_knockd_fast']}x knockd-fast's CPU per packet read")  # fmt: skip
        png = out.with_suffix(".png")
        if plot(result["sweep"], png):
            print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
