"""`knockd-fast bench`: tiny workloads through the installed command; the report's shape,
and its counts against what each workload holds. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from knock_client.keys import generate_key, write_key_file
from knockd_fast import workloads
from knockd_fast.benchmark import COLUMNS, WORKLOAD_NAMES
from knockd_fast.config import DEFAULT_MAX_GRANTS, DEFAULT_MAX_KNOCKS_PER_MINUTE

SCALE = "0.01"
ROW_KEYS = {
    "workload", "what", "file", "engine", "packets", "bare_seconds", "capture_seconds",
    "packets_per_second", "x_bare", "cpu_us_per_packet", "completions",
    "completions_per_second", "cpu_us_per_completion", "accepted", "accepted_per_second",
    "rejected", "grants", "counters", "peak_rss_mib",
}  # fmt: skip


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "knockd_fast.cli", "bench", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def report_of(*args: str) -> dict:
    done = bench("--scale", SCALE, "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def builtin() -> dict:
    return report_of()


def test_every_workload_reports_every_column(builtin: dict) -> None:
    rows = {row["workload"]: row for row in builtin["workloads"]}
    assert list(rows) == list(WORKLOAD_NAMES)
    for row in rows.values():
        assert ROW_KEYS <= row.keys()
        assert row["packets"] == row["file"]["packets"] == row["counters"]["packets"]
        assert row["peak_rss_mib"] > 0 and row["cpu_us_per_packet"] > 0
    assert builtin["config"] is None and builtin["users"] == [workloads.USER_ID]


def test_counts_agree_with_the_workloads(builtin: dict) -> None:
    rows = {row["workload"]: row for row in builtin["workloads"]}
    genuine, garbage, mix = rows["genuine"], rows["garbage"], rows["mix"]
    # Every genuine knock completes, is accepted and becomes a grant.
    assert genuine["completions"] == genuine["file"]["knocks"] == genuine["accepted"] > 0
    assert genuine["grants"] == genuine["accepted"] and genuine["rejected"] == {}
    # Every garbage knock completes and is refused by the judge, none by the engine.
    assert garbage["completions"] == garbage["file"]["garbage_knocks"] > 0
    assert garbage["accepted"] == 0 and garbage["grants"] == 0
    assert garbage["rejected"] == {"authentication": garbage["completions"]}
    # In the flood the genuine half opens and the garbage half is refused.
    assert mix["completions"] == mix["file"]["complete_knocks"]
    assert mix["accepted"] == mix["completions"] - mix["file"]["garbage_knocks"] > 0
    assert mix["rejected"] == {"authentication": mix["file"]["garbage_knocks"]}
    # A flood and partial knocks complete nothing; every packet of theirs was a knock port.
    for name in ("flood", "sources"):
        assert rows[name]["completions"] == 0 and rows[name]["accepted"] == 0
    assert rows["flood"]["counters"]["knock_packets"] == rows["flood"]["packets"]
    assert rows["sources"]["counters"]["knock_packets"] == rows["sources"]["file"]["knock_packets"]


def test_the_table_has_a_line_per_workload() -> None:
    done = bench("--scale", SCALE, "-q", "--workloads", "genuine,flood")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("workload"))
    assert lines[header].split()[: 3] == [COLUMNS[0][0], COLUMNS[1][0], COLUMNS[2][0]]
    assert [line.split()[0] for line in lines[header + 1 : header + 3]] == ["genuine", "flood"]
    assert done.stderr == ""  # -q: no progress bar


def test_the_admins_config_sets_layout_users_and_table(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    key_file = write_key_file(tmp_path / "carol.key", generate_key())
    config = tmp_path / "knockd.toml"
    config.write_text(
        '[knock]\nbase_port = 30000\ndigit_bits = 6\n\n[capture]\ninterface = "lo"\n'
        "table_size = 4096\n\n"
        f'[state]\ndirectory = "{tmp_path / "state"}"\n\n'
        f'[[users]]\nid = 9\nname = "carol"\nkey_file = "{key_file}"\nallow = ["2222/tcp"]\n'
        "max_knocks_per_minute = 60000\nmax_grants = 65536\n"
    )
    report = report_of("-c", str(config), "--workloads", "genuine")
    assert report["config"] == str(config) and report["users"] == [9]
    assert report["table_size"] == 4096
    assert report["layout"] == {"base_port": 30000, "digit_bits": 6}
    (row,) = report["workloads"]
    # Carol's knocks, sealed with her key in her layout, all open her port.
    assert row["accepted"] == row["completions"] == row["file"]["knocks"] > 0


def test_the_admins_caps_are_applied(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    key_file = write_key_file(tmp_path / "dave.key", generate_key())
    config = tmp_path / "knockd.toml"
    config.write_text(
        f'[capture]\ninterface = "lo"\n\n[state]\ndirectory = "{tmp_path / "state"}"\n\n'
        f'[[users]]\nid = 3\nname = "dave"\nkey_file = "{key_file}"\nallow = ["22/tcp"]\n'
    )
    (row,) = report_of("-c", str(config), "--workloads", "genuine")["workloads"]
    # The default caps (live grants per user, then knocks a minute) hold: the knocks past
    # them are refused, and say why.
    cap = min(DEFAULT_MAX_GRANTS, DEFAULT_MAX_KNOCKS_PER_MINUTE)
    assert row["completions"] > cap and row["accepted"] == cap
    assert row["rejected"] == {"limit": row["completions"] - cap}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--workloads", "flood,nope"], "unknown workload nope"),
        (["--scale", "0"], "--scale 0"),
        (["-c", "/nonexistent/knockd.toml"], "/nonexistent/knockd.toml"),
    ],
)
def test_bad_arguments_get_a_one_line_error(args: list[str], says: str) -> None:
    done = bench(*args)
    assert done.returncode != 0 and done.stdout == ""
    assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "bench.png"
    done = bench("--scale", SCALE, "-q", "--workloads", "genuine", "--plot", str(plot))
    assert done.returncode == 0, done.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
