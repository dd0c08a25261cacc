"""bench/ still runs: tiny capture files, one run per engine, JSON written, engines agree.

No timing is ever asserted: a benchmark does not fail on time.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str, filename: str):  # noqa: ANN202
    # bench/ is a folder of scripts, not a package: load them under unambiguous names.
    spec = importlib.util.spec_from_file_location(name, BENCH / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


run = _load("knockd_fast_bench_run", "run.py")
make_pcap = sys.modules["make_pcap"]  # the generator run.py imported

AVAILABLE = run.engine_availability()
CYTHON_MISSING = AVAILABLE["cython"] or AVAILABLE["bare"]
RESULT_KEYS = {"name", "timestamp", "machine", "engines_available", "settings", "files"}
MACHINE_KEYS = {"nproc", "cpu_model", "python", "numpy", "libpcap", "git_commit"}
ENGINE_KEYS = {"engine", "packets", "seconds", "median_seconds", "mpps", "ns_per_packet"}


@pytest.fixture(scope="module")
def captures(tmp_path_factory: pytest.TempPathFactory) -> list[make_pcap.CaptureFile]:
    out = tmp_path_factory.mktemp("bench")
    return [
        make_pcap.make_knocks(20, out_dir=out),
        make_pcap.make_knocks(20, ipv6_share=0.5, out_dir=out),
        make_pcap.make_flood(2_000, 300, out_dir=out),
    ]


def test_files_are_deterministic(captures: list[make_pcap.CaptureFile], tmp_path: Path) -> None:
    again = make_pcap.make_knocks(20, out_dir=tmp_path)
    assert again.path.read_bytes() == captures[0].path.read_bytes()
    assert captures[0].packets == 2 * captures[0].knock_packets == 2 * 20 * 34
    assert captures[1].extra["ipv6_knocks"] > 0


def test_packets_option_sets_the_file_size() -> None:
    rounds = make_pcap.plan_knocks(10, packets=2_000).shape
    assert (rounds.packets, rounds.lanes, rounds.knocks) == (2_000, 10, 29)
    partial = make_pcap.plan_knocks(1_000, packets=4_000).shape
    assert partial.complete_knocks == 0 and partial.knock_packets == 2_000


def _bench(captures: list[make_pcap.CaptureFile], engines: tuple[str, ...], out: Path) -> dict:
    settings = run.Settings(runs=1, pure_packets=0, engines=engines)
    result, path = run.bench_captures("smoke", captures, settings, out, quiet=True)
    assert path.exists()
    written = json.loads(path.read_text())
    assert RESULT_KEYS <= written.keys()
    assert MACHINE_KEYS <= written["machine"].keys()
    assert len(written["files"]) == len(captures)
    for summary in written["files"]:
        for entry in summary["engines"].values():
            assert ENGINE_KEYS <= entry.keys()
            assert len(entry["seconds"]) == 1
    return written


def test_pure_twin_counts_every_knock(
    captures: list[make_pcap.CaptureFile], tmp_path: Path
) -> None:
    if AVAILABLE["python"]:
        pytest.skip(AVAILABLE["python"])
    written = _bench(captures, ("python",), tmp_path)
    for capture, summary in zip(captures, written["files"], strict=True):
        counters = summary["engines"]["python"]["counters"]
        assert summary["sanity"]["ok"], summary["sanity"]
        assert counters["completions"] == capture.complete_knocks
        assert counters["ignored"] == capture.background_packets


@pytest.mark.skipif(
    bool(CYTHON_MISSING), reason=f"Cython engine not available yet: {CYTHON_MISSING}"
)
def test_cython_and_pure_twin_agree(captures: list[make_pcap.CaptureFile], tmp_path: Path) -> None:
    if AVAILABLE["python"]:
        pytest.skip(AVAILABLE["python"])
    written = _bench(captures, run.ENGINES, tmp_path)
    for capture, summary in zip(captures, written["files"], strict=True):
        engines = summary["engines"]
        assert set(engines) == {"bare", "c-reference", "cython", "python"}
        assert engines["bare"]["packets"] == capture.packets
        assert engines["c-reference"]["packets"] == capture.packets
        assert engines["cython"]["counters"]["completions"] == capture.complete_knocks
        assert summary["counters_agree"], summary["counter_differences"]
    ipv4_knocks, _, flood = written["files"]
    # The C reference reads IPv4 SYN digits: every knock of the IPv4 file, every flood SYN.
    assert ipv4_knocks["engines"]["c-reference"]["counters"]["completions"] == 20
    assert flood["engines"]["c-reference"]["counters"]["knock_packets"] == 2_000
    table = run.format_table(written["files"])
    assert "cython" in table and "python" in table
    assert "the minimal C reference" in table


def test_sweep_writes_json_and_plot(tmp_path: Path) -> None:
    engines = tuple(e for e in run.ENGINES if not AVAILABLE[e])
    if not engines:
        pytest.skip("no capture engine available")
    settings = run.Settings(runs=1, capacity=4096, pure_packets=500, engines=engines)
    result, json_path, png = run.bench_sweep(
        (10, 1_000), 3_000, settings, out_dir=tmp_path, data_dir=tmp_path, quiet=True
    )
    written = json.loads(json_path.read_text())
    assert [f["k"] for f in written["files"]] == [10, 1_000]
    assert written["sweep"]["packets_per_file"] == 3_000
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert png is None
    else:
        assert png is not None and png.stat().st_size > 0


@pytest.mark.skipif(bool(CYTHON_MISSING), reason="the poisoning benchmark runs the Cython engine")
def test_poison_benchmark_runs_and_writes_its_curve(tmp_path: Path) -> None:
    poison = _load("knockd_fast_bench_poison", "poison.py")
    assert poison.main(["--ks", "0,3", "--trials", "3", "--out", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("poison-*.json")
    rows = json.loads(written.read_text())["rows"]
    groupings, strategies = ("address+port", "address"), ("spread", "segment")
    assert {(r["group_by"], r["strategy"], r["k"]) for r in rows} == {
        (g, s, k) for g in groupings for s in strategies for k in (0, 3)
    }
    # Unattacked knocks are accepted; three blind packets cannot touch one grouped by port.
    assert all(r["accepted"] == 3 for r in rows if r["k"] == 0 or r["group_by"] == "address+port")


def test_backlog_benchmark_runs_and_fairness_shows(tmp_path: Path) -> None:
    """The simulation at a small scale (virtual time: no timing involved): at twice the
    judging capacity, from one host, the fair backlog accepts every genuine knock and the
    first-come one loses some; spoofed from everywhere, both keep about half."""
    backlog = _load("knockd_fast_bench_backlog", "backlog.py")
    rows = {
        (policy, sources): backlog.simulate(
            tmp_path, policy, sources, rate=2.0, seconds=2.0, per_second=2_000.0, limit=512
        )
        for policy in backlog.POLICIES
        for sources in ("one host", "everywhere")
    }
    assert all(row["genuine"] == 41 for row in rows.values())  # 20 a second, both ends
    assert rows["fair", "one host"]["accepted"] == 41
    assert rows["fifo", "one host"]["accepted"] < 30
    assert 8 < rows["fair", "everywhere"]["accepted"] < 32
