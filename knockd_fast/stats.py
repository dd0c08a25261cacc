"""One snapshot of every counter of the running daemon (``Doorman.stats()``).

Capture counters per interface (the engine's, docs/capture.md), the judging backlog, the
decisions by verdict and reason, the firewall worker and the replay cache, taken at one
moment on the loop's thread. The stop line is built from it; exporters read it once per
loop turn, never per packet.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptureStats:
    interface: str
    running: bool  # False while the interface is lost (the daemon retries every second)
    counters: Mapping[str, int]  # CaptureEngine.stats(): engine and pcap counters


@dataclass(frozen=True)
class DoormanStats:
    time: float
    captures: tuple[CaptureStats, ...]
    backlog: int  # completions waiting to be judged
    backlog_limit: int
    backlog_dropped: int  # completions refused because the backlog was full
    decisions: Mapping[tuple[str, str], int]  # (verdict, reason) -> how many
    firewall_backend: str
    firewall_applied: int  # grant changes carried out
    firewall_failed: int  # changes and sweeps given up on after every attempt
    firewall_retried: int  # attempts after a failure
    firewall_absorbed: int  # changes coalesced into one pending for the same grant
    firewall_dropped: int  # changes refused because the firewall queue was full
    replay_entries: int  # messages remembered against replays
    replay_degraded: str | None  # why the replay cache went on in memory only, or None

    def capture_totals(self) -> dict[str, int]:
        """The capture counters summed over the interfaces, in the engine's order."""
        totals: dict[str, int] = {}
        for capture in self.captures:
            for name, value in capture.counters.items():
                totals[name] = totals.get(name, 0) + value
        return totals

    def stop_line(self) -> str:
        """``packets=... pcap_ifdropped=0 backlog_dropped=0``: what ``stopped:`` logs."""
        return counters_text({**self.capture_totals(), "backlog_dropped": self.backlog_dropped})


def counters_text(counters: Mapping[str, int]) -> str:
    return " ".join(f"{name}={value}" for name, value in counters.items())
