"""The doorman's loop: capture batch -> verdicts -> firewall -> expiry sweep.

Data flows one way (docs/capture.md, ../shared/GUIDE.md): the engine rebuilds messages
without Python per packet; here each completion is judged (``verdict.judge``), an accepted
one is remembered against replays and turned into a firewall action. Firewall work runs
on its own thread (``FirewallWorker``), so a burst of grants never holds up the capture:
the kernel keeps queueing packets in the capture buffer while libiptc commits.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import queue
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from knock_client.protocol import Action

from .candidates import candidate_messages
from .capture_spec import KIND_SPA, MAX_DESTINATIONS, key_address
from .config import CaptureSettings, Config, ConfigError, IPAddress, load_config
from .firewall.base import Firewall, FirewallError, Grant
from .replay import ReplayCache
from .verdict import grant_duration, judge, replay_expiry

log = logging.getLogger("knockd_fast")


class StartError(Exception):
    """The daemon cannot start (interface, firewall, state); the message is one line."""


decisions_log = logging.getLogger("knockd_fast.decisions")

FIREWALL_RETRIES = (0.1, 0.5, 2.0)  # seconds between attempts of one firewall action
SWEEP_SECONDS = 1.0  # how often expired grants are removed
REOPEN_SECONDS = 1  # how often a lost capture is retried


# `knockd-fast replay --json` prints these keys of Decision.as_json() (the live log adds
# "detail").
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
        }

    def as_text(self) -> str:
        what = f"{self.action} {self.port}/{self.proto}" if self.action else "-"
        return (
            f"{_iso(self.time)} {self.source} user={self.user or '-'} {what} "
            f"{self.verdict} {self.reason}: {self.detail}"
        )


def _iso(when: float) -> str:
    moment = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def emit(decision: Decision, as_json: bool) -> None:
    text = json.dumps(decision.as_json()) if as_json else decision.as_text()
    decisions_log.info(text)


class Judge:
    """Completions -> decisions and firewall actions; the same for live runs and replays."""

    def __init__(self, config: Config, replay: ReplayCache, act: Callable[[str, Grant], None]):
        self.config = config
        self.replay = replay
        self.act = act  # ("open" | "close", grant) -> None; never blocks on the firewall

    def decide(self, record: np.void, now: float) -> Decision:
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
    """Applies grants in order on its own thread, retries failures, sweeps expiry."""

    def __init__(self, firewall: Firewall, clock: Callable[[], float] = time.time):
        super().__init__(name="knockd-fast-firewall", daemon=True)
        self.firewall = firewall
        self.clock = clock
        self.jobs: queue.Queue[tuple[str, Grant] | None] = queue.Queue()
        self.applied = 0
        self.failed = 0

    def submit(self, action: str, grant: Grant) -> None:
        self.jobs.put((action, grant))

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
                self._apply(*job)
            if self.clock() >= next_sweep:
                self._apply("expire", None)
                next_sweep = self.clock() + SWEEP_SECONDS

    def _apply(self, action: str, grant: Grant | None) -> None:
        for attempt, pause in enumerate((*FIREWALL_RETRIES, None)):
            try:
                if action == "open":
                    self.firewall.open(grant)
                    log.info("firewall: opened %s", _describe(grant))
                elif action == "close":
                    found = self.firewall.close(grant.key)
                    log.info(
                        "firewall: %s %s",
                        "closed" if found else "no grant to close for",
                        _describe(grant, expiry=False),
                    )
                else:
                    for gone in self.firewall.expire(int(self.clock())):
                        log.info("firewall: expired %s", _describe(gone, expiry=False))
                self.applied += action != "expire"
                return
            except FirewallError as error:
                if pause is None:
                    self.failed += 1
                    log.error(
                        "firewall: %s failed after %d attempts: %s", action, attempt + 1, error
                    )
                    self._resync()
                    return
                log.warning("firewall: %s failed (%s); retrying in %.1f s", action, error, pause)
                time.sleep(pause)
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

    def _resync(self) -> None:
        try:
            grants = self.firewall.grants()
        except FirewallError as error:
            log.error("firewall: cannot read back the grants: %s", error)
        else:
            log.warning("firewall: view reconciled from the firewall: %d live grants", len(grants))


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
    if config.capture.destinations:
        return list(config.capture.destinations)
    found = interface_addresses(config.capture.interface)
    if len(found) > MAX_DESTINATIONS:
        log.warning(
            "capture: %d addresses on %s; protecting the first %d (set capture.destinations)",
            len(found),
            config.capture.interface,
            MAX_DESTINATIONS,
        )
    return found[:MAX_DESTINATIONS]


def open_capture(engine: Any, settings: CaptureSettings) -> None:
    """Open the live handle (raises CaptureError); the engine's table and counters carry over."""
    engine.open_live(settings.interface, buffer_bytes=settings.buffer_bytes)
    engine.set_nonblocking()


class Doorman:
    """The live daemon: one capture engine, one firewall worker, the replay cache."""

    def __init__(
        self,
        config: Config,
        engine: Any,
        firewall: Firewall,
        replay: ReplayCache,
        json_log: bool = False,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config
        self.engine = engine
        self.firewall = firewall
        self.replay = replay
        self.json_log = json_log
        self.clock = clock
        self.worker = FirewallWorker(firewall, clock)
        self.judge = Judge(config, replay, self.worker.submit)
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._capture_lost_at: float | None = None
        self._last_reopen_complaint = 0.0

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
                if self._capture_lost_at is None:
                    select.select([self.engine.fileno()], [], [], 0.25)
                    self.pump()
                else:
                    self._stop.wait(REOPEN_SECONDS)
                    self._reopen()
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
                if self.clock() - last_prune > 60:
                    last_prune = self.clock()
                    self.replay.prune(last_prune)
        finally:
            if self._capture_lost_at is None:
                self.pump()
            self.worker.stop()
            stats = self.engine.stats()
            log.info("stopped: %s", " ".join(f"{k}={v}" for k, v in stats.items()))

    def pump(self) -> int:
        """Read what the capture holds, batch by batch; judge each completion."""
        from ._capture import CaptureError

        total = 0
        while True:
            try:
                count = self.engine.dispatch()
            except CaptureError as error:
                # The interface went down or away: keep grants, replay cache and partial
                # knocks, and reopen the capture when the interface is back.
                log.error(
                    "capture on %s lost: %s; reopening every %d s, grants kept",
                    self.config.capture.interface,
                    error,
                    REOPEN_SECONDS,
                )
                self.engine.close()
                self._capture_lost_at = self.clock()
                count = 0
            total += count
            for record in self.engine.drain():
                try:
                    decision = self.judge.decide(record, self.clock())
                except Exception:  # a bug must never take the doorman down
                    log.exception("internal error judging a completion; skipped")
                    continue
                emit(decision, self.json_log)
            if count == 0:
                return total

    def _reopen(self) -> None:
        from ._capture import CaptureError

        try:
            open_capture(self.engine, self.config.capture)
        except CaptureError as error:
            if self.clock() - self._last_reopen_complaint >= 60:
                self._last_reopen_complaint = self.clock()
                log.warning(
                    "capture on %s still unavailable: %s", self.config.capture.interface, error
                )
            return
        log.info(
            "capture on %s resumed after %.1f s",
            self.config.capture.interface,
            self.clock() - self._capture_lost_at,
        )
        self._capture_lost_at = None

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
