"""One daemon per state directory (knockd_fast.statelock): the lock a second start is
refused by, and the one ``knockd-fast status`` asks whether a daemon runs. The holder is
``conftest.state_holder``: another process, as a running daemon is."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from knockd_fast.errors import StartError
from knockd_fast.statelock import LOCK_NAME, StateLock, describe_error, running_pid


def test_a_second_start_on_the_same_state_directory_is_refused_with_the_first_ones_pid(
    tmp_path: Path, state_holder: subprocess.Popen
) -> None:
    state = tmp_path / "state"
    with pytest.raises(StartError) as refused:
        StateLock.acquire(state)
    assert str(refused.value) == (
        f"another knockd-fast (pid {state_holder.pid}) runs on {state}; stop it first"
    )
    assert running_pid(state) == state_holder.pid


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_the_lock_goes_with_its_process_however_it_ends(
    tmp_path: Path, state_holder: subprocess.Popen, how: signal.Signals
) -> None:
    state = tmp_path / "state"
    os.kill(state_holder.pid, how)
    state_holder.wait()
    assert running_pid(state) is None, "a dead daemon's PID left in the file is not a daemon"
    with StateLock.acquire(state):
        assert running_pid(state) == os.getpid()
        assert (state / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    assert running_pid(state) is None
    assert (state / LOCK_NAME).read_text() == "", "released: no PID left behind"


def test_a_missing_state_directory_is_made_private_and_means_not_running(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    assert running_pid(state) is None
    with StateLock.acquire(state):
        assert state.stat().st_mode & 0o777 == 0o700
        assert (state / LOCK_NAME).stat().st_mode & 0o777 == 0o600


def test_a_status_looking_at_the_moment_of_a_start_does_not_refuse_it(tmp_path: Path) -> None:
    """``running_pid`` holds the lock shared for an instant: a start waits that out."""
    state = tmp_path / "state"
    with StateLock.acquire(state):
        pass  # the file exists, empty
    fd = os.open(state / LOCK_NAME, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a status that looks for longer than usual
    threading.Timer(0.05, lambda: os.close(fd)).start()
    started = time.monotonic()
    with StateLock.acquire(state):
        assert running_pid(state) == os.getpid()
    assert time.monotonic() - started >= 0.04


def test_a_state_directory_that_cannot_hold_the_file_is_an_os_error_said_in_one_line(
    tmp_path: Path,
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(OSError) as failed:
        StateLock.acquire(blocked)
    assert describe_error(failed.value) == f"{blocked}: File exists"
    with pytest.raises(OSError) as looked:
        running_pid(blocked)
    assert describe_error(looked.value) == f"{blocked / LOCK_NAME}: Not a directory"
