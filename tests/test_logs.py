"""knockd_fast.logs: the daemon's per-turn standard error, and lines logged a slice at a time."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from knockd_fast.logs import TurnFlushedHandler, log_lines


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
