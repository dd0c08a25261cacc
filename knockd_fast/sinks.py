"""Where decisions go: the sink interface, and the sinks that write them as lines.

The daemon's loop hands each judged slice to every sink of its list, and offline replay
hands each batch of a capture file to its sinks: one shape for both. A sink is one small
class here or in a module of its own (metrics and the fleet come later); it must never
raise for a decision, and costs at most a line of output per decision.

The daemon's log writes every accepted decision, and rejected ones as a bounded sample
per reason and interval plus one summary line of the counts: a flood of junk costs a few
lines a minute, not a line per datagram (20,000 junk datagrams once made 20,004 lines).
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Protocol, TextIO

from .decisions import Decision, iso_time
from .logs import DECISIONS_LOGGER, log_lines

decisions_log = logging.getLogger(DECISIONS_LOGGER)


class DecisionSink(Protocol):
    def write(self, decisions: Sequence[Decision]) -> None:
        """Take the decisions of one slice (live) or one batch (offline), oldest first."""

    def tick(self, now: float) -> None:
        """Once per loop turn (live): time passes for sinks that summarise intervals."""

    def close(self) -> None:
        """The run is over: write what is still held back."""


class LogSink:
    """The decision log: text or JSON lines through ``logging``.

    Every accepted decision is a line. Rejected ones: the first ``sample`` of each reason
    in each ``interval`` seconds are lines; the rest are counted, and when the interval
    ends (or the run does) one summary line gives the counts of every reason with the
    number shown, e.g. ``rejections 2026-...Z to 2026-...Z: malformed 20000 (10 shown)``.
    """

    def __init__(self, as_json: bool = False, sample: int = 10, interval: float = 60.0) -> None:
        self.as_json = as_json
        self.sample = sample
        self.interval = interval
        self._since: float | None = None  # start of the interval with rejections
        self._rejected: collections.Counter[str] = collections.Counter()
        self._shown: collections.Counter[str] = collections.Counter()

    def write(self, decisions: Sequence[Decision]) -> None:
        as_json = self.as_json
        lines = []
        for decision in decisions:
            if decision.verdict != "accepted":
                if self._interval_over(decision.time):
                    log_lines(decisions_log, lines)  # the summary comes after them
                    lines = []
                    self._summarise(decision.time)
                reason = decision.reason
                if self._since is None:
                    self._since = decision.time
                self._rejected[reason] += 1
                if self._shown[reason] >= self.sample:
                    continue
                self._shown[reason] += 1
            lines.append(decision.as_json_text() if as_json else decision.as_text())
        log_lines(decisions_log, lines)

    def tick(self, now: float) -> None:
        if self._interval_over(now):
            self._summarise(now)

    def _interval_over(self, now: float) -> bool:
        """Whether an interval with rejections began at least ``interval`` before ``now``."""
        return self._since is not None and now - self._since >= self.interval

    def close(self) -> None:
        if self._since is not None:
            self._summarise(None)

    def _summarise(self, until: float | None) -> None:
        """The summary line, if anything was held back; a new interval begins."""
        held = sum(self._rejected.values()) - sum(self._shown.values())
        if held:
            since = iso_time(self._since)
            end = iso_time(until) if until is not None else None
            counts = sorted(self._rejected.items(), key=lambda item: (-item[1], item[0]))
            if self.as_json:
                shown = {r: {"count": n, "shown": self._shown[r]} for r, n in counts}
                # "time" as every JSON log line has: the interval's end (the stop's time).
                at = end or iso_time(time.time())
                line = json.dumps({"time": at, "rejections": shown, "since": since, "until": end})
            else:
                parts = ", ".join(f"{r} {n} ({self._shown[r]} shown)" for r, n in counts)
                line = f"rejections {since} to {end or 'the stop'}: {parts}"
            decisions_log.info(line)
        self._since = None
        self._rejected.clear()
        self._shown.clear()


class PrintSink:
    """``knockd-fast replay``: one line per decision on standard output, as the live log
    writes it (text, or the same JSON object: ``detail`` and ``interface`` included)."""

    def __init__(self, as_json: bool = False, stream: TextIO | None = None) -> None:
        self.as_json = as_json
        self.stream = stream

    def tick(self, now: float) -> None:
        """Every decision is printed: nothing to summarise."""

    def close(self) -> None:
        """Nothing is held back."""

    def write(self, decisions: Sequence[Decision]) -> None:
        stream = self.stream or sys.stdout
        for decision in decisions:
            print(decision.as_json_text() if self.as_json else decision.as_text(), file=stream)
