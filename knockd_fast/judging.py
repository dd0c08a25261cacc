"""Completions -> decisions and grant changes, live and offline alike.

``Judge.decide`` turns one completion record into a ``Decision`` (``verdict.judge`` does
the checks, ``limits`` the per-user caps) and, for an accepted knock, remembers it against
replays and says what the firewall must do. Live, completions wait in a bounded
``Backlog`` and are judged in slices (``Judge.judge_slice``): each slice is one
replay-cache transaction, and its changes are handed on only once that transaction is
committed. Offline, ``replay_capture`` runs the same judge over a capture file at packet
time, with a dry-run firewall.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from knock_client.protocol import Action

from .candidates import candidate_messages
from .capture_spec import KIND_SPA, key_address
from .config import Config
from .decisions import Decision
from .firewall.base import Grant, GrantChange
from .limits import Limits
from .replay import ReplayCache
from .sinks import DecisionSink
from .verdict import grant_duration, judge, replay_expiry

log = logging.getLogger("knockd_fast")

# Completions waiting to be judged: at least this many, or as many as the table holds
# sources (all knocks in progress may complete in one burst: 120 bytes each, a fifth of
# the table's own memory). Past it new ones are dropped, counted and logged, so memory
# stays bounded when someone floods us with whole bogus knocks.
MIN_BACKLOG = 65_536
COMPLAIN_SECONDS = 60  # at most one "backlog full" warning per minute


class Judge:
    """Completions -> decisions and grant changes; the same for live runs and replays."""

    def __init__(self, config: Config, replay: ReplayCache, grants: Sequence[Grant] = ()):
        self.config = config  # replaced on SIGHUP (new users and keys)
        self.replay = replay
        # Each user's live grants and recent messages, for the caps; ``grants`` are those
        # read back from the firewall at start.
        self.limits = Limits(grants)

    def decide(
        self,
        record: np.void,
        now: float,
        interface: str | None = None,
        granted_at: float | None = None,
    ) -> tuple[Decision, GrantChange | None]:
        """Judge one completion at ``now`` (its capture time); ``interface`` (the capture it
        came from) is only logged; a grant lasts from ``granted_at`` (default ``now``). An
        accepted message is remembered in the replay cache, and counted against its user's
        caps, before this returns."""
        source = key_address(bytes(record["source"]))
        destination = key_address(bytes(record["destination"]))
        settings = self.config.knock
        is_spa = record["kind"] == KIND_SPA
        if not ("spa" in settings.modes if is_spa else settings.knock_mode):
            mode = "spa" if is_spa else "knock"
            refused = Decision(
                now, str(source), str(destination), None, None, None, None,
                "rejected", "not_allowed", f"{mode} mode is disabled", interface,
            )  # fmt: skip
            return refused, None
        verdict = judge(
            candidate_messages(record, settings.layout.digit_bits),
            source,
            destination,
            now,
            self.config.users,
            settings.window,
            lambda user_id, siv, sent_at: self.replay.seen(user_id, siv, now, sent_at),
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
        if not verdict.accepted:
            return decision, None
        assert knock is not None and verdict.user is not None and verdict.siv is not None
        # The grant first: a message that cannot become one is refused, and stays unspent
        # (remembering it first let a bad copy use up the genuine knock's message).
        try:
            grant = Grant(
                source=source,
                proto=str(knock.proto),
                port=knock.port,
                destination=destination,
                expires=int(now if granted_at is None else granted_at)
                + grant_duration(knock, self.config.grants),
                user=verdict.user.name,
            )
        except ValueError as error:
            return dataclasses.replace(
                decision, verdict="rejected", reason="malformed", detail=f"no grant: {error}"
            ), None
        change = GrantChange(knock.action, grant)
        # The caps last, so that only authentic, fresh, unreplayed and allowed messages
        # count: a replay costs its user nothing. A refused message is not remembered, as no
        # rejected one is: a key holder past its caps grows neither the replay cache nor the
        # firewall queue, and a replay of a refused message is judged again (refused while
        # at the cap, else accepted once, for the address it names, then remembered).
        refusal = self.limits.refusal(verdict.user, change, now)
        if refusal is not None:
            if self.limits.first_warning(verdict.user.name, now):
                log.warning(
                    "limit: %s; knocks past it are refused (this warning at most once a minute)",
                    refusal,
                )
            return dataclasses.replace(
                decision, verdict="rejected", reason="limit", detail=refusal
            ), None
        # Kept for the longest window ever in force (a window raised later extends it).
        window = max(settings.window, self.replay.window)
        self.replay.remember(verdict.user.id, verdict.siv, replay_expiry(knock, now, window))
        self.limits.record(change, now)
        return decision, change

    def judge_slice(
        self, backlog: Backlog, limit: int | None, clock: Callable[[], float]
    ) -> tuple[list[Decision], list[GrantChange]]:
        """Judge up to ``limit`` waiting completions (all: None), oldest first, as one
        replay-cache transaction, committed before this returns.

        Each is judged at its capture time (the packet's timestamp, from the kernel), not at
        the moment it comes out of the backlog: a backlog that grew under a flood never
        expires the genuine knocks waiting in it. A capture time ahead of ``clock`` (the
        clock stepped back meanwhile) counts as now."""
        decisions: list[Decision] = []
        changes: list[GrantChange] = []
        with self.replay.batch():
            for interface, record in backlog.take(limit):
                try:
                    now = clock()
                    when = min(captured_at(record), now)
                    decision, change = self.decide(record, when, interface, granted_at=now)
                except Exception:  # a bug must never take the doorman down
                    log.exception("internal error judging a completion on %s; skipped", interface)
                    continue
                decisions.append(decision)
                if change is not None:
                    changes.append(change)
        return decisions, changes


def captured_at(record: np.void) -> float:
    """The capture time of a completion's last packet, in Unix seconds."""
    return int(record["sec"]) + int(record["usec"]) / 1e6


class Backlog:
    """Completions waiting to be judged, oldest first, at most ``limit`` of them.

    Past the limit new completions are dropped (counted in ``dropped``, and a warning at
    most once a minute): memory stays bounded whoever floods us with whole bogus knocks.
    """

    def __init__(self, limit: int, clock: Callable[[], float] = time.time):
        self.limit = limit
        self.dropped = 0
        self._clock = clock
        self._parts: collections.deque[tuple[str | None, np.ndarray]] = collections.deque()
        self._size = 0
        self._last_complaint = -math.inf

    def __len__(self) -> int:
        return self._size

    def add(self, interface: str | None, records: np.ndarray) -> None:
        room = self.limit - self._size
        if len(records) > room:
            self.dropped += len(records) - room
            if self._clock() - self._last_complaint >= COMPLAIN_SECONDS:
                self._last_complaint = self._clock()
                log.warning(
                    "judging backlog full (%d completions): dropped %d so far; someone "
                    "is sending whole knocks faster than they can be checked",
                    self.limit,
                    self.dropped,
                )
            records = records[:room]
        if len(records):
            self._parts.append((interface, records))
            self._size += len(records)

    def take(self, limit: int | None) -> Iterator[tuple[str | None, np.void]]:
        """Up to ``limit`` completions (all: None), oldest first, each with its interface;
        each is out of the backlog once taken."""
        taken = 0
        while self._parts and (limit is None or taken < limit):
            interface, records = self._parts[0]
            count = len(records) if limit is None else min(len(records), limit - taken)
            if count == len(records):
                self._parts.popleft()
            else:
                self._parts[0] = (interface, records[count:])
            self._size -= count
            taken += count
            for record in records[:count]:
                yield interface, record


def replay_capture(config: Config, path: str, sinks: Sequence[DecisionSink]) -> dict[str, int]:
    """``knockd-fast replay``: the live pipeline over a capture file, at packet time.

    Nothing touches the firewall (a dry run stands in for it), and the replay cache lives
    in memory only: a replay never marks a message as seen for the running daemon.
    Returns the engine's counters.
    """
    from ._capture import engine_for
    from .firewall.dryrun import DryRunFirewall

    firewall = DryRunFirewall()
    judge_ = Judge(config, ReplayCache(None))
    engine = engine_for(config, config.capture.destinations)
    engine.open_file(path)
    while True:
        count = engine.dispatch()
        decisions = []
        for record in engine.drain():
            try:
                decision, change = judge_.decide(record, captured_at(record))
            except Exception:  # one bad record must not end the replay of a file
                log.exception("internal error judging a completion; skipped")
                continue
            decisions.append(decision)
            if change is None:
                continue
            if change.action == Action.CLOSE:
                firewall.close(change.grant.key, change.grant.user)
            else:
                firewall.open(change.grant)
        for sink in sinks:
            sink.write(decisions)
        if count == 0:
            break
    for sink in sinks:
        sink.close()
    engine.close()
    return engine.stats()
