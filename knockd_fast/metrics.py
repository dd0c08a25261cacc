"""Prometheus metrics: the daemon's counters (``DoormanStats``) in Prometheus's text format.

The loop hands a fresh snapshot to ``MetricsPublisher`` at most every ``SNAPSHOT_SECONDS``,
never per packet or per decision; a scrape reads the last snapshot and touches nothing the
loop owns. Three outlets, one registry:

- ``metrics.prom`` in the state directory, rewritten every ``FILE_SECONDS``: always, for
  ``knockd-fast status`` (which reads the per-interface counters from it);
- ``metrics.textfile``: the same text for node_exporter's textfile collector;
- ``metrics.listen``: an HTTP endpoint, on the address given (docs/admin.md: bind it to
  loopback; prometheus-client's own helper would bind every address).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .capture_spec import COUNTER_NAMES, PCAP_COUNTER_NAMES
from .config import Config, MetricsSettings
from .firewall.worker import GRANT_CHANGES
from .stats import DoormanStats, FleetStats

log = logging.getLogger("knockd_fast")

PREFIX = "knockd_fast_"
STATE_FILE = "metrics.prom"  # in the state directory
SNAPSHOT_SECONDS = 0.25  # the freshest a scrape sees (engine.stats(): 1.5 µs an interface)
FILE_SECONDS = 2.0  # how often the files are rewritten (~1 ms each): `status` is this fresh
COMPLAIN_SECONDS = 60.0  # at most one "cannot write" warning per file per minute

# Each capture engine counter (capture_spec, docs/capture.md) -> (metric, its help, the
# label that tells the counters of one metric apart). Every counter is in exactly one.
ENGINE_COUNTERS: Mapping[str, tuple[str, str, dict[str, str]]] = {
    "packets": ("capture_packets", "Packets the capture engine read (past the BPF filter).", {}),
    "pcap_received": (
        "capture_kernel_received_packets",
        "Packets the kernel's capture saw (libpcap ps_recv).",
        {},
    ),
    "pcap_dropped": (
        "capture_dropped_packets",
        "Packets lost before the engine read them: kernel buffer full (ps_drop) or dropped "
        "by the interface (ps_ifdrop).",
        {"by": "kernel"},
    ),
    "pcap_ifdropped": ("capture_dropped_packets", "", {"by": "interface"}),
    "knock_packets": (
        "capture_classified_packets",
        "Packets by what the engine made of them (docs/capture.md).",
        {"class": "knock"},
    ),
    "spa_packets": ("capture_classified_packets", "", {"class": "spa"}),
    "malformed": ("capture_classified_packets", "", {"class": "malformed"}),
    "ignored": ("capture_classified_packets", "", {"class": "ignored"}),
    "refused_mode": ("capture_classified_packets", "", {"class": "refused_mode"}),
    "completions": ("completions", "Whole messages handed to the judge.", {}),
    "duplicates": (
        "capture_digits",
        "Knock digits that repeated (duplicate) or contradicted (conflict) one already held, "
        "or were dropped past the alternatives a digit keeps.",
        {"outcome": "duplicate"},
    ),
    "conflicts": ("capture_digits", "", {"outcome": "conflict"}),
    "alternatives_dropped": ("capture_digits", "", {"outcome": "alternative_dropped"}),
    "evictions": (
        "partial_knocks_dropped",
        "Partial knocks given up: timed out (expired) or pushed out of a full table (evicted).",
        {"why": "evicted"},
    ),
    "expired": ("partial_knocks_dropped", "", {"why": "expired"}),
    "refused_version": (
        "capture_refused_messages",
        "Messages refused before judging: not protocol version 1, or no such user.",
        {"why": "version"},
    ),
    "refused_user": ("capture_refused_messages", "", {"why": "user"}),
}
assert set(ENGINE_COUNTERS) == {*COUNTER_NAMES, *PCAP_COUNTER_NAMES}


class DoormanCollector(Collector):
    """Yields the metrics of the last snapshot given to ``update`` (none before the first)."""

    def __init__(self, build: Mapping[str, str]) -> None:
        self.build = dict(build)
        self.snapshot: DoormanStats | None = None  # replaced whole: no lock needed

    def update(self, stats: DoormanStats) -> None:
        self.snapshot = stats

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily(PREFIX + "build", "Versions of this knockd-fast.")
        info.add_metric([], self.build)
        yield info
        stats = self.snapshot
        if stats is None:
            return
        yield from _capture_families(stats)
        yield from _judging_families(stats)
        yield from _firewall_families(stats)
        if stats.fleet is not None:
            yield from _fleet_families(stats.fleet)
        yield _gauge("start_time_seconds", "When the daemon started (Unix time).", stats.started)
        yield _gauge(
            "last_snapshot_timestamp_seconds",
            "When the loop took the counters shown (Unix time); old means a stuck loop.",
            stats.time,
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, documentation, value=value)


def _capture_families(stats: DoormanStats) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        PREFIX + "capture_up",
        "1 while the interface is captured, 0 while it is lost (retried every second).",
        labels=["interface"],
    )
    families: dict[str, CounterMetricFamily] = {}
    for metric, documentation, labels in ENGINE_COUNTERS.values():
        if metric not in families:
            families[metric] = CounterMetricFamily(
                PREFIX + metric, documentation, labels=["interface", *labels]
            )
    for capture in stats.captures:
        up.add_metric([capture.interface], float(capture.running))
        for name, value in capture.counters.items():
            metric, _, labels = ENGINE_COUNTERS[name]
            families[metric].add_metric([capture.interface, *labels.values()], value)
    yield up
    yield from families.values()


def _judging_families(stats: DoormanStats) -> Iterator[Metric]:
    decisions = CounterMetricFamily(
        PREFIX + "decisions",
        "Messages judged, by verdict and reason (docs/admin.md, the reasons table).",
        labels=["verdict", "reason"],
    )
    for (verdict, reason), count in sorted(stats.decisions.items()):
        decisions.add_metric([verdict, reason], count)
    yield decisions
    latency = stats.judging_latency
    cumulative, buckets = 0, []
    for bound, count in zip((*latency.bounds, math.inf), latency.counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
    yield HistogramMetricFamily(
        PREFIX + "judging_latency_seconds",
        "Seconds from a message's last packet (its capture time) to its decision.",
        buckets=buckets,
        sum_value=latency.total,
    )
    yield _gauge("backlog_completions", "Completions waiting to be judged.", stats.backlog)
    yield _gauge(
        "backlog_limit_completions", "Completions the backlog holds at most.", stats.backlog_limit
    )
    yield _counter(
        "backlog_dropped_completions",
        "Completions refused because the backlog was full.",
        stats.backlog_dropped,
    )
    yield _gauge(
        "replay_cache_messages", "Accepted messages remembered against replays.",
        stats.replay_entries,
    )  # fmt: skip
    yield _gauge(
        "replay_cache_degraded",
        "1 when the replay cache went on in memory only (see the log): a restart forgets it.",
        float(stats.replay_degraded is not None),
    )


def _firewall_families(stats: DoormanStats) -> Iterator[Metric]:
    backend = [stats.firewall_backend]

    def per_backend(kind, name: str, documentation: str, value: float, **labels: str):
        family = kind(PREFIX + name, documentation, labels=["backend", *labels])
        family.add_metric([*backend, *labels.values()], value)
        return family

    yield per_backend(
        GaugeMetricFamily, "grants", "Live grants in the firewall.", stats.grants_live
    )
    changes = CounterMetricFamily(
        PREFIX + "grant_changes",
        "Grant changes carried out: opened, extended, kept (an open that found a longer "
        "grant), closed, expired.",
        labels=["backend", "change"],
    )
    for change in GRANT_CHANGES:
        changes.add_metric([*backend, change], stats.grant_changes.get(change, 0))
    yield changes
    yield per_backend(
        CounterMetricFamily,
        "firewall_failures",
        "Firewall changes and sweeps given up on after every attempt (see the log).",
        stats.firewall_failed,
    )
    yield per_backend(
        CounterMetricFamily,
        "firewall_retries",
        "Firewall attempts repeated after a failure.",
        stats.firewall_retried,
    )
    yield per_backend(
        GaugeMetricFamily,
        "firewall_queue_changes",
        "Grant changes waiting for the firewall thread.",
        stats.firewall_pending,
    )
    yield per_backend(
        CounterMetricFamily,
        "firewall_queue_dropped_changes",
        "Grant changes refused because the firewall queue was full.",
        stats.firewall_dropped,
    )


# The link's counters (fleetlink.FLEET_COUNTERS) as metric, label -> value.
FLEET_CLAIMS = {
    "claims_new": "new",
    "claims_taken": "taken",
    "claims_unsent": "unsent",
    "claims_lost": "lost",
    "claims_again": "again",
}
FLEET_EVENTS = {
    "published": "published",
    "publish_dropped": "dropped",
    "applied": "applied",
    "rejected": "rejected",
}


def _fleet_families(fleet: FleetStats) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        PREFIX + "fleet_up",
        "1 while this gateway reaches the fleet's Redis, 0 while it judges alone (see the log).",
        labels=["gateway"],
    )
    up.add_metric([fleet.gateway], float(fleet.up))
    yield up
    yield _outcomes(
        "fleet_claims",
        "Accepted messages claimed fleet-wide: new (first here), taken (another gateway had "
        "it: a replay), unsent (accepted while the fleet was unreachable, claimed later), "
        "lost (of those, dropped from a full queue), again (claimed again after Redis lost "
        "its data).",
        FLEET_CLAIMS,
        fleet.counters,
    )
    yield _outcomes(
        "fleet_events",
        "Grant changes on the fleet's stream: published by this gateway, dropped while Redis "
        "was away, applied from other gateways, rejected (not made with the fleet key, "
        "stale, or not allowed here).",
        FLEET_EVENTS,
        fleet.counters,
    )
    yield _counter("fleet_outages", "Times the link to the fleet's Redis was lost.",
                   fleet.counters.get("outages", 0))  # fmt: skip
    yield _gauge("fleet_outbox_changes", "This gateway's changes waiting to be published.",
                 fleet.outbox)  # fmt: skip
    yield _gauge("fleet_unsent_claims", "Claims waiting for the fleet's Redis.",
                 fleet.unsent_claims)  # fmt: skip


def _outcomes(
    name: str, documentation: str, outcomes: Mapping[str, str], counters: Mapping[str, int]
) -> CounterMetricFamily:
    """One counter labelled ``outcome``: each of ``outcomes`` (counter -> label) a sample."""
    family = CounterMetricFamily(PREFIX + name, documentation, labels=["outcome"])
    for counter, outcome in outcomes.items():
        family.add_metric([outcome], counters.get(counter, 0))
    return family


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # a line per scrape would drown the decision log


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up the daemon's exit


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


def serve_http(settings: MetricsSettings, registry: CollectorRegistry) -> WSGIServer:
    """The endpoint on ``settings.listen``, served by a thread of its own; OSError (the
    port is taken, the address is not this host's) goes to the caller."""
    assert settings.listen is not None
    address, port = settings.listen
    server_class = _ThreadingServer6 if address.version == 6 else _ThreadingServer
    server = make_server(
        str(address), port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="knockd-fast-metrics", daemon=True).start()
    return server


def write_atomically(path: Path, data: bytes) -> None:
    """Readers (status, node_exporter) see the old file or the new one, never half."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)  # counters only: node_exporter runs as its own user
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


class MetricsPublisher:
    """Takes the loop's snapshots and publishes them: the HTTP endpoint (if configured)
    and the files. ``start`` raises OSError when the endpoint cannot listen."""

    def __init__(
        self, settings: MetricsSettings, state_dir: Path, build: Mapping[str, str]
    ) -> None:
        self.settings = settings
        self.state_file = state_dir / STATE_FILE
        self.collector = DoormanCollector(build)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._server: WSGIServer | None = None
        self._next_snapshot = 0.0
        self._next_file = 0.0
        self._written_changes: dict[str, int] = {}
        self._complained: dict[Path, float] = {}

    def start(self) -> None:
        if self.settings.listen is not None:
            self._server = serve_http(self.settings, self.registry)

    def due(self, now: float) -> bool:
        """Whether the loop should take a snapshot (``now``: time.monotonic())."""
        return now >= self._next_snapshot

    def publish(self, stats: DoormanStats, now: float) -> None:
        self._next_snapshot = now + SNAPSHOT_SECONDS
        self.collector.update(stats)
        # Also at once when a grant changed, so that `status` right after a knock agrees
        # with the grants it lists (at most every SNAPSHOT_SECONDS, as snapshots come).
        changed = stats.grant_changes != self._written_changes
        if now >= self._next_file or changed:
            self._next_file = now + FILE_SECONDS
            self._written_changes = dict(stats.grant_changes)
            self.write_files()

    def reconfigure(self, config: Config) -> None:
        """SIGHUP: a new textfile applies at once (the endpoint stays as started)."""
        self.settings = config.metrics
        self._next_file = 0.0

    def write_files(self) -> None:
        data = generate_latest(self.registry)
        paths = [self.state_file]
        if self.settings.textfile is not None:
            paths.append(self.settings.textfile)
        for path in paths:
            try:
                write_atomically(path, data)
            except OSError as error:
                last = self._complained.get(path, -math.inf)
                if time.monotonic() - last >= COMPLAIN_SECONDS:
                    self._complained[path] = time.monotonic()
                    log.warning(
                        "metrics: cannot write %s (%s); retrying every %.0f s",
                        path,
                        error.strerror or error,
                        FILE_SECONDS,
                    )

    def close(self, stats: DoormanStats) -> None:
        """The final counters into the files; the endpoint stops."""
        self.collector.update(stats)
        self.write_files()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# --- reading the published file back (``knockd-fast status``) ----------------------------


@dataclass(frozen=True)
class InterfaceCounters:
    interface: str
    up: bool
    packets: int
    dropped_by_kernel: int
    dropped_by_interface: int
    completions: int


@dataclass(frozen=True)
class Published:
    """What ``status`` shows of a ``metrics.prom`` file."""

    time: float  # when the loop took the snapshot
    interfaces: tuple[InterfaceCounters, ...]
    decisions: Mapping[tuple[str, str], int]  # (verdict, reason) -> count
    backlog: int
    backend: str
    grants: int
    grant_changes: Mapping[str, int]
    firewall_failures: int
    replay_degraded: bool
    fleet: Mapping[str, object] | None = None  # gateway, up, claims and events by outcome


def read_published(path: Path) -> Published | None:
    """The counters of ``path`` (the state directory's ``metrics.prom``); None when there is
    no such file or it holds no snapshot yet. OSError and ValueError go to the caller."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    if PREFIX + "last_snapshot_timestamp_seconds" not in samples:
        return None

    def by(name: str, label: str) -> dict[str, int]:
        return {labels[label]: int(value) for labels, value in samples.get(PREFIX + name, [])}

    def one(name: str) -> float:
        return samples[PREFIX + name][0][1]

    dropped: dict[tuple[str, str], int] = {
        (labels["interface"], labels["by"]): int(value)
        for labels, value in samples.get(PREFIX + "capture_dropped_packets_total", [])
    }
    packets = by("capture_packets_total", "interface")
    completions = by("completions_total", "interface")
    interfaces = tuple(
        InterfaceCounters(
            name,
            bool(up),
            packets.get(name, 0),
            dropped.get((name, "kernel"), 0),
            dropped.get((name, "interface"), 0),
            completions.get(name, 0),
        )
        for name, up in by("capture_up", "interface").items()
    )
    grants = samples.get(PREFIX + "grants", [({"backend": "?"}, 0.0)])[0]
    return Published(
        time=one("last_snapshot_timestamp_seconds"),
        interfaces=interfaces,
        decisions={
            (labels["verdict"], labels["reason"]): int(value)
            for labels, value in samples.get(PREFIX + "decisions_total", [])
        },
        backlog=int(one("backlog_completions")),
        backend=grants[0]["backend"],
        grants=int(grants[1]),
        grant_changes=by("grant_changes_total", "change"),
        firewall_failures=int(one("firewall_failures_total")),
        replay_degraded=bool(one("replay_cache_degraded")),
        fleet=_published_fleet(samples, by),
    )


def _published_fleet(samples: Mapping[str, list], by: Callable) -> dict[str, object] | None:
    found = samples.get(PREFIX + "fleet_up")
    if not found:
        return None
    labels, up = found[0]
    return {
        "gateway": labels["gateway"],
        "up": bool(up),
        "claims": by("fleet_claims_total", "outcome"),
        "events": by("fleet_events_total", "outcome"),
        "outages": int(samples.get(PREFIX + "fleet_outages_total", [({}, 0)])[0][1]),
    }
