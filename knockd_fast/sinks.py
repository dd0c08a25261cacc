"""Where decisions go: the sink interface, and the sinks that write them as lines.

The daemon's loop hands each judged slice to every sink of its list, and offline replay
hands each batch of a capture file to its sinks: one shape for both. A sink is one small
class here or in a module of its own (metrics and the fleet come later); it must never
raise for a decision, and costs at most a line of output per decision.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from typing import Protocol, TextIO

from .decisions import REPLAY_JSON_KEYS, Decision

decisions_log = logging.getLogger("knockd_fast.decisions")


class DecisionSink(Protocol):
    def write(self, decisions: Sequence[Decision]) -> None:
        """Take the decisions of one slice (live) or one batch (offline), oldest first."""


class LogSink:
    """The decision log: one line per decision, text or JSON, through ``logging``."""

    def __init__(self, as_json: bool = False) -> None:
        self.as_json = as_json

    def write(self, decisions: Sequence[Decision]) -> None:
        info = decisions_log.info
        if self.as_json:
            for decision in decisions:
                info(json.dumps(decision.as_json()))
        else:
            for decision in decisions:
                info(decision.as_text())


class PrintSink:
    """``knockd-fast replay``: one line per decision on standard output; as JSON, only the
    keys that do not depend on the run (``REPLAY_JSON_KEYS``)."""

    def __init__(self, as_json: bool = False, stream: TextIO | None = None) -> None:
        self.as_json = as_json
        self.stream = stream

    def write(self, decisions: Sequence[Decision]) -> None:
        stream = self.stream or sys.stdout
        for decision in decisions:
            if self.as_json:
                fields = decision.as_json()
                print(json.dumps({key: fields[key] for key in REPLAY_JSON_KEYS}), file=stream)
            else:
                print(decision.as_text(), file=stream)
