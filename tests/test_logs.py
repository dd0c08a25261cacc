"""knockd_fast.logs: the daemon's per-turn standard error, and lines logged a slice at a time."""

from __future__ import annotations

import io
import logging
import os
import socket
import sys
from collections.abc import Iterator

import pytest

from knockd_fast import logs
from knockd_fast.logs import SyslogHandler, TurnFlushedHandler, log_lines, syslog_unavailable


@pytest.fixture
def daemon_logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose only handler is the daemon's ``TurnFlushedHandler``, into a string
    (each record marked "> " by its formatter, to count the records)."""
    logger = logging.getLogger(f"knockd_fast_test_{id(object())}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = TurnFlushedHandler()
    written = io.StringIO()
    handler.setStream(written)
    handler.setFormatter(logging.Formatter("> %(message)s"))
    logger.addHandler(handler)
    yield logger, written
    logger.removeHandler(handler)


def test_lines_reach_the_daemons_stderr_as_one_record(daemon_logger) -> None:
    logger, written = daemon_logger
    # pytest's own capture handlers join every logger that does not propagate: here the
    # daemon's handler must be the only one, as it is in the daemon.
    logger.handlers = [h for h in logger.handlers if type(h) is TurnFlushedHandler]
    log_lines(logger, ["first", "100% of 50%s", "third"])
    logger.handlers[0].flush_now()
    # One record (one "> "), the lines as given: a "%" is not a format here.
    assert written.getvalue() == "> first\n100% of 50%s\nthird\n"


def test_lines_stay_records_of_their_own_where_another_handler_listens(
    daemon_logger, caplog
) -> None:
    """Syslog, or a test's capture: each line is a message of its own there, as before."""
    logger, written = daemon_logger
    with caplog.at_level(logging.INFO, logger=logger.name):
        log_lines(logger, ["first", "second"])
    assert [r.getMessage() for r in caplog.records] == ["first", "second"]
    logger.handlers[0].flush_now()
    assert written.getvalue() == "> first\n> second\n"


def test_a_filter_or_a_level_is_honoured(daemon_logger) -> None:
    logger, written = daemon_logger
    logger.handlers = [h for h in logger.handlers if type(h) is TurnFlushedHandler]
    logger.setLevel(logging.WARNING)
    log_lines(logger, ["dropped"])
    logger.setLevel(logging.INFO)
    logger.addFilter(lambda record: "secret" not in record.getMessage())
    log_lines(logger, ["kept", "a secret"])
    logger.handlers[0].flush_now()
    assert written.getvalue() == "> kept\n"


# --- syslog -------------------------------------------------------------------------------


def test_syslog_that_is_not_there_is_said_in_one_line(tmp_path) -> None:
    assert syslog_unavailable(str(tmp_path / "log")) == (
        f"{tmp_path / 'log'}: No such file or directory"
    )


def test_syslog_lines_it_does_not_take_go_to_stderr_with_one_line_a_minute_saying_why(
    tmp_path, capsys
) -> None:
    """A real syslog socket takes lines; once it is gone, each line goes to standard error
    and one line says why, where the logging module printed a traceback per line."""
    path = str(tmp_path / "log")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    assert syslog_unavailable(path) is None
    logger = logging.getLogger(f"knockd_fast_test_{id(object())}")
    logger.propagate = False
    handler = SyslogHandler(path)
    handler.setFormatter(logging.Formatter("kf: %(message)s"))
    logger.addHandler(handler)
    try:
        logger.warning("first")
        assert server.recv(4096).endswith(b"kf: first\x00")
        server.close()
        os.unlink(path)
        for n in range(3):
            logger.warning("line %d", n)
    finally:
        logger.removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and "traceback" not in capsys.readouterr().err.lower(), err
    assert err[0].startswith(f"knockd-fast: syslog {path}: "), err
    assert err[0].endswith("; these lines go to standard error until it takes them again")
    assert err[1:] == ["kf: line 0", "kf: line 1", "kf: line 2"]


def test_syslog_asked_for_but_missing_logs_to_stderr_and_says_so(monkeypatch, tmp_path) -> None:
    daemon_log = logging.getLogger("knockd_fast")
    before = daemon_log.handlers[:]
    # setup_logging sets these for the process: put them back for the tests after this one.
    level = daemon_log.level
    for name in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, name, getattr(logging, name))
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(tmp_path / "log"))
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    try:
        logs.setup_logging(syslog=True)
        (added,) = [h for h in daemon_log.handlers if h not in before]
        assert type(added) is logging.StreamHandler
    finally:
        daemon_log.setLevel(level)  # setLevel, which also clears the loggers' level cache
        for handler in daemon_log.handlers[:]:
            if handler not in before:
                daemon_log.removeHandler(handler)
    assert stderr.getvalue() == (
        f"--syslog: cannot log to syslog ({tmp_path / 'log'}: No such file or directory); "
        "logging to standard error\n"
    )


def test_json_lines_one_object_per_line_with_time_level_and_fields(daemon_logger) -> None:
    """A batch of lines stays one write but each line is its own object; an ``Event``
    carries its fields; an exception is a field, not lines of text after the object."""
    import json

    from knockd_fast.logs import Event, JsonFormatter

    logger, written = daemon_logger
    logger.handlers = [h for h in logger.handlers if type(h) is TurnFlushedHandler]
    logger.handlers[0].setFormatter(JsonFormatter())
    log_lines(logger, [Event("firewall: opened", "firewall", port=22), "100% of 50%s"])
    logger.warning("reload: %s", "pending")
    try:
        raise ValueError("bug")
    except ValueError:
        logger.exception("internal error")
    logger.handlers[0].flush_now()
    entries = [json.loads(line) for line in written.getvalue().splitlines()]
    assert [(e["level"], e["message"]) for e in entries] == [
        ("info", "firewall: opened"),
        ("info", "100% of 50%s"),
        ("warning", "reload: pending"),
        ("error", "internal error"),
    ]
    assert (entries[0]["event"], entries[0]["port"]) == ("firewall", 22)
    assert all(e["time"].endswith("Z") for e in entries)
    assert "ValueError: bug" in entries[3]["error"]
