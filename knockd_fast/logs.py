"""The daemon's log output: standard error written once per loop turn, or syslog."""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import math
import os
import socket
import sys
import time
from collections.abc import Sequence

log = logging.getLogger("knockd_fast")
DECISIONS_LOGGER = "knockd_fast.decisions"  # its lines are JSON already in JSON mode


class Event(str):
    """A log line that also carries fields: the text logs show it as is, the JSON log
    (``run --json``) as ``{"time", "level", "event", ...fields, "message"}``."""

    fields: dict[str, object]

    def __new__(cls, text: str, event: str, **fields: object) -> Event:
        line = super().__new__(cls, text)
        line.fields = {"event": event, **fields}
        return line


class Lines(tuple):
    """Several lines as one record (``log_lines``): one write, each line its own in JSON."""

    def __str__(self) -> str:
        return "\n".join(self)


class JsonFormatter(logging.Formatter):
    """Every record as JSON objects, one per line, each with its time and level: what a
    log system reads without parsing text. Decision lines are JSON already (``LogSink``)."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix  # syslog's "knockd-fast[PID]: "

    def format(self, record: logging.LogRecord) -> str:
        if record.name == DECISIONS_LOGGER:
            lines = record.msg if isinstance(record.msg, Lines) else (record.getMessage(),)
            return "\n".join(self.prefix + line for line in lines)
        lines = record.msg if isinstance(record.msg, Lines) else (record.msg,)
        head = {"time": _iso_time(record.created), "level": record.levelname.lower()}
        out = []
        for line in lines:
            fields = line.fields if isinstance(line, Event) else {}
            text = str(line) if isinstance(record.msg, Lines) else record.getMessage()
            entry = {**head, **fields, "message": text}
            if record.exc_info:
                entry["error"] = self.formatException(record.exc_info)
            out.append(self.prefix + json.dumps(entry, default=str))
        return "\n".join(out)


def json_line(level: str, text: str, **fields: object) -> str:
    """One JSON log line outside logging (the exit line of a start that failed)."""
    return json.dumps({"time": _iso_time(time.time()), "level": level, **fields, "message": text})


def _iso_time(seconds: float) -> str:
    from .decisions import iso_time  # one format of time in every line

    return iso_time(seconds)


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
        logger.log(level, Lines(lines))  # no arguments: a "%" in a line is kept as is
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


SYSLOG_SOCKET = "/dev/log"
SYSLOG_COMPLAIN_SECONDS = 60  # at most one "syslog unavailable" line a minute


class SyslogHandler(logging.handlers.SysLogHandler):
    """Syslog through ``SYSLOG_SOCKET``. A line syslog does not take (its daemon restarting,
    the socket gone) goes to standard error instead, with one line a minute saying why,
    where the logging module would print a traceback per line."""

    def __init__(self, address: str = SYSLOG_SOCKET) -> None:
        super().__init__(address=address)
        self._last_complaint = -math.inf

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        error = sys.exc_info()[1]
        try:
            now = time.monotonic()
            if now - self._last_complaint >= SYSLOG_COMPLAIN_SECONDS:
                self._last_complaint = now
                sys.stderr.write(
                    f"knockd-fast: syslog {self.address}: {error}; these lines go to standard "
                    "error until it takes them again\n"
                )
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # standard error gone as well: nowhere left to say it
            pass


def syslog_unavailable(address: str = SYSLOG_SOCKET) -> str | None:
    """Why nothing can be sent to the syslog socket at ``address`` (None: it takes lines)."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):  # as SysLogHandler tries them
        probe = socket.socket(socket.AF_UNIX, kind)
        try:
            probe.connect(address)
            return None
        except OSError as error:
            reason = error.strerror or str(error)
        finally:
            probe.close()
    return f"{address}: {reason}"


def setup_logging(
    verbose: bool = False, syslog: bool = False, per_turn: bool = False, as_json: bool = False
) -> None:
    """Log lines of ``knockd_fast.*`` as bare messages (``as_json``: as JSON objects): to
    syslog, to standard error once per loop turn (``per_turn``: the daemon), or to standard
    error as they come. Syslog asked for but not there: standard error, and a warning that
    says so."""
    # A line per decision and per firewall action: skip what no format here uses (the
    # caller's file and line is a walk up the stack per record; see the logging HOWTO,
    # "Optimization").
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    missing = syslog_unavailable(SYSLOG_SOCKET) if syslog else None
    if syslog and missing is None:
        prefix = f"knockd-fast[{os.getpid()}]: "
        handler: logging.Handler = SyslogHandler(SYSLOG_SOCKET)
        handler.setFormatter(
            JsonFormatter(prefix) if as_json else logging.Formatter(prefix + "%(message)s")
        )
    else:
        handler = TurnFlushedHandler() if per_turn else logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if as_json else logging.Formatter("%(message)s"))
    log.addHandler(handler)
    if missing is not None:
        log.warning("--syslog: cannot log to syslog (%s); logging to standard error", missing)
