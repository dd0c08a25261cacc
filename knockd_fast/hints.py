"""Hints for the admin: a source whose knocks keep failing before they can be judged.

A client whose ``base_port`` or ``digit_bits`` differ from the server's sends digits that
land in the wrong segments: its partial knocks time out, often with conflicting digits, or
assemble into a header the engine refuses. Nothing reaches the judge, so no decision is
logged. The capture engines report such failed knocks with their source
(``CaptureEngine.failed_knocks``, after ``sweep``); this module turns a source's repeated
failures into one warning, at most one line a minute for all sources together.

A lone failure is no hint (a lost packet, a scan); two from one source within
``WINDOW_SECONDS`` are. Memory is bounded: at most ``MAX_SOURCES`` sources are tracked.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from knock_client.protocol import KnockLayout

from .addresses import address_text
from .capture_spec import FAILED_REASONS, FAILED_TIMED_OUT, key_address
from .logs import Event

SWEEP_SECONDS = 5.0  # how often the daemon sweeps the capture tables for failed knocks
WINDOW_SECONDS = 600.0  # failures of one source count together this long
FAILURES_FOR_A_HINT = 2
HINT_SECONDS = 60.0  # at most one hint line a minute
SOURCE_QUIET_SECONDS = 3600.0  # a source hinted at is not named again for an hour
MAX_SOURCES = 4096
SOURCES_PER_LINE = 3


@dataclass
class _Source:
    interface: str
    first: float  # when its first failure in the window was seen
    failures: int = 0
    last: dict = field(default_factory=dict)  # the latest failure's fields
    hinted_at: float = -math.inf


class FailedKnockHints:
    """Failed-knock reports in, at most one hint line a minute out."""

    def __init__(self, layout: KnockLayout) -> None:
        self.layout = layout
        self._sources: OrderedDict[bytes, _Source] = OrderedDict()
        self._last_line = -math.inf

    def observe(self, records: np.ndarray, interface: str, now: float) -> None:
        """Count the failed knocks of one capture (records of FAILED_KNOCK_DTYPE)."""
        for record in records:
            key = bytes(record["source"])  # not the port: each knock has a port of its own
            source = self._sources.get(key)
            if source is None or now - source.first > WINDOW_SECONDS:
                hinted_at = source.hinted_at if source is not None else -math.inf
                source = self._sources[key] = _Source(interface, now, hinted_at=hinted_at)
                if len(self._sources) > MAX_SOURCES:
                    self._sources.popitem(last=False)  # the longest tracked goes
            self._sources.move_to_end(key)
            source.failures += 1
            source.last = {
                "reason": FAILED_REASONS.get(int(record["reason"]), "unknown"),
                "filled": int(record["filled"]),
                "segments": int(record["segments"]),
                "alternatives": int(record["alternatives"]),
            }

    def hint(self, now: float) -> Event | None:
        """The hint line due at ``now``, if any source failed often enough (and none was
        given in the last ``HINT_SECONDS``)."""
        if now - self._last_line < HINT_SECONDS:
            return None
        due = [
            (key, source)
            for key, source in self._sources.items()
            if source.failures >= FAILURES_FOR_A_HINT
            and now - source.hinted_at >= SOURCE_QUIET_SECONDS
        ]
        if not due:
            return None
        self._last_line = now
        for _, source in due:
            source.hinted_at = now
        named = due[:SOURCES_PER_LINE]
        parts = [self._describe(key, source) for key, source in named]
        more = f"; and {len(due) - len(named)} more sources" if len(due) > len(named) else ""
        layout = self.layout
        text = (
            f"hint: knocks keep failing before they can be judged: {'; '.join(parts)}{more}. "
            f"If these are your clients, their base_port/digit_bits may differ from the "
            f"server's (base_port {layout.base_port}, digit_bits {layout.digit_bits}; "
            f"`knock --base-port --digit-bits` or the profile), or their packets are lost on "
            f"the way (try knock --mode spa). No more than one such line a minute"
        )
        return Event(
            text,
            "hint",
            sources=[
                {"source": address_text(key_address(key)), "interface": source.interface,
                 "failures": source.failures, **source.last}
                for key, source in named
            ],  # fmt: skip
            more_sources=len(due) - len(named),
        )

    @staticmethod
    def _describe(key: bytes, source: _Source) -> str:
        last = source.last
        if last["reason"] == FAILED_REASONS[FAILED_TIMED_OUT]:
            what = (
                f"timed out with {last['filled']} of {last['segments']} digits"
                + (f", {last['alternatives']} conflicting" if last["alternatives"] else "")
            )
        elif last["reason"] == "refused_version":
            what = "whole knocks whose header is not protocol version 1"
        else:
            what = "whole knocks naming no user of this server (or a wrong --user)"
        return (
            f"{source.failures} from {address_text(key_address(key))} on {source.interface} "
            f"({what})"
        )
