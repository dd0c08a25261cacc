"""The doorman's loop: capture batch -> judging -> sinks -> firewall -> expiry.

Data flows one way (docs/capture.md, ../shared/GUIDE.md): the engines rebuild messages
without Python per packet; ``judging`` turns completions into decisions and grant changes;
each slice's decisions go to the sinks (``sinks``), its changes to the firewall thread
(``firewall.worker``), which also sweeps expiry.

Reading and judging take turns on one thread: every turn reads all that the captures
hold (the engine costs ~0.3 µs a packet) into a backlog of completions, then judges
``JUDGE_SLICE`` of them (~50-150 µs each in Python; a quarter of the backlog, up to
``MAX_JUDGE_SLICE``, when a burst waits). So a burst of completions never leaves the
kernel's buffer unread for more than some tens of milliseconds: judging lags behind,
packets are not dropped.
"""

from __future__ import annotations

import collections
import gc
import logging
import select
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from knock_client.protocol import Action

from .capture_spec import BLOCK_TIMEOUT_MS, CaptureError
from .config import CaptureSettings, Config, ConfigError, IPAddress, load_config, reloaded
from .firewall.base import Firewall, Grant, GrantChange
from .firewall.worker import FirewallWorker, describe, grant_fields
from .fleet import MAX_EVENT_SKEW
from .hints import SWEEP_SECONDS, FailedKnockHints
from .judging import MIN_BACKLOG, Backlog, Judge
from .logs import Event, flush_logs
from .replay import ReplayCache
from .sdnotify import ServiceNotifier
from .sinks import DecisionSink
from .stats import CaptureStats, DoormanStats, LatencyHistogram, StatsPublisher, counters_text

log = logging.getLogger("knockd_fast")

REOPEN_SECONDS = 1  # how often a lost capture is retried
WAIT_SECONDS = 0.25  # longest wait for packets before the loop looks at signals and timers
PUMP_BATCHES = 64  # dispatches per interface and turn, so a flood on one starves no other
JUDGE_SLICE = 64  # completions judged per turn, between two reads of the captures
# ... and up to this many when a burst waits: each slice is one replay-cache transaction
# and one hand-over to the firewall thread, so a long backlog is judged in fewer, larger
# ones (1,024 at ~40 µs is ~40 ms between reads, well inside the kernel buffer's 0.64 s).
MAX_JUDGE_SLICE = 1024
PRUNE_SECONDS = 60  # how often the replay cache forgets expired messages
# Light turns (packets read at under LIGHT_TURN_PPS since the turn before, nothing left to
# judge) are paced to one per TURN_SECONDS once TURN_BURST of them came back to back. A
# wake-up costs a VM like ours 100-300 µs of CPU whatever the turn then does (cold caches,
# the idle exit; bench/README.md), and a trickle of packets wakes the loop at every capture
# block (5 ms): at 20,000 pps that was a third of the daemon's CPU. The burst lets a lone
# knock whose packets span a few blocks through at once; a heavy turn (a flood, a burst of
# completions) is never held back, so under a flood knock-to-grant latency and the kernel
# buffer are as before. Below LIGHT_TURN_PPS a knock may wait up to TURN_SECONDS more.
TURN_SECONDS = 0.02
TURN_BURST = 4
LIGHT_TURN_PPS = 50_000


# The cycle collector's first generation: collected after this many new container
# objects, not CPython's 700. Judging a knock makes a dozen, kept until its slice is
# handed over: at 700 each slice's objects were traversed again and again on their way to
# the oldest generation, whose full collections then grew with every live grant: a fifth
# of the CPU of a burst of grants. A few MB of garbage wait a little longer instead.
GC_YOUNG_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """Set the process's collector up for the loop (``knockd-fast run``, before
    ``Doorman.run``): what start-up made (modules, configuration) is frozen out of every
    collection, and the young generation is larger."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def slice_size(waiting: int) -> int:
    """How many of ``waiting`` completions one turn judges."""
    return min(MAX_JUDGE_SLICE, max(JUDGE_SLICE, waiting // 4))


def open_capture(engine: Any, interface: str, settings: CaptureSettings) -> None:
    """Open the live handle (raises CaptureError); the engine's table and counters carry over."""
    engine.open_live(interface, buffer_bytes=settings.buffer_bytes)
    engine.set_nonblocking()


@dataclass(eq=False)
class Capture:
    """One capture interface: its engine (its own table and counters) and whether it is lost."""

    interface: str
    engine: Any
    lost_at: float | None = None  # when the capture failed; None while it runs
    retry_at: float = 0.0  # when to try to reopen it next
    last_complaint: float = 0.0


def open_captures(config: Config, destinations: Sequence[IPAddress]) -> list[Capture]:
    """One engine per ``capture.interfaces`` entry, opened live; raises CaptureError (the
    ones opened already are closed again)."""
    from ._capture import engine_for

    captures: list[Capture] = []
    try:
        for interface in config.capture.interfaces:
            engine = engine_for(config, destinations)
            captures.append(Capture(interface, engine))
            open_capture(engine, interface, config.capture)
    except BaseException:
        for capture in captures:
            capture.engine.close()
        raise
    return captures


class TurnPacer:
    """How long the loop pauses after a turn: a token bucket of ``burst`` light turns,
    refilled at one per ``period`` seconds (``TURN_SECONDS``). Each turn takes a token for
    the next; a light turn that finds none pauses until one has come, a heavy one goes on."""

    def __init__(
        self,
        period: float = TURN_SECONDS,
        burst: int = TURN_BURST,
        light_pps: float = LIGHT_TURN_PPS,
    ):
        self.period = period
        self.burst = burst
        self.light_pps = light_pps
        self._tokens = float(burst)
        self._last: float | None = None

    def pause(self, now: float, packets: int, waiting: int) -> float:
        """Seconds to wait before the next turn, after one that ended at ``now`` (a
        monotonic clock) having read ``packets`` and left ``waiting`` completions."""
        since = self.period if self._last is None else now - self._last
        self._tokens = min(self.burst, self._tokens + since / self.period) - 1
        self._last = now
        if packets > self.light_pps * since or waiting:
            self._tokens = max(0.0, self._tokens)
            return 0.0
        return max(0.0, -self._tokens * self.period)


class Doorman:
    """The live daemon: a capture engine per interface, one judge, the decision sinks, one
    firewall worker, the replay cache.

    Every engine's completions go through the same ``Judge``. Each interface is lost and
    reopened on its own: the others go on capturing meanwhile. ``grants`` are the live
    grants read back from the firewall at start: they count against their users' caps,
    and those the configuration no longer entitles are closed.
    """

    def __init__(
        self,
        config: Config,
        captures: Sequence[Capture],
        firewall: Firewall,
        replay: ReplayCache,
        sinks: Sequence[DecisionSink] = (),
        clock: Callable[[], float] = time.time,
        worker: FirewallWorker | None = None,
        grants: Sequence[Grant] = (),
        publisher: StatsPublisher | None = None,
        destinations: Sequence[IPAddress] = (),
    ):
        self.config = config
        # The addresses protected (() for the captures' own): a fleet's grants must be for one.
        self.destinations = frozenset(destinations)
        self.capture_settings = config.capture  # [capture] changes apply at the next start
        self.captures = list(captures)
        self.firewall = firewall
        self.replay = replay
        self.sinks = list(sinks)
        self.clock = clock
        self.worker = worker or FirewallWorker(firewall, clock)
        self.fleet = None
        if config.fleet.enabled:  # [fleet]: claims and grants shared through Redis
            from .fleetlink import FleetLink

            position = config.state_dir / "fleet.position"
            self.fleet = FleetLink(config.fleet, self.worker, self.entitled, clock, position)
        self.judge = Judge(config, replay, grants, self.fleet)
        self.backlog = Backlog(max(MIN_BACKLOG, config.capture.table_size), clock)
        self.decided: collections.Counter[tuple[str, str]] = collections.Counter()
        self.latency = LatencyHistogram()
        self.hints = FailedKnockHints(config.knock.layout)  # the running layout: kept on reload
        self.worker.track(grants)
        self.publisher = publisher
        self.started = clock()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.close_unentitled("start")

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())

    def stop(self) -> None:
        self._stop.set()

    def entitled(self, grant: Grant) -> str | None:
        """Why this gateway's configuration does not let ``grant`` stand (an open another
        gateway of the fleet made), or None: its user is known here and may open that port,
        on an address this gateway protects, for no longer than its grants last."""
        user = next((u for u in self.config.users.values() if u.name == grant.user), None)
        if user is None:
            return f"no user {grant.user!r} here"
        if not user.allows(grant.port, grant.proto):
            return f"user {grant.user!r} may not open {grant.port}/{grant.proto} here"
        # Every grant a gateway makes names the address knocked; one for "any address" (or
        # one this gateway does not protect) was made by no gateway of this fleet.
        if grant.destination is None or (
            self.destinations and grant.destination not in self.destinations
        ):
            return f"{grant.destination or 'any address'} is not protected here"
        longest = self.clock() + self.config.grants.max_timeout + MAX_EVENT_SKEW
        if grant.expires > longest:
            return f"it lasts longer than grants.max_timeout ({self.config.grants.max_timeout} s)"
        return None

    def run(self) -> None:
        self.worker.start()
        if self.fleet is not None:
            self.fleet.start()
        service = ServiceNotifier.from_environment()  # systemd's Type=notify and watchdog
        service.ready(f"capturing on {self.capture_settings.label}, {self.firewall.name} backend")
        last_prune = self.clock()
        next_sweep = self.clock() + SWEEP_SECONDS
        pacer = TurnPacer()
        try:
            while not self._stop.is_set():
                service.turn()
                live = [c for c in self.captures if c.lost_at is None]
                wait = 0.0 if len(self.backlog) else WAIT_SECONDS
                if live:
                    select.select([c.engine.fileno() for c in live], [], [], wait)
                elif wait:
                    self._stop.wait(wait)
                packets = sum(self.read(capture) for capture in live)
                self.judge_backlog(slice_size(len(self.backlog)))
                for capture in self.captures:
                    if capture.lost_at is not None and self.clock() >= capture.retry_at:
                        self._reopen(capture)
                if self._reload.is_set():
                    self._reload.clear()
                    with service.reloading():
                        self.reload()
                if self.clock() >= next_sweep:
                    next_sweep = self.clock() + SWEEP_SECONDS
                    self.sweep_failed_knocks()
                if self.fleet is not None and self.fleet.reclaim.is_set():
                    self.fleet.reclaim.clear()  # Redis lost the claims: make them again
                    self.fleet.claim_later(self.replay.live(self.clock()), again=True)
                if self.clock() - last_prune > PRUNE_SECONDS:
                    last_prune = self.clock()
                    self.replay.prune(last_prune)
                self._to_sinks("tick", self.clock())
                turn_end = time.monotonic()
                if self.publisher is not None and self.publisher.due(turn_end):
                    self.publisher.publish(self.stats(), turn_end)
                flush_logs()
                pause = pacer.pause(turn_end, packets, len(self.backlog))
                if pause:
                    self._stop.wait(pause)
        finally:
            service.stopping()
            live = [c for c in self.captures if c.lost_at is None]
            if live:  # packets of the last moments are in a block not yet handed over
                time.sleep(2 * BLOCK_TIMEOUT_MS / 1000)
            for capture in live:
                self.read(capture)
            self.judge_backlog(None)
            self._to_sinks("close")
            if self.fleet is not None:  # nothing more from the stream for the worker
                self.fleet.stop_following()
            self.worker.stop()
            if self.fleet is not None:  # after the worker: its last changes are published
                self.fleet.stop()
            stats = self.stats()
            if self.publisher is not None:
                self.publisher.close(stats)
            self._log_stop(stats)
            flush_logs()

    def sweep_failed_knocks(self) -> None:
        """Free the partial knocks that timed out, and hint at sources whose knocks keep
        failing before they can be judged (``hints``)."""
        now = self.clock()
        for capture in self.captures:
            if capture.lost_at is None:
                capture.engine.sweep(now)
                self.hints.observe(capture.engine.failed_knocks(), capture.interface, now)
        hint = self.hints.hint(now)
        if hint is not None:
            log.warning(hint)

    def stats(self) -> DoormanStats:
        """Every counter of the daemon, at this moment (call it on the loop's thread)."""
        return DoormanStats(
            time=self.clock(),
            captures=tuple(
                CaptureStats(c.interface, c.lost_at is None, c.engine.stats())
                for c in self.captures
            ),
            backlog=len(self.backlog),
            backlog_limit=self.backlog.limit,
            backlog_dropped=self.backlog.dropped,
            decisions=dict(self.decided),
            firewall_backend=self.firewall.name,
            firewall_applied=self.worker.applied,
            firewall_failed=self.worker.failed,
            firewall_retried=self.worker.retried,
            firewall_absorbed=self.worker.queue.absorbed,
            firewall_dropped=sum(self.worker.queue.dropped.values()),
            replay_entries=len(self.replay),
            replay_degraded=self.replay.degraded,
            judging_latency=self.latency.snapshot(),
            grants_live=self.worker.live,
            grant_changes=dict(self.worker.changes),
            firewall_pending=self.worker.pending(),
            started=self.started,
            fleet=self.fleet.stats() if self.fleet is not None else None,
        )

    def _log_stop(self, stats: DoormanStats) -> None:
        """The ``stopped:`` line: counters summed over the interfaces, each one's before it
        when there are several."""
        if len(stats.captures) > 1:
            for capture in stats.captures:
                text = f"stopped capture on {capture.interface}: {counters_text(capture.counters)}"
                log.info(
                    Event(text, "stop", interface=capture.interface, counters=capture.counters)
                )
        log.info(Event(f"stopped: {stats.stop_line()}", "stop", counters=stats.stop_counters()))

    def read(self, capture: Capture) -> int:
        """Read what one capture holds (at most ``PUMP_BATCHES`` dispatches) into the
        backlog of completions; return how many packets that was."""
        from ._capture import CaptureError

        total = 0
        for _ in range(PUMP_BATCHES):
            try:
                count = capture.engine.dispatch()
            except CaptureError as error:
                # The interface went away: keep grants, replay cache and partial knocks
                # (of this interface and the others), and reopen it when it is back.
                log.error(
                    "capture on %s lost: %s; reopening every %d s, grants kept",
                    capture.interface,
                    error,
                    REOPEN_SECONDS,
                )
                capture.engine.close()
                capture.lost_at = self.clock()
                capture.retry_at = capture.lost_at + REOPEN_SECONDS
                count = 0
            total += count
            records = capture.engine.drain()
            if len(records):
                self.backlog.add(capture.interface, records)
            if count == 0:
                break
        return total

    def judge_backlog(self, limit: int | None) -> int:
        """Judge up to ``limit`` waiting completions (all: None) as one replay-cache
        transaction; then hand the decisions to the sinks and the grant changes to the
        firewall worker. Returns how many were judged."""
        decisions, changes = self.judge.judge_slice(self.backlog, limit, self.clock)
        if decisions:
            self.decided.update((d.verdict, d.reason) for d in decisions)
            judged_at = self.clock()
            self.latency.observe(judged_at - d.time for d in decisions)
            self._to_sinks("write", decisions)
        self.worker.submit(changes)
        return len(decisions)

    def _to_sinks(self, method: str, *args: Any) -> None:
        """``DecisionSink.<method>(*args)`` on every sink; a sink's bug is logged, never
        raised (it must not lose the firewall changes, nor stop the loop)."""
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception:
                log.exception("internal error in decision sink %s", type(sink).__name__)

    def _reopen(self, capture: Capture) -> None:
        from ._capture import CaptureError

        capture.retry_at = self.clock() + REOPEN_SECONDS
        try:
            open_capture(capture.engine, capture.interface, self.capture_settings)
        except CaptureError as error:
            if self.clock() - capture.last_complaint >= 60:
                capture.last_complaint = self.clock()
                log.warning("capture on %s still unavailable: %s", capture.interface, error)
            return
        log.info(
            "capture on %s resumed after %.1f s",
            capture.interface,
            self.clock() - capture.lost_at,
        )
        capture.lost_at = None

    def reload(self) -> None:
        """SIGHUP: new users and keys (and grant/timing settings); a broken file changes nothing.
        The firewall thread reads the grants back from the kernel either way (an admin may
        have changed them by hand)."""
        self.worker.request_reread()
        try:
            fresh = load_config(self.config.path)
        except ConfigError as error:
            text = f"reload failed, keeping the running configuration: {error}"
            log.error(Event(text, "reload", error=str(error)))
            return
        fresh, pending = reloaded(self.config, fresh)
        if pending:
            text = "reload: these apply at the next restart, it runs as started until then: "
            log.warning(Event(text + "; ".join(pending), "reload", pending=pending))
        from ._capture import admission_of

        for capture in self.captures:
            try:
                capture.engine.admit(**admission_of(fresh))
            except CaptureError as error:  # a filter libpcap will not set: keep the old one
                log.error("reload: %s: %s; its old modes and users stay", capture.interface, error)
        self.config = fresh
        self.judge.config = fresh
        if self.fleet is not None:  # what it does while Redis is away (the rest: restart)
            self.fleet.settings = fresh.fleet
        self.replay.raise_window(fresh.knock.window)
        if self.publisher is not None:
            self.publisher.reconfigure(fresh)
        self.close_unentitled("reload")
        text = f"reloaded {fresh.path}: {len(fresh.users)} users"
        log.info(Event(text, "reload", users=len(fresh.users)))

    def close_unentitled(self, when: str) -> None:
        """Close, through the worker, the live grants of users the configuration no longer
        has, and those for ports their users may no longer open; ``when`` heads the log."""
        revoked = self.judge.limits.revoke(self.config.users, self.clock())
        for grant, why in revoked:
            text = f"{when}: closing {describe(grant, expiry=False)} ({why})"
            log.info(Event(text, "firewall", change="revoking", why=why, **grant_fields(grant)))
        self.worker.submit([GrantChange(Action.CLOSE, grant) for grant, _ in revoked])
