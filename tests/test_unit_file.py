"""packaging/knockd-fast.service as systemd reads it: valid, exposure at most 2.0, a
watchdog the loop can always meet. ``systemd-analyze`` runs offline (PID 1 need not be
systemd); without it the tests are skipped."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from knockd_fast.daemon import TURN_SECONDS, WAIT_SECONDS

UNIT = Path(__file__).resolve().parent.parent / "packaging" / "knockd-fast.service"
MAX_EXPOSURE = 2.0

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(analyze is None, reason="no systemd-analyze here")


def service_settings() -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit, values in order (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@needs_analyze
def test_exposure_is_at_most_two():
    done = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for knockd-fast\.service: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, done.stdout


@needs_analyze
def test_systemd_analyze_verify_finds_nothing(tmp_path):
    # verify wants ExecStart= to exist: point it at this interpreter's knockd-fast.
    script = Path(sys.executable).with_name("knockd-fast")
    if not script.is_file():
        pytest.skip(f"no console script {script}")
    unit = tmp_path / UNIT.name
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/knockd-fast " in text
    unit.write_text(text.replace("ExecStart=/usr/local/bin/knockd-fast ", f"ExecStart={script} "))
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    # An unknown key or a bad value is only a warning line: the output must be empty.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_watchdog_is_fed_by_the_notify_protocol_with_room_to_spare():
    settings = service_settings()
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    watchdog = re.fullmatch(r"(\d+)s", settings["WatchdogSec"][0])
    assert watchdog, settings["WatchdogSec"]
    # The loop pings every WatchdogSec/2 from its turn; an idle turn lasts up to
    # WAIT_SECONDS + TURN_SECONDS. Half the timeout must dwarf it (slow disks, a loaded box).
    assert int(watchdog.group(1)) / 2 >= 20 * (WAIT_SECONDS + TURN_SECONDS)
    assert "time-sync.target" in settings["After"][0].split()  # the replay window's clock
