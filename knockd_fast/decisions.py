"""A decision's record: who knocked, for what, what we decided; and its text and JSON forms."""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

# `knockd-fast replay --json` prints these keys of Decision.as_json() (the live log adds
# "detail" and "interface").
REPLAY_JSON_KEYS = (
    "time",
    "source",
    "destination",
    "user",
    "action",
    "port",
    "proto",
    "verdict",
    "reason",
)


class Decision(NamedTuple):
    """One line of the decision log: who knocked, for what, and what we decided.

    A tuple, as it is made for every completion judged (a frozen dataclass cost 3 µs)."""

    time: float
    source: str
    destination: str
    user: str | None
    action: str | None
    port: int | None
    proto: str | None
    verdict: str  # "accepted" | "rejected"
    reason: str  # "ok" or a rejection reason of docs/protocol.md section 7
    detail: str
    interface: str | None = None  # the capture interface it came through (None: a file)

    @property
    def accepted(self) -> bool:
        return self.verdict == "accepted"

    def as_json(self) -> dict[str, Any]:
        return {
            "time": iso_time(self.time),
            "source": self.source,
            "destination": self.destination,
            "user": self.user,
            "action": self.action,
            "port": self.port,
            "proto": self.proto,
            "verdict": self.verdict,
            "reason": self.reason,
            "detail": self.detail,
            "interface": self.interface,
        }

    def as_text(self) -> str:
        what = f"{self.action} {self.port}/{self.proto}" if self.action else "-"
        via = f" on {self.interface}" if self.interface else ""
        return (
            f"{iso_time(self.time)} {self.source}{via} user={self.user or '-'} {what} "
            f"{self.verdict} {self.reason}: {self.detail}"
        )


def iso_time(when: float) -> str:
    """UTC with milliseconds, e.g. 2026-11-27T10:46:26.123Z."""
    second = int(when // 1)
    return f"{_iso_second(second)}.{int((when - second) * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    # Every decision is logged with a time: formatting the same second once saves ~10 µs.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
