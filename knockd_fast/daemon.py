"""The doorman's loop: capture batch -> verdicts -> firewall -> expiry sweep.

Data flows one way (docs/capture.md, ../shared/GUIDE.md): the engine rebuilds messages
without Python per packet; here each completion is judged (``verdict.judge``), an accepted
one is remembered against replays and turned into a firewall action. Firewall work runs
on its own thread (``FirewallWorker``), so a burst of grants never holds up the capture:
the kernel keeps queueing packets in the capture buffer while libiptc commits.

Reading and judging take turns on one thread: every turn reads all that the captures
hold (the engine costs ~0.3 µs a packet) into a backlog of completions, then judges at
most ``JUDGE_SLICE`` of them (~50-150 µs each in Python). So a burst of completions never
leaves the kernel's buffer unread for more than a few milliseconds: judging lags behind,
packets are not dropped. Each slice is one replay-cache transaction, and its firewall
actions are handed over only once that transaction is committed.
"""

from __future__ import annotations

import collections
import functools
import io
import ipaddress
import json
import logging
import math
import queue
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from knock_client.protocol import Action

from .candidates import candidate_messages
from .capture_spec import BLOCK_TIMEOUT_MS, KIND_SPA, MAX_DESTINATIONS, key_address
from .config import CaptureSettings, Config, ConfigError, IPAddress, load_config
from .firewall.base import Firewall, FirewallBusy, FirewallError, Grant
from .replay import ReplayCache
from .verdict import grant_duration, judge, replay_expiry

log = logging.getLogger("knockd_fast")


class StartError(Exception):
    """The daemon cannot start (interface, firewall, state); the message is one line."""


decisions_log = logging.getLogger("knockd_fast.decisions")

FIREWALL_RETRIES = (0.1, 0.5, 2.0)  # seconds between attempts of one firewall action
# Seconds one attempt waits for the xtables lock once the daemon runs (at start it waits
# the backend's default, 5 s). With the pauses above, a change held up by another process
# holding the lock gives up after about 4 * 1 + 2.6 = 6.6 s, so one stuck `iptables -w`
# never stalls the firewall thread (and the expiry sweep) for long per change.
FIREWALL_LOCK_WAIT = 1.0
SWEEP_SECONDS = 1.0  # how often expired grants are removed
REOPEN_SECONDS = 1  # how often a lost capture is retried
WAIT_SECONDS = 0.25  # longest wait for packets before the loop looks at signals and timers
PUMP_BATCHES = 64  # dispatches per interface and turn, so a flood on one starves no other
JUDGE_SLICE = 64  # completions judged per turn, between two reads of the captures
# Completions waiting to be judged: at least this many, or as many as the table holds
# sources (all knocks in progress may complete in one burst: 120 bytes each, a fifth of
# the table's own memory). Past it new ones are dropped, counted and logged, so memory
# stays bounded when someone floods us with whole bogus knocks.
MIN_BACKLOG = 65_536


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


@dataclass(frozen=True)
class Decision:
    """One line of the decision log: who knocked, for what, and what we decided."""

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

    def as_json(self) -> dict[str, Any]:
        return {
            "time": _iso(self.time),
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
            f"{_iso(self.time)} {self.source}{via} user={self.user or '-'} {what} "
            f"{self.verdict} {self.reason}: {self.detail}"
        )


def _iso(when: float) -> str:
    """UTC with milliseconds, e.g. 2026-11-27T10:46:26.123Z."""
    second = int(when // 1)
    return f"{_iso_second(second)}.{int((when - second) * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    # Every decision is logged with a time: formatting the same second once saves ~10 µs.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def emit(decision: Decision, as_json: bool) -> None:
    text = json.dumps(decision.as_json()) if as_json else decision.as_text()
    decisions_log.info(text)


class TurnFlushedHandler(logging.StreamHandler):
    """Standard error, written once per turn of the daemon's loop instead of once per line.

    A flush is a write(2), and each one hands the GIL to the other thread and back: with a
    line per decision and per firewall action that cost more than judging (bench/live.py).
    ``flush_logs()`` runs at the end of every turn (at least every ``WAIT_SECONDS``) and
    after every firewall job; a line waits at most that long. Closing flushes, so a normal
    exit loses nothing; a kill -9 loses at most the current turn's lines.
    """

    def __init__(self) -> None:
        # Our own descriptor-2 writer: sys.stderr is line-buffered (a write per line).
        stream = io.TextIOWrapper(
            io.BufferedWriter(io.FileIO(2, "w", closefd=False), 1 << 16),
            encoding="utf-8",
            errors="backslashreplace",
        )
        super().__init__(stream)

    def flush(self) -> None:
        """Called by emit() after every record: deferred to ``flush_now``."""

    def flush_now(self) -> None:
        super().flush()

    def close(self) -> None:
        try:
            self.flush_now()
        finally:
            super().close()


def flush_logs() -> None:
    """Write out the lines ``TurnFlushedHandler`` holds (a no-op for other handlers)."""
    for handler in logging.getLogger("knockd_fast").handlers:
        if isinstance(handler, TurnFlushedHandler):
            try:
                handler.flush_now()
            except (OSError, ValueError):  # stderr gone or closed: nothing to do about it
                pass


class Judge:
    """Completions -> decisions and firewall actions; the same for live runs and replays."""

    def __init__(self, config: Config, replay: ReplayCache, act: Callable[[str, Grant], None]):
        self.config = config
        self.replay = replay
        self.act = act  # ("open" | "close", grant) -> None; never blocks on the firewall

    def decide(self, record: np.void, now: float, interface: str | None = None) -> Decision:
        """Judge one completion; ``interface`` (the capture it came from) is only logged."""
        source = key_address(bytes(record["source"]))
        destination = key_address(bytes(record["destination"]))
        settings = self.config.knock
        kind_enabled = (
            "spa" in settings.modes if record["kind"] == KIND_SPA else settings.knock_mode
        )
        if not kind_enabled:
            mode = "spa" if record["kind"] == KIND_SPA else "knock"
            return Decision(
                now,
                str(source),
                str(destination),
                None,
                None,
                None,
                None,
                "rejected",
                "not_allowed",
                f"{mode} mode is disabled",
                interface,
            )
        verdict = judge(
            candidate_messages(record, settings.layout.digit_bits),
            source,
            destination,
            now,
            self.config.users,
            settings.window,
            lambda user_id, siv: self.replay.seen(user_id, siv, now),
        )
        knock = verdict.knock
        decision = Decision(
            now,
            str(source),
            str(destination),
            verdict.user.name if verdict.user else None,
            str(knock.action) if knock else None,
            knock.port if knock else None,
            str(knock.proto) if knock else None,
            "accepted" if verdict.accepted else "rejected",
            verdict.reason,
            verdict.detail,
            interface,
        )
        if verdict.accepted:
            assert knock is not None and verdict.user is not None and verdict.siv is not None
            self.replay.remember(
                verdict.user.id, verdict.siv, replay_expiry(knock, now, settings.window)
            )
            duration = grant_duration(knock, self.config.grants)
            grant = Grant(
                source=source,
                proto=str(knock.proto),
                port=knock.port,
                destination=destination,
                expires=int(now) + duration,
                user=verdict.user.name,
            )
            self.act("close" if knock.action == Action.CLOSE else "open", grant)
        return decision


class FirewallWorker(threading.Thread):
    """Applies grants in order on its own thread, retries failures, sweeps expiry.

    A failed action is retried after each pause of ``FIREWALL_RETRIES``. Before a retry the
    chain and jumps are restored (someone may have flushed them), except when the failure
    was the xtables lock held by another process: then only waiting helps. After the last
    attempt the failure is logged with its cause and what it left behind, read back from
    the firewall, so the log never claims a grant the firewall does not hold.
    """

    def __init__(
        self,
        firewall: Firewall,
        clock: Callable[[], float] = time.time,
        lock_wait: float | None = FIREWALL_LOCK_WAIT,
    ):
        super().__init__(name="knockd-fast-firewall", daemon=True)
        self.firewall = firewall
        if lock_wait is not None and hasattr(firewall, "lock_wait"):
            firewall.lock_wait = lock_wait  # the iptables backend; the dry run has no lock
        self.clock = clock
        # The dry-run backend logs its own actions at debug level in the daemon: one line
        # per action, and it says which kind of firewall it was.
        self.tag = (
            "firewall (dry run)" if getattr(firewall, "name", "") == "dry-run" else "firewall"
        )
        self.jobs: queue.Queue[list[tuple[str, Grant]] | None] = queue.Queue()
        self.applied = 0
        self.failed = 0

    def submit_many(self, actions: Sequence[tuple[str, Grant]]) -> None:
        """Several actions, applied in order; one hand-over for the lot."""
        if actions:
            self.jobs.put(list(actions))

    def stop(self) -> None:
        self.jobs.put(None)
        self.join()

    def run(self) -> None:
        next_sweep = self.clock() + SWEEP_SECONDS
        while True:
            try:
                job = self.jobs.get(timeout=max(0.0, next_sweep - self.clock()))
            except queue.Empty:
                pass
            else:
                if job is None:
                    return
                for action, grant in job:
                    self._apply(action, grant)
                flush_logs()
            if self.clock() >= next_sweep:
                self._apply("expire", None)
                next_sweep = self.clock() + SWEEP_SECONDS
                flush_logs()

    def _apply(self, action: str, grant: Grant | None) -> None:
        for attempt, pause in enumerate((*FIREWALL_RETRIES, None)):
            try:
                if action == "open":
                    self.firewall.open(grant)
                    log.info("%s: opened %s", self.tag, _describe(grant))
                elif action == "close":
                    found = self.firewall.close(grant.key)
                    log.info(
                        "%s: %s %s",
                        self.tag,
                        "closed" if found else "no grant to close for",
                        _describe(grant, expiry=False),
                    )
                else:
                    for gone in self.firewall.expire(int(self.clock())):
                        log.info("%s: expired %s", self.tag, _describe(gone, expiry=False))
                self.applied += action != "expire"
                return
            except FirewallError as error:
                if pause is None:
                    self.failed += 1
                    self._give_up(action, grant, attempt + 1, error)
                    return
                log.warning("firewall: %s failed (%s); retrying in %.1f s", action, error, pause)
                time.sleep(pause)
                if not isinstance(error, FirewallBusy):
                    self._heal()
            except Exception:  # a bug must not kill the thread that closes ports
                log.exception("firewall: unexpected error during %s", action)
                self.failed += 1
                return

    def _heal(self) -> None:
        # Someone may have flushed or deleted our chain or the jump to it: setup() is
        # idempotent and commits nothing when all is in place.
        try:
            self.firewall.setup()
        except FirewallError as error:
            log.warning("firewall: cannot restore the chain and jumps: %s", error)

    def _give_up(self, action: str, grant: Grant | None, attempts: int, error: Exception) -> None:
        """Log the failure with what it left in the firewall, and re-read the grants."""
        live = self._resync()
        if grant is None:
            outcome = "expired grants are removed at a later sweep"
        else:
            what = _describe(grant, expiry=False)
            held = next((g for g in live or () if g.key == grant.key), None)
            if live is None:
                outcome = f"unknown whether the firewall holds {what}"
            elif action != "open":
                outcome = f"still open until it expires: {what}" if held else f"gone: {what}"
            elif held is None:
                outcome = f"not granted: {what}"
            elif held.expires < grant.expires:  # an extension that did not happen
                outcome = f"not extended: {what} stays until {_iso(held.expires)}"
            else:
                outcome = f"in the firewall after all: {what}"
        log.error("firewall: %s failed after %d attempts: %s; %s", action, attempts, error, outcome)
        if live is not None:
            log.warning("firewall: view reconciled from the firewall: %d live grants", len(live))

    def _resync(self) -> list[Grant] | None:
        """The grants read back from the firewall (the backend's view is reset to them)."""
        try:
            return self.firewall.grants()
        except FirewallError as error:
            log.error("firewall: cannot read back the grants: %s", error)
            return None


def _describe(grant: Grant, expiry: bool = True) -> str:
    where = f" to {grant.destination}" if grant.destination else ""
    until = f" until {_iso(grant.expires)}" if expiry else ""
    return f"{grant.port}/{grant.proto} for {grant.source}{where} (user {grant.user}){until}"


def interface_addresses(interface: str) -> list[IPAddress]:
    """The addresses of ``interface`` (all interfaces for ``any``), from iproute2."""
    argv = ["ip", "-j", "address", "show"] + ([] if interface == "any" else ["dev", interface])
    try:
        listing = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10)
        entries = json.loads(listing.stdout or "[]")
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        detail = (getattr(error, "stderr", None) or str(error)).strip()
        raise StartError(f"interface {interface}: cannot list its addresses: {detail}") from None
    found = []
    for entry in entries:
        for info in entry.get("addr_info", []):
            address = ipaddress.ip_address(info["local"])
            if address not in found:
                found.append(address)
    return found


def protected_destinations(config: Config) -> list[IPAddress]:
    """``capture.destinations``, or the union of the addresses of every capture interface."""
    if config.capture.destinations:
        return list(config.capture.destinations)
    found: list[IPAddress] = []
    for interface in config.capture.interfaces:
        found += [a for a in interface_addresses(interface) if a not in found]
    if len(found) > MAX_DESTINATIONS:
        log.warning(
            "capture: %d addresses on %s; protecting the first %d (set capture.destinations)",
            len(found),
            config.capture.label,
            MAX_DESTINATIONS,
        )
    return found[:MAX_DESTINATIONS]


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
    from ._capture import CaptureEngine

    captures: list[Capture] = []
    try:
        for interface in config.capture.interfaces:
            engine = CaptureEngine(
                config.knock.layout,
                knock_timeout=config.knock.knock_timeout,
                capacity=config.capture.table_size,
                destinations=destinations,
            )
            captures.append(Capture(interface, engine))
            open_capture(engine, interface, config.capture)
    except BaseException:
        for capture in captures:
            capture.engine.close()
        raise
    return captures


class Doorman:
    """The live daemon: a capture engine per interface, one firewall worker, the replay cache.

    Every engine's completions go through the same ``Judge``. Each interface is lost and
    reopened on its own: the others go on capturing meanwhile.
    """

    def __init__(
        self,
        config: Config,
        captures: Sequence[Capture],
        firewall: Firewall,
        replay: ReplayCache,
        json_log: bool = False,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config
        self.capture_settings = config.capture  # [capture] changes apply at the next start
        self.captures = list(captures)
        self.firewall = firewall
        self.replay = replay
        self.json_log = json_log
        self.clock = clock
        self.worker = FirewallWorker(firewall, clock)
        # Actions wait here until the replay cache has committed the slice they came from.
        self._actions: list[tuple[str, Grant]] = []
        self.judge = Judge(
            config, replay, lambda action, grant: self._actions.append((action, grant))
        )
        self._backlog: collections.deque[tuple[str, np.ndarray]] = collections.deque()
        self._backlog_size = 0
        self.backlog_limit = max(MIN_BACKLOG, config.capture.table_size)
        self.backlog_dropped = 0
        self._last_backlog_complaint = -math.inf
        self._stop = threading.Event()
        self._reload = threading.Event()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        self.worker.start()
        last_prune = self.clock()
        try:
            while not self._stop.is_set():
                live = [c for c in self.captures if c.lost_at is None]
                wait = 0.0 if self._backlog else WAIT_SECONDS
                if live:
                    select.select([c.engine.fileno() for c in live], [], [], wait)
                elif wait:
                    self._stop.wait(wait)
                for capture in live:
                    self.read(capture)
                self.judge_backlog(JUDGE_SLICE)
                for capture in self.captures:
                    if capture.lost_at is not None and self.clock() >= capture.retry_at:
                        self._reopen(capture)
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
                if self.clock() - last_prune > 60:
                    last_prune = self.clock()
                    self.replay.prune(last_prune)
                flush_logs()
        finally:
            live = [c for c in self.captures if c.lost_at is None]
            if live:  # packets of the last moments are in a block not yet handed over
                time.sleep(2 * BLOCK_TIMEOUT_MS / 1000)
            for capture in live:
                self.read(capture)
            self.judge_backlog(None)
            self.worker.stop()
            self._log_stats()
            flush_logs()

    def _log_stats(self) -> None:
        """The ``stopped:`` line: counters summed over the interfaces, each one's before it
        when there are several."""
        totals: dict[str, int] = {}
        for capture in self.captures:
            stats = capture.engine.stats()
            if len(self.captures) > 1:
                log.info("stopped capture on %s: %s", capture.interface, _counters(stats))
            for name, value in stats.items():
                totals[name] = totals.get(name, 0) + value
        totals["backlog_dropped"] = self.backlog_dropped
        log.info("stopped: %s", _counters(totals))

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
                self._enqueue(capture.interface, records)
            if count == 0:
                break
        return total

    def _enqueue(self, interface: str, records: np.ndarray) -> None:
        room = self.backlog_limit - self._backlog_size
        if len(records) > room:
            self.backlog_dropped += len(records) - room
            if self.clock() - self._last_backlog_complaint >= 60:
                self._last_backlog_complaint = self.clock()
                log.warning(
                    "judging backlog full (%d completions): dropped %d so far; someone "
                    "is sending whole knocks faster than they can be checked",
                    self.backlog_limit,
                    self.backlog_dropped,
                )
            records = records[:room]
        if len(records):
            self._backlog.append((interface, records))
            self._backlog_size += len(records)

    def judge_backlog(self, limit: int | None) -> int:
        """Judge up to ``limit`` waiting completions (all: None), oldest first, as one
        replay-cache transaction; then hand their firewall actions to the worker."""
        judged = 0
        with self.replay.batch():
            while self._backlog and (limit is None or judged < limit):
                interface, records = self._backlog[0]
                take = len(records) if limit is None else min(len(records), limit - judged)
                if take == len(records):
                    self._backlog.popleft()
                else:
                    self._backlog[0] = (interface, records[take:])
                self._backlog_size -= take
                judged += take
                for record in records[:take]:
                    try:
                        decision = self.judge.decide(record, self.clock(), interface)
                    except Exception:  # a bug must never take the doorman down
                        log.exception(
                            "internal error judging a completion on %s; skipped", interface
                        )
                        continue
                    emit(decision, self.json_log)
        actions, self._actions = self._actions, []
        self.worker.submit_many(actions)
        return judged

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
        """SIGHUP: new users and keys (and grant/timing settings); a broken file changes nothing."""
        try:
            fresh = load_config(self.config.path)
        except ConfigError as error:
            log.error("reload failed, keeping the running configuration: %s", error)
            return
        old = self.config
        pending = [
            name
            for name, before, after in (
                ("knock layout", old.knock.layout, fresh.knock.layout),
                ("knock.knock_timeout", old.knock.knock_timeout, fresh.knock.knock_timeout),
                ("[capture]", old.capture, fresh.capture),
                (
                    "grants.backend/chain/hooks",
                    (old.grants.backend, old.grants.chain, old.grants.hooks),
                    (fresh.grants.backend, fresh.grants.chain, fresh.grants.hooks),
                ),
                ("state.directory", old.state_dir, fresh.state_dir),
            )
            if before != after
        ]
        if pending:
            log.warning("reload: changes to %s apply at the next restart", ", ".join(pending))
        self.config = fresh
        self.judge.config = fresh
        log.info("reloaded %s: %d users", fresh.path, len(fresh.users))


def replay_capture(config: Config, path: str, judge_sink: Callable[[Decision], None]) -> dict:
    """``knockd-fast replay``: the live pipeline over a capture file, at packet time.

    Nothing touches the firewall, and the replay cache lives in memory only: a replay
    never marks a message as seen for the running daemon.
    """
    from ._capture import CaptureEngine
    from .firewall.dryrun import DryRunFirewall

    firewall = DryRunFirewall()
    judge_ = Judge(
        config, ReplayCache(None), lambda action, grant: _dry_act(firewall, action, grant)
    )
    engine = CaptureEngine(
        config.knock.layout,
        knock_timeout=config.knock.knock_timeout,
        capacity=config.capture.table_size,
        destinations=config.capture.destinations,
    )
    engine.open_file(path)
    while True:
        count = engine.dispatch()
        for record in engine.drain():
            when = int(record["sec"]) + int(record["usec"]) / 1e6
            judge_sink(judge_.decide(record, when))
        if count == 0:
            break
    engine.close()
    return engine.stats()


def _counters(stats: dict[str, int]) -> str:
    return " ".join(f"{name}={value}" for name, value in stats.items())


def _dry_act(firewall: Any, action: str, grant: Grant) -> None:
    if action == "open":
        firewall.open(grant)
    else:
        firewall.close(grant.key)


def describe_grants(grants: Iterable[Grant], now: float) -> list[str]:
    lines = []
    for grant in sorted(grants, key=lambda g: g.expires):
        left = max(0, grant.expires - int(now))
        where = f" -> {grant.destination}" if grant.destination else ""
        lines.append(
            f"{grant.source}{where} {grant.port}/{grant.proto} user={grant.user} "
            f"expires in {left // 60}m{left % 60:02d}s ({_iso(grant.expires)})"
        )
    return lines
