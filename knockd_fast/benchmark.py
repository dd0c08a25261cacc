"""``knockd-fast bench``: synthetic workloads through the real engine and judge, offline.

Each workload is a capture file written by ``workloads`` into a temporary folder (nothing
is sent, no root is needed). Its packets go through libpcap's bare read loop (the capture
limit), then through the engine of the configuration in use, and its completions through
the live path after the engine: a ``Backlog``, ``Judge.judge_slice`` (one replay-cache
transaction per batch, in SQLite on disk, as the daemon keeps it), the decision log
(formatted, written to /dev/null) and a dry-run firewall. Each workload runs in a child
process of its own, so that its peak memory is its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from knock_client.keys import write_key_file
from knock_client.protocol import KnockLayout, Proto

from .config import Config, ConfigError, load_config
from .logs import TurnFlushedHandler

if TYPE_CHECKING:
    from .workloads import CaptureFile, Sealing

@dataclass(frozen=True)
class Workload:
    name: str
    what: str
    make: Callable[[Path, KnockLayout, Sealing, float], CaptureFile]


def _count(base: int, scale: float, least: int = 1) -> int:
    return max(least, round(base * scale))


def _workloads():  # noqa: ANN202 - the module, imported when needed (it brings numpy)
    from . import workloads

    return workloads


WORKLOADS = {
    w.name: w
    for w in (
        Workload(
            "sources", "100,000 concurrent sources, 2 knock ports each, half background",
            lambda d, layout, sealing, scale: _workloads().make_knocks(
                _count(100_000, scale, 2), _count(400_000, scale, 8), layout=layout,
                out_dir=d, sealing=sealing),
        ),
        Workload(
            "flood", "500,000 spoofed SYNs into the knock range from 130,000 sources",
            lambda d, layout, sealing, scale: _workloads().make_flood(
                _count(500_000, scale), _count(130_000, scale), layout=layout, out_dir=d),
        ),
        Workload(
            "genuine", "5,000 genuine knocks at once, half background",
            lambda d, layout, sealing, scale: _workloads().make_knocks(
                _count(5_000, scale), layout=layout, out_dir=d, sealing=sealing),
        ),
        Workload(
            "garbage", "5,000 whole knocks of random bytes behind a valid header",
            lambda d, layout, sealing, scale: _workloads().make_knocks(
                _count(5_000, scale), layout=layout, out_dir=d, sealing=sealing,
                garbage_share=1.0),
        ),
        Workload(
            "mix", "2,000 knocks (half garbage), 50 at a time, in a spoofed flood of 4x their "
            "packets",
            lambda d, layout, sealing, scale: _workloads().make_knocks(
                _count(50, scale), _count(340_000, scale, 1_000), background_share=0.8,
                layout=layout, out_dir=d, sealing=sealing, garbage_share=0.5,
                background="flood"),
        ),
    )
}  # fmt: skip
WORKLOAD_NAMES = tuple(WORKLOADS)


# --- the configuration ----------------------------------------------------------------------

BUILTIN_USER = "bench"


def builtin_config(folder: Path) -> Config:
    """Without ``-c``: the default layout, one user (``workloads.USER_ID``, the benchmark
    key) allowed the port the knocks open, caps high enough for every knock of a workload."""
    workloads = _workloads()
    key_file = write_key_file(folder / "bench.key", workloads.BENCH_KEY)
    path = folder / "bench.toml"
    path.write_text(
        f'[capture]\ninterface = "lo"\n\n[state]\ndirectory = "{folder / "state"}"\n\n'
        f"[[users]]\nid = {workloads.USER_ID}\nname = \"{BUILTIN_USER}\"\n"
        f'key_file = "{key_file}"\nallow = ["{workloads.OPEN_PORT}/tcp"]\n'
        "max_grants = 65536\nmax_knocks_per_minute = 60000\n"
    )
    return load_config(path)


def sealing_of(config: Config) -> Sealing:
    """The knocks of the configuration's first user (lowest id), opening its first allowed
    port: judged as that user's would be."""
    if not config.users:
        raise ConfigError(config.path, "users", "no user to knock as")
    user = config.users[min(config.users)]
    workloads = _workloads()
    port, proto = min(user.allow) if user.allow else (workloads.OPEN_PORT, "tcp")
    return workloads.Sealing(user.key, user.id, port, Proto[proto.upper()])


# --- one workload ---------------------------------------------------------------------------


def _bare_seconds(path: Path) -> float | None:
    try:
        from ._capture_c import bare_dispatch
    except ImportError:  # the pure-Python install has no C loop to compare with
        return None
    return float(bare_dispatch(str(path))[1])


@contextlib.contextmanager
def _decision_log_to_devnull() -> Iterator[TurnFlushedHandler]:
    """The decision log as the daemon writes it (formatted, one record per slice through
    its standard-error handler, written out once per turn), but into /dev/null and not up
    to the terminal. Yields the handler: ``flush_now()`` it where the daemon's turn ends."""
    from .sinks import decisions_log

    with open(os.devnull, "w") as devnull:
        handler = TurnFlushedHandler(devnull.fileno())
        handler.setFormatter(logging.Formatter("%(message)s"))
        saved = decisions_log.handlers[:], decisions_log.propagate, decisions_log.level
        decisions_log.handlers[:] = [handler]
        decisions_log.propagate = False
        decisions_log.setLevel(logging.INFO)
        try:
            yield handler
        finally:
            decisions_log.handlers[:], decisions_log.propagate = saved[0], saved[1]
            decisions_log.setLevel(saved[2])
            handler.close()


def measure(config: Config, shape: CaptureFile, state_dir: Path) -> dict[str, object]:
    """Run one workload's file through the bare loop, the engine and the judge."""
    from ._capture import IMPLEMENTATION, engine_for
    from .firewall.dryrun import DryRunFirewall
    from .judging import MIN_BACKLOG, Backlog, Judge
    from .replay import ReplayCache
    from .sinks import LogSink

    workloads = _workloads()
    path = Path(shape.path)
    bare = _bare_seconds(path)
    engine = engine_for(config, ())  # every destination: the files knock on 192.0.2.1
    engine.open_file(str(path))
    batches = []
    wall, cpu = time.perf_counter(), time.process_time()
    while True:
        count = engine.dispatch()
        batches.append(engine.drain())
        if count == 0:
            break
    capture_wall, capture_cpu = time.perf_counter() - wall, time.process_time() - cpu
    counters = engine.stats()
    engine.close()

    end = workloads.START_SEC + shape.packets / 1e6 + 1  # the packets' clock, past the last
    replay = ReplayCache.for_state_dir(state_dir, workloads.START_SEC, config.knock.window)
    judge = Judge(config, replay)
    backlog = Backlog(MIN_BACKLOG, clock=lambda: end)
    sink = LogSink()
    firewall = DryRunFirewall.from_settings(config.grants)  # the daemon's: logs nothing
    outcomes: Counter[str] = Counter()
    with _decision_log_to_devnull() as log_handler:
        wall, cpu = time.perf_counter(), time.process_time()
        for records in batches:
            if len(records):
                backlog.add(None, records)
            while len(backlog):
                decisions, changes = judge.judge_slice(backlog, None, lambda: end)
                sink.write(decisions)
                firewall.apply_batch(changes)
                outcomes.update(
                    "accepted" if d.verdict == "accepted" else d.reason for d in decisions
                )
                log_handler.flush_now()  # the end of the daemon's turn
        sink.close()
        judge_wall, judge_cpu = time.perf_counter() - wall, time.process_time() - cpu
    replay.close()
    completions = int(counters["completions"])
    accepted = outcomes.pop("accepted", 0)
    packets = int(counters["packets"])
    return {
        "engine": IMPLEMENTATION,
        "packets": packets,
        "bare_seconds": bare,
        "capture_seconds": capture_wall,
        "capture_cpu_seconds": capture_cpu,
        "packets_per_second": packets / capture_wall if capture_wall else None,
        "x_bare": capture_wall / bare if bare else None,
        "cpu_us_per_packet": capture_cpu / packets * 1e6 if packets else None,
        "completions": completions,
        "judge_seconds": judge_wall,
        "judge_cpu_seconds": judge_cpu,
        "completions_per_second": completions / judge_cpu if judge_cpu and completions else None,
        "cpu_us_per_completion": judge_cpu / completions * 1e6 if completions else None,
        "accepted": accepted,
        "accepted_per_second": accepted / judge_cpu if judge_cpu and accepted else None,
        "rejected": dict(outcomes),
        "grants": len(firewall.grants()),
        "counters": {k: int(v) for k, v in counters.items() if not k.startswith("pcap_")},
    }


def _in_child(task: Callable[[], dict[str, object]]) -> dict[str, object]:
    """``task()`` in a forked child (its peak RSS is the workload's own, on top of what the
    parent held at the fork), its result back as JSON."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 0
        try:
            result = task()
            result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            payload = json.dumps({"result": result})
        except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises
            payload, code = json.dumps({"error": f"{type(error).__name__}: {error}"}), 1
        with os.fdopen(write, "w") as out:
            out.write(payload)
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as source:
        text = source.read()
    os.waitpid(pid, 0)
    answer = json.loads(text) if text else {"error": "the child died without an answer"}
    if "error" in answer:
        raise RuntimeError(answer["error"])
    return answer["result"]


# --- the run ---------------------------------------------------------------------------------


class _Bar:
    """One line on a terminal's stderr, redrawn per step; silent elsewhere."""

    def __init__(self, steps: int, enabled: bool) -> None:
        self.steps, self.done, self.enabled = steps, 0, enabled

    def step(self, label: str) -> None:
        if self.enabled:
            filled = 30 * self.done // self.steps
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {label:<40}")
            sys.stderr.flush()
        self.done += 1

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 75 + "\r")
            sys.stderr.flush()


def run(
    config_path: str | None,
    names: Sequence[str] = WORKLOAD_NAMES,
    scale: float = 1.0,
    progress: bool = True,
) -> dict[str, object]:
    """Every workload in ``names``: their files, numbers and the machine, as one dict."""
    from . import __version__
    from .cli import _libpcap_version  # one place reads the version (or its absence)

    rows = []
    with tempfile.TemporaryDirectory(prefix="knockd-fast-bench-") as folder:
        work = Path(folder)
        os.chmod(work, 0o700)
        config = load_config(config_path) if config_path else builtin_config(work)
        sealing = sealing_of(config)
        bar = _Bar(2 * len(names), progress and sys.stderr.isatty())
        try:
            for name in names:
                workload = WORKLOADS[name]
                bar.step(f"{name}: writing its packets")
                shape = workload.make(work, config.knock.layout, sealing, scale)
                bar.step(f"{name}: capture and judging")
                state = work / f"state-{name}"
                state.mkdir(mode=0o700)
                result = _in_child(lambda shape=shape, state=state: measure(config, shape, state))
                rows.append({"workload": name, "what": workload.what, "file": {
                    "packets": shape.packets, "knock_packets": shape.knock_packets,
                    "knocks": shape.knocks, "complete_knocks": shape.complete_knocks,
                    "garbage_knocks": shape.extra.get("complete_garbage_knocks", 0),
                    "bytes": Path(shape.path).stat().st_size}, **result})  # fmt: skip
                Path(shape.path).unlink()
        finally:
            bar.close()
    return {
        "knockd_fast": __version__,
        "config": str(config.path) if config_path else None,
        "users": sorted(config.users),
        "table_size": config.capture.table_size,
        "layout": {"base_port": config.knock.layout.base_port,
                   "digit_bits": config.knock.layout.digit_bits},  # fmt: skip
        "scale": scale,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "python": sys.version.split()[0],
            "libpcap": _libpcap_version(),
        },
        "workloads": rows,
    }


def cpu_model() -> str | None:
    """The CPU's model name, from /proc/cpuinfo (None where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


# --- output ----------------------------------------------------------------------------------


def _number(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = (
    ("workload", "<8", lambda r: r["workload"]),
    ("packets", ">9", lambda r: _number(r["packets"], ",")),
    ("Mpps", ">6", lambda r: _number(r["packets_per_second"] and r["packets_per_second"] / 1e6,
                                     ".2f")),  # fmt: skip
    ("x bare", ">6", lambda r: _number(r["x_bare"], ".2f")),
    ("µs/pkt", ">6", lambda r: _number(r["cpu_us_per_packet"], ".3f")),
    ("compl.", ">7", lambda r: _number(r["completions"], ",")),
    ("judged/s", ">9", lambda r: _number(r["completions_per_second"], ",.0f")),
    ("µs/compl", ">8", lambda r: _number(r["cpu_us_per_completion"], ".1f")),
    ("accepted", ">8", lambda r: _number(r["accepted"], ",")),
    ("accepted/s", ">10", lambda r: _number(r["accepted_per_second"], ",.0f")),
    ("peak MiB", ">8", lambda r: _number(r["peak_rss_mib"], ".0f")),
)


def format_report(report: dict[str, object]) -> str:
    machine = report["machine"]
    lines = [
        f"knockd-fast {report['knockd_fast']} bench: {machine['cpus']} CPUs "
        f"({machine['cpu_model']}), Python {machine['python']}, {machine['libpcap']}",
        f"config: {report['config'] or 'built in (one user, default layout)'}; "
        f"table {report['table_size']:,} sources; scale {report['scale']:g}",
        "",
        " ".join(f"{title:{align}}" for title, align, _ in COLUMNS),
    ]
    for row in report["workloads"]:
        lines.append(" ".join(f"{cell(row):{align}}" for _, align, cell in COLUMNS))
    lines.append("")
    for row in report["workloads"]:
        rejected = ", ".join(f"{reason} {n:,}" for reason, n in sorted(row["rejected"].items()))
        scaled = "" if report["scale"] == 1 else f" (x{report['scale']:g})"
        lines.append(f"  {row['workload']}: {row['what']}{scaled}; rejected: {rejected or 'none'}")
    lines += [
        "",
        "x bare: the engine's time over libpcap's bare read loop on the same file; µs/pkt: "
        "CPU per packet read; judged/s, µs/compl: the judge's CPU per completion (verdict, "
        "replay cache, decision log, firewall hand-over); accepted/s: accepted knocks per "
        "second of that CPU; peak MiB: the workload's process.",
    ]
    return "\n".join(lines)


def plot_report(report: dict[str, object], path: Path) -> None:
    """Two panels: ns per packet (engine, bare loop) and µs per completion, per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["workloads"]
    names = [r["workload"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    positions = range(len(rows))
    engine = [r["capture_seconds"] / r["packets"] * 1e9 for r in rows]
    bare = [(r["bare_seconds"] or 0) / r["packets"] * 1e9 for r in rows]
    left.bar([p - 0.2 for p in positions], bare, 0.4, label="libpcap bare loop")
    left.bar([p + 0.2 for p in positions], engine, 0.4, label=f"{rows[0]['engine']} engine")
    left.set_ylabel("ns per packet")
    left.legend(fontsize=8)
    judged = [r["cpu_us_per_completion"] or 0 for r in rows]
    right.bar(list(positions), judged, 0.5, color="tab:green")
    right.set_ylabel("µs of CPU per completion judged")
    for axis in (left, right):
        axis.set_xticks(list(positions), names)
        axis.grid(True, axis="y", alpha=0.3)
    machine = report["machine"]
    fig.suptitle(f"knockd-fast bench: {machine['cpus']} CPUs {machine['cpu_model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
