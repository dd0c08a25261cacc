"""One daemon per state directory: a lock file that holds the running daemon's PID.

Two daemons on one configuration and state directory both judged every knock and both
granted it, and each replay cache missed what the other accepted. ``knockd-fast run``
takes an exclusive ``flock`` on ``DIR/knockd-fast.pid`` before it touches the firewall and
holds it for its life (the kernel lets go when the process ends, however it ends), so a
second one refuses to start; ``knockd-fast status`` asks the same lock whether a daemon
runs, without taking it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from .errors import StartError

LOCK_NAME = "knockd-fast.pid"
# A ``status`` that is looking holds the lock shared for a moment, a daemon for its life:
# a start waits out the first (BUSY_RETRIES x BUSY_PAUSE) before it names the second.
BUSY_RETRIES = 10
BUSY_PAUSE = 0.02


class StateLock:
    """The exclusive lock on a state directory, held while the object is open."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> StateLock:
        """Take the lock of ``state_dir`` (created, mode 0700, if missing) and write our PID
        into it. Raises StartError naming the daemon that holds it, OSError when the lock
        file cannot be made or written (``describe_error`` says it in one line)."""
        path = Path(state_dir) / LOCK_NAME
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            for attempt in range(BUSY_RETRIES):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == BUSY_RETRIES - 1:
                        pid = _read_pid(fd)
                        who = f"pid {pid}" if pid is not None else "pid unknown"
                        raise StartError(
                            f"another knockd-fast ({who}) runs on {state_dir}; stop it first"
                        ) from None
                    time.sleep(BUSY_PAUSE)  # a status looking holds it for a moment only
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd)

    def release(self) -> None:
        """Let go of the lock (the file stays; its PID is cleared)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def running_pid(state_dir: Path) -> int | None:
    """The PID of the daemon that holds ``state_dir``'s lock (0 if it holds it but its PID
    cannot be read), or None when no daemon holds it. Raises OSError when the lock file
    cannot be opened for a reason other than its absence (e.g. no permission)."""
    path = Path(state_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            return pid if pid is not None else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def describe_error(error: OSError) -> str:
    """An OSError of ``acquire`` or ``running_pid`` in one line."""
    where = f"{error.filename}: " if error.filename else ""
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"{where}permission denied (run as root)"
    return f"{where}{error.strerror or error}"
