"""One snapshot of every counter of the running daemon (``Doorman.stats()``).

Capture counters per interface (the engine's, docs/capture.md), the judging backlog, the
decisions by verdict and reason, the firewall worker and the replay cache, taken at one
moment on the loop's thread. The stop line is built from it; exporters read it once per
loop turn, never per packet.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .config import Config

# Upper bounds (seconds) of the judging-latency buckets: from a turn that judges at once
# (under a millisecond) to a backlog seconds deep under a flood.
LATENCY_BOUNDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass(frozen=True)
class Histogram:
    """Observations per bucket (not cumulative; the last is above every bound), and sum."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float


class LatencyHistogram:
    """Seconds from a knock's capture to its decision, counted per bucket on the loop's
    thread: one bisect per decision, no lock (the exporters read ``snapshot()``)."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total = 0.0

    def observe(self, latencies: Iterable[float]) -> None:
        bounds, counts = self.bounds, self._counts
        for latency in latencies:
            counts[bisect.bisect_left(bounds, latency)] += 1
            self._total += latency

    def snapshot(self) -> Histogram:
        return Histogram(self.bounds, tuple(self._counts), self._total)


@dataclass(frozen=True)
class CaptureStats:
    interface: str
    running: bool  # False while the interface is lost (the daemon retries every second)
    counters: Mapping[str, int]  # CaptureEngine.stats(): engine and pcap counters


@dataclass(frozen=True)
class FleetStats:
    """The link to the fleet (``fleetlink.FleetLink``), at one moment."""

    gateway: str
    up: bool
    counters: Mapping[str, int]  # fleetlink.FLEET_COUNTERS
    outbox: int  # changes waiting to be published
    unsent_claims: int  # claims waiting for the link


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
    judging_latency: Histogram  # capture to decision, of every completion judged
    grants_live: int  # grants in the firewall as the firewall thread knows them
    grant_changes: Mapping[str, int]  # opened, extended, kept, closed, expired -> how many
    firewall_pending: int  # changes handed to the firewall thread, not yet taken
    started: float  # when the daemon started (time.time())
    fleet: FleetStats | None = None  # None: this gateway is alone

    def capture_totals(self) -> dict[str, int]:
        """The capture counters summed over the interfaces, in the engine's order."""
        totals: dict[str, int] = {}
        for capture in self.captures:
            for name, value in capture.counters.items():
                totals[name] = totals.get(name, 0) + value
        return totals

    def stop_counters(self) -> dict[str, int]:
        """The capture counters summed, and the backlog's drops: what ``stopped:`` logs."""
        return {**self.capture_totals(), "backlog_dropped": self.backlog_dropped}

    def stop_line(self) -> str:
        """``packets=... pcap_ifdropped=0 backlog_dropped=0``."""
        return counters_text(self.stop_counters())


def counters_text(counters: Mapping[str, int]) -> str:
    return " ".join(f"{name}={value}" for name, value in counters.items())


class StatsPublisher(Protocol):
    """Where the loop's snapshots go (``metrics.MetricsPublisher``): ``due`` is asked every
    turn and must be cheap; ``publish`` gets a snapshot only when it said yes."""

    def due(self, now: float) -> bool: ...  # now: time.monotonic()

    def publish(self, stats: DoormanStats, now: float) -> None: ...

    def reconfigure(self, config: Config) -> None: ...  # SIGHUP: the effective config

    def close(self, stats: DoormanStats) -> None: ...  # the run is over: its last counters
