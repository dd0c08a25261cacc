"""The daemon's log output: standard error written once per loop turn, or syslog."""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import sys
from collections.abc import Sequence

log = logging.getLogger("knockd_fast")


class TurnFlushedHandler(logging.StreamHandler):
    """Standard error, written once per turn of the daemon's loop instead of once per line.

    A flush is a write(2), and each one hands the GIL to the other thread and back: with a
    line per decision and per firewall action that cost more than judging (bench/live.py).
    ``flush_logs()`` runs at the end of every turn (at least every ``WAIT_SECONDS``) and
    after every firewall job; a line waits at most that long. Closing flushes, so a normal
    exit loses nothing; a kill -9 loses at most the current turn's lines.
    """

    def __init__(self, fd: int = 2) -> None:
        # Our own writer of standard error (``fd``: another descriptor, for ``knockd-fast
        # bench``): sys.stderr is line-buffered (a write per line).
        stream = io.TextIOWrapper(
            io.BufferedWriter(io.FileIO(fd, "w", closefd=False), 1 << 16),
            encoding="utf-8",
            errors="backslashreplace",
        )
        super().__init__(stream)

    def flush(self) -> None:
        """Called by emit() after every record: deferred to ``flush_now``."""

    def flush_now(self) -> None:
        super().flush()

    def close(self) -> None:
        try:
            self.flush_now()
        finally:
            super().close()


def flush_logs() -> None:
    """Write out the lines ``TurnFlushedHandler`` holds (a no-op for other handlers)."""
    for handler in log.handlers:
        if isinstance(handler, TurnFlushedHandler):
            try:
                handler.flush_now()
            except (OSError, ValueError):  # stderr gone or closed: nothing to do about it
                pass


def log_lines(logger: logging.Logger, lines: Sequence[str], level: int = logging.INFO) -> None:
    """Log each of ``lines`` at ``level``, as ``logger.log(level, line)`` one by one would.

    Where every handler they reach is a ``TurnFlushedHandler`` (the daemon's standard
    error), and no filter is in the way, they go as one record: a record costs about 5 µs,
    and the daemon writes a line per accepted knock and per firewall change. Anywhere else
    (syslog, a test's log capture) each line stays a record of its own."""
    if not lines or not logger.isEnabledFor(level):
        return
    if _only_turn_flushed(logger):
        logger.log(level, "\n".join(lines))  # no arguments: a "%" in a line is kept as is
        return
    for line in lines:
        logger.log(level, line)


def _only_turn_flushed(logger: logging.Logger) -> bool:
    """Whether every handler a record of ``logger`` reaches is a ``TurnFlushedHandler``
    (and there is one), with no filter on the way."""
    found = False
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return False
        for handler in current.handlers:
            if type(handler) is not TurnFlushedHandler or handler.filters:
                return False
            found = True
        if not current.propagate:
            break
        current = current.parent
    return found


def setup_logging(verbose: bool = False, syslog: bool = False, per_turn: bool = False) -> None:
    """Log lines of ``knockd_fast.*`` as bare messages: to syslog, to standard error once
    per loop turn (``per_turn``: the daemon), or to standard error as they come."""
    # A line per decision and per firewall action: skip what no format here uses (the
    # caller's file and line is a walk up the stack per record; see the logging HOWTO,
    # "Optimization").
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    if syslog:
        handler: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter(f"knockd-fast[{os.getpid()}]: %(message)s"))
    elif per_turn:
        handler = TurnFlushedHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
