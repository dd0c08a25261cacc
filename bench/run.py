#!/usr/bin/env python3
"""Packets per second of the capture engines over the same capture files (bench/README.md).

Engines, each timed with the file already in the page cache:

``bare``    ``knockd_fast._capture_c.bare_dispatch(path)``: libpcap's dispatch loop over the
            file with a C callback that only counts: the capture limit.
``c-reference``  bench/c_reference.c, built here with the system's C compiler: a minimal
            hand-written C knock collector (IPv4 SYNs, one 64-byte slot per source in an
            open-addressing table): what the essential work costs in plain C.
``cython``  ``knockd_fast._capture_c.CaptureEngine``: the dispatch()/drain() loop until
            dispatch returns 0, timed with time.perf_counter (engine set-up and open_file
            are not timed).
``python``  ``knockd_fast._capture_py.CaptureEngine``, the same loop, over the first
            ``--pure-packets`` packets of the file (a prefix, never extrapolated);
            ``cython`` is timed over the same prefix too (row ``cython@prefix``), so the
            speedup compares identical packets.

Runs are interleaved (every engine once per round, the order rotating) so that they share
the machine's noise; the table quotes medians. Sub-commands:

    run.py flood    the flood file (1M SYNs from 130k sources)
    run.py knocks   a knocks file (K concurrent knockers, 50% background)
    run.py sweep    knocks files for K = 10 .. 1M at a fixed packet count, plus a PNG plot
    run.py file P   any Ethernet/cooked/raw capture file P

A benchmark never fails on time: it fails only when an engine raises.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knock_client.protocol import KnockLayout
from knockd_fast.benchmark import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_pcap  # noqa: E402  (bench/ is not a package)
from make_pcap import RESULTS_DIR, CaptureFile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("bare", "c-reference", "cython", "python")
C_REFERENCE_SOURCE = Path(__file__).resolve().parent / "c_reference.c"
DEFAULT_CAPACITY = 65_536
SWEEP_CAPACITY = 1_048_576
SWEEP_KS = (10, 100, 1_000, 10_000, 100_000, 1_000_000)


@dataclass(frozen=True)
class Settings:
    runs: int = 5
    capacity: int = DEFAULT_CAPACITY
    pure_packets: int = 200_000  # prefix the pure twin reads (0: the whole file)
    engines: tuple[str, ...] = ENGINES
    knock_timeout: float = 10.0

    def as_json(self) -> dict[str, object]:
        return {
            "runs": self.runs,
            "capacity": self.capacity,
            "pure_packets": self.pure_packets,
            "engines": list(self.engines),
            "knock_timeout": self.knock_timeout,
        }


# --- engines --------------------------------------------------------------------------------


def engine_availability() -> dict[str, str | None]:
    """Engine name -> None if it can run here, else the reason it cannot."""
    reasons: dict[str, str | None] = {}
    try:
        from knockd_fast import _capture_c
    except ImportError as error:
        reasons["bare"] = reasons["cython"] = f"knockd_fast._capture_c not importable: {error}"
    else:
        reasons["bare"] = (
            None if hasattr(_capture_c, "bare_dispatch") else "_capture_c has no bare_dispatch"
        )
        reasons["cython"] = (
            None if hasattr(_capture_c, "CaptureEngine") else "_capture_c has no CaptureEngine"
        )
    reasons["c-reference"] = c_reference_binary()[1]
    try:
        from knockd_fast import _capture_py  # noqa: F401
    except ImportError as error:
        reasons["python"] = f"knockd_fast._capture_py not importable: {error}"
    else:
        reasons["python"] = None
    return reasons


@functools.cache  # built once per process
def c_reference_binary() -> tuple[Path | None, str | None]:
    """(the C reference's executable, None), built on first use next to the results and
    named by its source's hash, or (None, why it cannot be built)."""
    digest = hashlib.sha256(C_REFERENCE_SOURCE.read_bytes()).hexdigest()[:12]
    binary = RESULTS_DIR / ".build" / f"c_reference-{digest}"
    outcome: tuple[Path | None, str | None] = (binary, None)
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        try:
            flags = subprocess.run(
                ["pkg-config", "--cflags", "--libs", "libpcap"],
                capture_output=True, text=True, check=True,
            ).stdout.split()
            built = subprocess.run(
                [os.environ.get("CC", "cc"), "-O2", "-o", str(binary), str(C_REFERENCE_SOURCE),
                 *flags],
                capture_output=True, text=True,
            )
        except (OSError, subprocess.CalledProcessError) as error:
            outcome = (None, f"cannot build bench/c_reference.c: {error}")
        else:
            if built.returncode != 0:
                outcome = (None, f"cannot build bench/c_reference.c: {built.stderr.strip()}")
    return outcome


def run_c_reference(path: Path) -> dict[str, object]:
    binary, why = c_reference_binary()
    if binary is None:
        raise RuntimeError(why)
    out = subprocess.run([str(binary), str(path)], capture_output=True, text=True, check=True)
    packets, seconds, knock_packets, completions, evictions = out.stdout.split()
    return {
        "packets": int(packets),
        "seconds": float(seconds),
        "counters": {
            "knock_packets": int(knock_packets),
            "completions": int(completions),
            "evictions": int(evictions),
        },
    }


def _engine_class(name: str) -> type:
    if name == "cython":
        from knockd_fast._capture_c import CaptureEngine
    else:
        from knockd_fast._capture_py import CaptureEngine
    return CaptureEngine


def run_bare(path: Path) -> dict[str, object]:
    from knockd_fast._capture_c import bare_dispatch

    packets, seconds = bare_dispatch(str(path))
    return {"packets": int(packets), "seconds": float(seconds), "counters": {}}


def run_engine(
    name: str,
    path: Path,
    layout: KnockLayout,
    settings: Settings,
    max_packets: int = 0,
) -> dict[str, object]:
    """One timed pass of engine ``name`` over ``path`` (its first ``max_packets`` if > 0)."""
    engine = _engine_class(name)(
        layout, knock_timeout=settings.knock_timeout, capacity=settings.capacity
    )
    try:
        engine.open_file(str(path))
        completions = 0
        read = 0
        if max_packets > 0:
            start = time.perf_counter()
            while read < max_packets:
                n = engine.dispatch(max_packets - read)
                completions += len(engine.drain())
                if n == 0:
                    break
                read += n
            seconds = time.perf_counter() - start
        else:
            start = time.perf_counter()
            while True:
                n = engine.dispatch()
                completions += len(engine.drain())
                if n == 0:
                    break
                read += n
            seconds = time.perf_counter() - start
        counters = {k: int(v) for k, v in engine.stats().items()}
    finally:
        engine.close()
    counters["drained"] = completions
    return {"packets": read, "seconds": seconds, "counters": counters}


def _count_packets(path: Path, available: dict[str, str | None]) -> int:
    if available["bare"] is None:
        return int(run_bare(path)["packets"])
    from knockd_fast.pcapfile import CaptureReader

    with CaptureReader(path) as reader:
        return sum(1 for _ in reader)


def _warm(path: Path) -> None:
    """Read the file once so every engine finds it in the page cache."""
    with open(path, "rb") as handle:
        while handle.read(8 << 20):
            pass


# --- one file -------------------------------------------------------------------------------


@dataclass
class _FilePlan:
    path: Path
    shape: CaptureFile | None
    rows: list[tuple[str, str, int]]  # (row name, engine, max packets or 0)
    skipped: dict[str, str | None]
    prefix: int


def _plan_file(capture: CaptureFile | Path, settings: Settings) -> _FilePlan:
    shape = capture if isinstance(capture, CaptureFile) else None
    path = Path(capture.path if shape else capture)
    available = engine_availability()
    wanted = [e for e in settings.engines if e in ENGINES]
    skipped = {e: available[e] for e in wanted if available[e] is not None}
    file_packets = shape.packets if shape else _count_packets(path, available)
    prefix = settings.pure_packets
    if prefix <= 0 or prefix >= file_packets:
        prefix = 0  # the whole file
    rows: list[tuple[str, str, int]] = []
    for engine in wanted:
        if engine in skipped:
            continue
        if engine == "python":
            rows.append(("python" if prefix == 0 else "python@prefix", "python", prefix))
        else:
            rows.append((engine, engine, 0))
            if engine == "cython" and prefix and "python" in wanted and not skipped.get("python"):
                rows.append(("cython@prefix", "cython", prefix))
    return _FilePlan(path, shape, rows, skipped, prefix)


def bench_files(
    captures: Sequence[CaptureFile | Path],
    settings: Settings,
    layout: KnockLayout | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, object]]:
    """Run every available engine ``settings.runs`` times over each file; medians and checks.

    Round r runs every (file, engine) pair once, the engine order rotating, so that the
    machine's noise is shared by all engines and all files.
    """
    layout = layout or KnockLayout()
    plans = [_plan_file(c, settings) for c in captures]
    for plan in plans:
        _warm(plan.path)
    raw = [{row: [] for row, _, _ in plan.rows} for plan in plans]
    for run in range(settings.runs):
        for plan, results in zip(plans, raw, strict=True):
            shift = run % max(1, len(plan.rows))
            for row, engine, limit in plan.rows[shift:] + plan.rows[:shift]:
                if engine == "bare":
                    result = run_bare(plan.path)
                elif engine == "c-reference":
                    result = run_c_reference(plan.path)
                else:
                    result = run_engine(engine, plan.path, layout, settings, limit)
                results[row].append(result)
                if progress:
                    progress(f"{plan.path.name} {row} run {run + 1}")
    return [
        _summarise(p.path, p.shape, settings, p.rows, r, p.skipped, p.prefix)
        for p, r in zip(plans, raw, strict=True)
    ]


def bench_file(
    capture: CaptureFile | Path,
    settings: Settings,
    layout: KnockLayout | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """``bench_files`` for one file."""
    return bench_files([capture], settings, layout, progress)[0]


def _summarise(
    path: Path,
    shape: CaptureFile | None,
    settings: Settings,
    rows: Sequence[tuple[str, str, int]],
    raw: dict[str, list[dict[str, object]]],
    skipped: dict[str, str | None],
    prefix: int,
) -> dict[str, object]:
    engines: dict[str, dict[str, object]] = {}
    for row, engine, limit in rows:
        results = raw[row]
        packets = int(results[0]["packets"])
        times = [float(r["seconds"]) for r in results]
        median = statistics.median(times)
        counters = results[0]["counters"]
        engines[row] = {
            "engine": engine,
            "packets": packets,
            "prefix": limit or None,
            "seconds": times,
            "median_seconds": median,
            "mpps": packets / median / 1e6 if median > 0 else None,
            "ns_per_packet": median / packets * 1e9 if packets else None,
            "counters": counters,
            "counters_stable": all(r["counters"] == counters for r in results),
        }
    bare = engines.get("bare", {}).get("ns_per_packet")
    for entry in engines.values():
        ns = entry["ns_per_packet"]
        entry["x_bare"] = ns / bare if bare and ns else None
    summary: dict[str, object] = {
        "file": str(path),
        "shape": shape.as_json() if shape else {"bytes": path.stat().st_size},
        "engines": engines,
        "skipped": {k: v for k, v in skipped.items() if v},
        "prefix_packets": prefix or None,
    }
    py = engines.get("python@prefix") or engines.get("python")
    cy = engines.get("cython@prefix") or engines.get("cython")
    if py and cy:
        summary["speedup_cython_vs_python"] = py["ns_per_packet"] / cy["ns_per_packet"]
        a = {k: v for k, v in cy["counters"].items() if not k.startswith("pcap_")}
        b = {k: v for k, v in py["counters"].items() if not k.startswith("pcap_")}
        summary["counters_agree"] = a == b
        summary["counter_differences"] = {
            k: [a.get(k), b.get(k)] for k in a if a.get(k) != b.get(k)
        }
    else:
        summary["speedup_cython_vs_python"] = None
        summary["counters_agree"] = None
    summary["sanity"] = _sanity(shape, engines, settings)
    return summary


def _sanity(
    shape: CaptureFile | None, engines: dict[str, dict[str, object]], settings: Settings
) -> dict[str, object]:
    """What the full-file engine counted against what the file holds."""
    full = engines.get("cython") or engines.get("python")
    if shape is None or full is None or full["prefix"]:
        return {}
    counters = full["counters"]
    checks: dict[str, object] = {
        "packets": [counters["packets"], shape.packets],
        "knock_packets": [counters["knock_packets"], shape.knock_packets],
    }
    if shape.kind == "knocks" and shape.lanes <= settings.capacity:
        checks["completions"] = [counters["completions"], shape.complete_knocks]
    checks["ok"] = all(a == b for a, b in checks.values())
    return checks


# --- output ---------------------------------------------------------------------------------


def machine_info() -> dict[str, object]:
    info: dict[str, object] = {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "numpy": np.__version__,
        "kernel": platform.release(),
        "loadavg": list(os.getloadavg()),
        "hostname": platform.node(),
    }
    try:
        from knockd_fast._capture_c import libpcap_version

        info["libpcap"] = libpcap_version()
    except ImportError:
        info["libpcap"] = None
    info["git_commit"] = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")
    info["git_dirty"] = bool(status) if status is not None else None
    return info


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def write_json(name: str, result: dict[str, object], out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{result['timestamp']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(files: Iterable[dict[str, object]]) -> str:
    header = (
        f"{'file':<46} {'engine':<14} {'packets':>9} {'Mpps':>7} {'ns/pkt':>8} "
        f"{'x bare':>7} {'cy/py':>6} {'compl.':>7} {'evict.':>7} {'expired':>7}"
    )
    lines = [header, "-" * len(header)]
    for summary in files:
        name = Path(str(summary["file"])).name
        for row, entry in summary["engines"].items():
            counters = entry["counters"]
            speedup = summary["speedup_cython_vs_python"] if row.startswith("python") else None
            lines.append(
                f"{name[:46]:<46} {row:<14} {entry['packets']:>9} {_fmt(entry['mpps'], '.3f'):>7} "
                f"{_fmt(entry['ns_per_packet'], '.1f'):>8} {_fmt(entry['x_bare'], '.2f'):>7} "
                f"{_fmt(speedup, '.0f'):>6} {_fmt(counters.get('completions'), 'd'):>7} "
                f"{_fmt(counters.get('evictions'), 'd'):>7} {_fmt(counters.get('expired'), 'd'):>7}"
            )
        notes = []
        engines = summary["engines"]
        if "cython" in engines and "c-reference" in engines:
            ratio = engines["cython"]["ns_per_packet"] / engines["c-reference"]["ns_per_packet"]
            notes.append(f"cython costs {ratio:.2f}x the minimal C reference per packet")
        for engine, reason in summary["skipped"].items():
            notes.append(f"{engine} skipped: {reason}")
        if summary.get("counters_agree") is not None:
            agree = "agree" if summary["counters_agree"] else "DISAGREE"
            notes.append(f"cython/python counters on the prefix {agree}")
            if not summary["counters_agree"]:
                notes.append(f"differences: {summary['counter_differences']}")
        sanity = summary.get("sanity") or {}
        if sanity:
            checks = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in sanity.items() if k != "ok")
            notes.append(f"{'sanity ok' if sanity['ok'] else 'SANITY FAILED'}: {checks}")
        for note in notes:
            lines.append(f"  {note}")
    return "\n".join(lines)


class Progress:
    """tqdm on stderr if installed, else a plain one-line bar."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.done, self.quiet = total, 0, quiet
        self._bar = None
        if quiet:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)

    def __call__(self, label: str) -> None:
        self.done += 1
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label[-60:], refresh=False)
            self._bar.update(1)
            return
        width = 30
        filled = width * self.done // max(1, self.total)
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {label[-50:]:<50}")
        sys.stderr.flush()

    def note(self, text: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            sys.stderr.write(f"\r{text}\n")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self.quiet:
            sys.stderr.write("\n")


def _steps(settings: Settings, files: int) -> int:
    available = engine_availability()
    rows = sum(1 for e in settings.engines if available.get(e) is None)
    if (
        "cython" in settings.engines
        and available.get("cython") is None
        and ("python" in settings.engines and available.get("python") is None)
    ):
        rows += 1  # cython@prefix
    return files * settings.runs * rows


def _result(name: str, settings: Settings, extra: dict[str, object]) -> dict[str, object]:
    return {
        "name": name,
        "timestamp": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "machine": machine_info(),
        "engines_available": engine_availability(),
        "settings": settings.as_json(),
        **extra,
    }


# --- benchmarks -----------------------------------------------------------------------------


def bench_captures(
    name: str,
    captures: Sequence[CaptureFile | Path],
    settings: Settings,
    out_dir: Path = RESULTS_DIR,
    quiet: bool = False,
    extra: dict[str, object] | None = None,
) -> tuple[dict[str, object], Path]:
    """Benchmark files, write <out_dir>/<name>-<timestamp>.json; returns (result, path)."""
    progress = Progress(_steps(settings, len(captures)), quiet)
    try:
        files = bench_files(captures, settings, progress=progress)
    finally:
        progress.close()
    result = _result(name, settings, {**(extra or {}), "files": files})
    return result, write_json(name, result, out_dir)


def bench_sweep(
    ks: Sequence[int],
    packets: int,
    settings: Settings,
    background_share: float = 0.5,
    seed: int = 1,
    out_dir: Path = RESULTS_DIR,
    data_dir: Path = RESULTS_DIR,
    quiet: bool = False,
    plot: bool = True,
) -> tuple[dict[str, object], Path, Path | None]:
    """ns/packet against concurrent knockers K; JSON and (if matplotlib) a PNG plot."""
    progress = Progress(_steps(settings, len(ks)) + len(ks), quiet)
    try:
        captures = []
        for k in ks:
            path = make_pcap.knocks_path(k, packets, background_share, seed=seed, out_dir=data_dir)
            if not path.exists():
                progress.note(f"writing {path.name} ...")
            captures.append(
                make_pcap.make_knocks(k, packets, background_share, seed=seed, out_dir=data_dir)
            )
            progress(f"file K={k}")
        files = bench_files(captures, settings, progress=progress)
        for k, summary in zip(ks, files, strict=True):
            summary["k"] = k
    finally:
        progress.close()
    extra = {
        "sweep": {"ks": list(ks), "packets_per_file": packets, "background_share": background_share}
    }
    result = _result("sweep", settings, {**extra, "files": files})
    json_path = write_json("sweep", result, out_dir)
    png_path = None
    if plot:
        png_path = out_dir / f"sweep-{result['timestamp']}.png"
        if not plot_sweep(result, png_path):
            png_path = None
    return result, json_path, png_path


def pyplot():  # noqa: ANN201
    """matplotlib's pyplot on the file-only Agg backend, or None (said on stderr) when
    matplotlib is not installed: the benchmarks then write their JSON without a plot."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (make bench-tools)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(result: dict[str, object], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False

    files = result["files"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    series = [
        ("bare", "bare libpcap loop", "o-"),
        ("c-reference", "minimal C reference", "d--"),
        ("cython", "Cython engine", "s-"),
        ("python@prefix", "pure-Python twin (prefix)", "^-"),
        ("python", "pure-Python twin", "^-"),
    ]
    for row, label, style in series:
        xs, ys, low, high = [], [], [], []
        for f in files:
            entry = f["engines"].get(row)
            if entry is None:
                continue
            per_packet = [t / entry["packets"] * 1e9 for t in entry["seconds"]]
            xs.append(f["k"])
            ys.append(entry["ns_per_packet"])
            low.append(entry["ns_per_packet"] - min(per_packet))
            high.append(max(per_packet) - entry["ns_per_packet"])
        if xs:  # the bars span the fastest and the slowest run
            ax.errorbar(xs, ys, yerr=[low, high], fmt=style, capsize=3, label=label)
    for f in files:
        if "bare" in f["engines"] and f.get("shape", {}).get("extra"):
            ports = f["shape"]["extra"]["ports_per_knock_max"]
            whole = f["shape"]["complete_knocks"] == f["shape"]["knocks"]
            ax.annotate(
                "whole knocks" if whole else f"{ports} port{'s' if ports > 1 else ''}/source",
                (f["k"], f["engines"]["bare"]["ns_per_packet"]),
                textcoords="offset points",
                xytext=(0, -14),
                ha="center",
                fontsize=7,
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent knocking sources K (log)")
    ax.set_ylabel("ns per packet: median, bars min..max of the runs (log)")
    machine = result["machine"]
    settings = result["settings"]
    sweep = result["sweep"]
    ax.set_title(
        f"knockd-fast capture cost vs table occupancy\n"
        f"{sweep['packets_per_file']:,} packets/file, capacity {settings['capacity']:,}, "
        f"{settings['runs']} runs, {machine['nproc']} CPUs {machine['cpu_model']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


# --- command line ---------------------------------------------------------------------------

QUICK = {
    "runs": 3,
    "pure_packets": 20_000,
    "flood_packets": 100_000,
    "flood_sources": 13_000,
    "knock_sources": 1_000,
    "sweep_ks": (10, 1_000, 100_000),
    "sweep_packets": 200_000,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("flood", "knocks", "sweep", "file"))
    parser.add_argument("pcap", nargs="?", type=Path, help="for `file`: the capture file")
    parser.add_argument("--quick", action="store_true", help="small files, 3 runs: a smoke run")
    parser.add_argument("--runs", type=int, help="runs per engine (default 5; quick 3)")
    parser.add_argument(
        "--capacity", type=int, help="engine table slots (default 65536; sweep 1048576)"
    )
    parser.add_argument(
        "--pure-packets",
        type=int,
        help="prefix of each file the pure twin reads (default 200000; quick 20000; 0 = all)",
    )
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset")
    parser.add_argument("--packets", type=int, help="flood: SYNs; sweep: packets per file")
    parser.add_argument("--sources", type=int, help="flood: source addresses; knocks: K")
    parser.add_argument("--ks", help="sweep: comma-separated K values (default 10,...,1000000)")
    parser.add_argument("--background-share", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    quick = QUICK if args.quick else {}
    default_capacity = SWEEP_CAPACITY if args.what == "sweep" else DEFAULT_CAPACITY
    settings = Settings(
        runs=args.runs or quick.get("runs", 5),
        capacity=args.capacity or default_capacity,
        pure_packets=args.pure_packets
        if args.pure_packets is not None
        else quick.get("pure_packets", 200_000),
        engines=tuple(e for e in args.engines.split(",") if e),
    )
    unknown = set(settings.engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines: {', '.join(sorted(unknown))}")
    name = f"{args.what}-quick" if args.quick else args.what
    png = None
    if args.what == "sweep":
        ks = (
            tuple(int(k) for k in args.ks.split(","))
            if args.ks
            else quick.get("sweep_ks", SWEEP_KS)
        )
        packets = args.packets or quick.get("sweep_packets", 2_000_000)
        result, path, png = bench_sweep(
            ks,
            packets,
            settings,
            args.background_share,
            args.seed,
            args.out_dir,
            quiet=args.quiet,
        )
    else:
        if args.what == "flood":
            capture: CaptureFile | Path = make_pcap.make_flood(
                args.packets or quick.get("flood_packets", 1_000_000),
                args.sources or quick.get("flood_sources", 130_000),
                args.seed,
            )
        elif args.what == "knocks":
            capture = make_pcap.make_knocks(
                args.sources or quick.get("knock_sources", 10_000),
                args.packets,
                args.background_share,
                seed=args.seed,
            )
        else:
            if args.pcap is None:
                parser.error("`file` needs a capture file")
            capture = args.pcap
        result, path = bench_captures(name, [capture], settings, args.out_dir, args.quiet)
    print(_header(result))
    print(format_table(result["files"]))
    print(f"results: {path}")
    if png:
        print(f"plot:    {png}")
    return 0


def _header(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    dirty = "+dirty" if m["git_dirty"] else ""
    pure = f"the first {s['pure_packets']:,} packets" if s["pure_packets"] else "whole files"
    return (
        f"{result['name']} {result['timestamp']}: {m['nproc']} CPUs ({m['cpu_model']}), "
        f"Python {m['python']}, numpy {m['numpy']}, {m['libpcap']}, "
        f"commit {str(m['git_commit'])[:10]}{dirty}\n"
        f"median of {s['runs']} runs, capacity {s['capacity']:,}, pure twin on {pure}"
    )


if __name__ == "__main__":
    sys.exit(main())
