"""Completions -> decisions and grant changes, live and offline alike.

``Judge.decide`` turns one completion (``completions``) into a ``Decision`` (``verdict.judge`` does
the checks, ``limits`` the per-user caps) and, for an accepted knock, remembers it against
replays and says what the firewall must do. Live, completions wait in a bounded
``Backlog`` and are judged in slices (``Judge.judge_slice``): each slice is one
replay-cache transaction, and its changes are handed on only once that transaction is
committed. Offline, ``replay_capture`` runs the same judge over a capture file at packet
time, with a dry-run firewall.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from knock_client.protocol import Action

from .addresses import key_text
from .candidates import candidate_messages
from .capture_spec import KIND_SPA, key_address
from .completions import Completion, completions
from .config import Config, IPAddress, User
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
# Protected addresses whose text the judge keeps (the engines report knocks to at most
# MAX_DESTINATIONS each); past it the memo starts afresh.
MAX_KNOWN_DESTINATIONS = 1024


class Judge:
    """Completions -> decisions and grant changes; the same for live runs and replays."""

    def __init__(
        self,
        config: Config,
        replay: ReplayCache,
        grants: Sequence[Grant] = (),
        fleet: FleetClaims | None = None,
    ):
        self.config = config  # replaced on SIGHUP (new users and keys)
        self.replay = replay
        self.fleet = fleet  # the gateways sharing replay claims; None: this one alone
        # Each user's live grants and recent messages, for the caps; ``grants`` are those
        # read back from the firewall at start.
        self.limits = Limits(grants)
        self._destinations: dict[bytes, tuple[IPAddress, str]] = {}

    def decide(
        self,
        completion: Completion,
        now: float,
        interface: str | None = None,
        granted_at: float | None = None,
    ) -> tuple[Decision, GrantChange | None]:
        """Judge one completion at ``now`` (its capture time); ``interface`` (the capture it
        came from) is only logged; a grant lasts from ``granted_at`` (default ``now``). An
        accepted message is remembered in the replay cache, and counted against its user's
        caps, before this returns. The fleet is not asked (``judge_slice`` asks it)."""
        decision, accepted = self._verdict(completion, now, interface, granted_at)
        if accepted is None:
            return decision, None
        return self._settle(accepted, now)

    def _verdict(
        self,
        completion: Completion,
        now: float,
        interface: str | None,
        granted_at: float | None,
        in_slice: set[tuple[int, bytes]] | None = None,
    ) -> tuple[Decision, _Accepted | None]:
        """The checks of one completion, and for a message that passes them the grant
        change it asks for: not yet remembered, nor counted against its user's caps.
        ``in_slice`` holds the messages accepted so far in a slice not yet settled: a copy
        of one is a replay."""
        source_text = key_text(completion.source)
        destination, destination_text = self._destination(completion.destination)
        settings = self.config.knock
        is_spa = completion.kind == KIND_SPA
        if not ("spa" in settings.modes if is_spa else settings.knock_mode):
            mode = "spa" if is_spa else "knock"
            refused = Decision(
                now, source_text, destination_text, None, None, None, None,
                "rejected", "not_allowed", f"{mode} mode is disabled", interface,
            )  # fmt: skip
            return refused, None
        replay = self.replay

        def seen(user_id: int, siv: bytes, sent_at: int) -> bool | str:
            if in_slice is not None and (user_id, bytes(siv)) in in_slice:
                return True
            return replay.seen(user_id, siv, now, sent_at)

        verdict = judge(
            candidate_messages(completion, settings.layout.digit_bits),
            completion.source,  # an address object only for a message that authenticates
            None,
            now,
            self.config.users,
            settings.window,
            seen,
        )
        knock, user = verdict.knock, verdict.user
        decision = Decision(
            now,
            source_text,
            destination_text,
            user.name if user else None,
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
        assert knock is not None and user is not None and verdict.siv is not None
        assert verdict.source is not None
        # The grant first: a message that cannot become one is refused, and stays unspent
        # (remembering it first let a bad copy use up the genuine knock's message).
        try:
            grant = Grant(
                verdict.source,
                str(knock.proto),
                knock.port,
                destination,
                int(now if granted_at is None else granted_at)
                + grant_duration(knock, self.config.grants),
                user.name,
            )
        except ValueError as error:
            return decision._replace(
                verdict="rejected", reason="malformed", detail=f"no grant: {error}"
            ), None
        # Kept for the longest window ever in force (a window raised later extends it).
        window = max(settings.window, replay.window)
        until = replay_expiry(knock, now, window)
        if in_slice is not None:
            in_slice.add((user.id, bytes(verdict.siv)))
        return decision, _Accepted(
            decision, GrantChange(knock.action, grant), user, bytes(verdict.siv), until
        )

    def _settle(
        self, accepted: _Accepted, now: float, claimed_by: str | None = None
    ) -> tuple[Decision, GrantChange | None]:
        """The last checks of a message that passed ``_verdict``: not claimed by another
        gateway of the fleet (``claimed_by``, its name), within its user's caps; then it is
        remembered against replays."""
        decision, user = accepted.decision, accepted.user
        if claimed_by is not None:
            detail = f"accepted first by gateway {claimed_by} of the fleet"
            return decision._replace(verdict="rejected", reason="replay", detail=detail), None
        # The caps last, so that only authentic, fresh, unreplayed and allowed messages
        # count: a replay costs its user nothing. A refused message is not remembered, as no
        # rejected one is: a key holder past its caps grows neither the replay cache nor the
        # firewall queue, and a replay of a refused message is judged again (refused while
        # at the cap, else accepted once, for the address it names, then remembered).
        refusal = self.limits.admit(user, accepted.change, now)
        if refusal is not None:
            if self.limits.first_warning(user.name, now):
                log.warning(
                    "limit: %s; knocks past it are refused (this warning at most once a minute)",
                    refusal,
                )
            return decision._replace(verdict="rejected", reason="limit", detail=refusal), None
        self.replay.remember(user.id, accepted.siv, accepted.until)
        return decision, accepted.change

    def _destination(self, key: bytes) -> tuple[IPAddress, str]:
        """The protected address of a 16-byte key, and its text: there are few of them."""
        known = self._destinations.get(key)
        if known is None:
            if len(self._destinations) >= MAX_KNOWN_DESTINATIONS:
                self._destinations.clear()
            known = self._destinations[key] = (key_address(key), key_text(key))
        return known

    def judge_slice(
        self, backlog: Backlog, limit: int | None, clock: Callable[[], float]
    ) -> tuple[list[Decision], list[GrantChange]]:
        """Judge up to ``limit`` waiting completions (all: None), oldest first, as one
        replay-cache transaction, committed before this returns.

        Each is judged at its capture time (the packet's timestamp, from the kernel), not at
        the moment it comes out of the backlog: a backlog that grew under a flood never
        expires the genuine knocks waiting in it. A capture time ahead of ``clock`` (the
        clock stepped back meanwhile) counts as now."""
        staged: list[tuple[Decision, _Accepted | None, float]] = []
        in_slice: set[tuple[int, bytes]] = set()
        with self.replay.batch():
            for interface, completion in backlog.take(limit):
                try:
                    now = clock()
                    when = min(completion.captured_at, now)
                    decision, accepted = self._verdict(completion, when, interface, now, in_slice)
                except Exception:  # a bug must never take the doorman down
                    log.exception("internal error judging a completion on %s; skipped", interface)
                    continue
                staged.append((decision, accepted, when))
            holders = self._claim([a for _, a, _ in staged if a is not None], clock())
            decisions: list[Decision] = []
            changes: list[GrantChange] = []
            released: list[tuple[int, bytes]] = []  # claimed, then refused by a cap
            for decision, accepted, when in staged:
                if accepted is not None:
                    holder = next(holders)
                    if holder is _UNAVAILABLE:
                        decision, change = (
                            decision._replace(
                                verdict="rejected",
                                reason="fleet_unavailable",
                                detail="the fleet's replay claims are unavailable "
                                '(fleet.on_unavailable = "refuse")',
                            ),
                            None,
                        )
                    else:
                        try:
                            decision, change = self._settle(accepted, when, holder)
                        except Exception:
                            log.exception("internal error settling a decision; skipped")
                            continue
                        if decision.reason == "limit" and self.fleet is not None:
                            released.append((accepted.user.id, accepted.siv))
                    if change is not None:
                        changes.append(change)
                decisions.append(decision)
            if released:
                try:
                    self.fleet.release(released)
                except Exception:  # the claims then lapse with their window
                    log.exception("internal error giving back %d claims", len(released))
        return decisions, changes

    def _claim(self, accepted: list[_Accepted], now: float) -> Iterator[object]:
        """Per message, in order: the gateway that claimed it first (a replay here), None
        (this gateway's, or no fleet), or ``_UNAVAILABLE`` (no fleet to ask, and the
        configuration refuses knocks then)."""
        if self.fleet is None or not accepted:
            return iter([None] * len(accepted))
        try:
            found = self.fleet.claim([(a.user.id, a.siv, a.until) for a in accepted], now)
        except Exception:  # a bug must not lose the slice: as if the fleet were away
            log.exception("internal error claiming %d messages fleet-wide", len(accepted))
            found = None
        if found is not None:
            return iter(found)
        refuse = self.config.fleet.on_unavailable == "refuse"
        return iter([_UNAVAILABLE if refuse else None] * len(accepted))


_UNAVAILABLE = object()


class FleetClaims(Protocol):
    """What the judge asks of the fleet (``fleetlink.FleetLink``)."""

    def claim(
        self, messages: Sequence[tuple[int, bytes, int]], now: float
    ) -> list[str | None] | None:
        """Claim each (user id, SIV, remembered until) for this gateway: per message None
        (ours now) or the gateway that has it; None when the fleet cannot be asked."""


@dataclass(frozen=True)
class _Accepted:
    """A message that passed the checks, not yet settled (``Judge._settle``)."""

    decision: Decision
    change: GrantChange
    user: User
    siv: bytes
    until: int  # remembered against replays until then


# Completions are queued per source prefix and the prefixes served in turn: a flood from
# one network (one host, or spoofed addresses in its /24) delays the others by one
# completion per turn, not by its own length. Prefixes as wide as one site's addresses.
FAIR_PREFIX_V4 = 24
FAIR_PREFIX_V6 = 48
_PREFIX_MASK = {
    4: np.array([0xFF] * (12 + FAIR_PREFIX_V4 // 8) + [0] * (4 - FAIR_PREFIX_V4 // 8), np.uint8),
    6: np.array([0xFF] * (FAIR_PREFIX_V6 // 8) + [0] * (16 - FAIR_PREFIX_V6 // 8), np.uint8),
}


def source_prefixes(records: np.ndarray) -> list[bytes]:
    """Each record's source prefix (IPv4 /24, IPv6 /48) as a 16-byte key, vectorised."""
    masked = np.where(
        (records["family"] == 4)[:, None], records["source"] & _PREFIX_MASK[4],
        records["source"] & _PREFIX_MASK[6],
    )  # fmt: skip
    flat = masked.astype(np.uint8).tobytes()
    return [flat[i : i + 16] for i in range(0, len(flat), 16)]


class Backlog:
    """Completions waiting to be judged, at most ``limit``, fair between source prefixes.

    Each source prefix (``FAIR_PREFIX_V4``/``_V6``) has its own queue, oldest first, and
    ``take`` serves the prefixes in turn, one completion each. When the backlog is full a
    new completion pushes out the newest of the longest queue, unless its own queue would
    then be a longest one (then it is the one dropped), so a flood from few networks never
    costs another network's knock its place. Drops are counted in ``dropped`` (and a warning at
    most once a minute): memory stays bounded whoever floods us with whole bogus knocks.
    Spoofed sources spread over every prefix make it no fairer than first come, first
    served: docs/admin.md says what bounds that case.
    """

    def __init__(self, limit: int, clock: Callable[[], float] = time.time):
        self.limit = limit
        self.dropped = 0
        self._clock = clock
        self._queues: dict[bytes, collections.deque[tuple[str | None, Completion]]] = {}
        # The prefixes with a queue, in serving order: each once, an emptied queue included
        # until its turn comes (then it is removed).
        self._turns: collections.deque[bytes] = collections.deque()
        # Queue length -> the prefixes with a queue that long (insertion-ordered), and the
        # longest length: the longest queue in O(1), since lengths move by one.
        self._by_length: collections.defaultdict[int, dict[bytes, None]] = collections.defaultdict(
            dict
        )
        self._longest = 0
        self._size = 0
        self._last_complaint = -math.inf

    def __len__(self) -> int:
        return self._size

    def prefixes(self) -> int:
        """Source prefixes with completions waiting."""
        return sum(1 for queue in self._queues.values() if queue)

    def add(self, interface: str | None, records: np.ndarray) -> None:
        """Queue the completion records of a drained batch (``COMPLETION_DTYPE``)."""
        if not len(records):
            return
        queues = self._queues
        dropped = self.dropped
        for key, record in zip(source_prefixes(records), completions(records), strict=True):
            queue = queues.get(key)
            length = len(queue) if queue is not None else 0
            if self._size >= self.limit:
                # Its own queue would be a longest one: it is the one dropped. So with every
                # queue one long (sources spoofed over every prefix) this is drop-newest,
                # which keeps half of the arrivals at twice capacity.
                if length + 1 >= self._longest:
                    self.dropped += 1
                    continue
                victim = next(reversed(self._by_length[self._longest]))
                queues[victim].pop()
                self._resize(victim, self._longest, -1)
                self._size -= 1
                self.dropped += 1
            if queue is None:
                queue = queues[key] = collections.deque()
                self._turns.append(key)
            queue.append((interface, record))
            self._resize(key, length, +1)
            self._size += 1
        if self.dropped > dropped and self._clock() - self._last_complaint >= COMPLAIN_SECONDS:
            self._last_complaint = self._clock()
            log.warning(
                "judging backlog full (%d completions from %d networks): dropped %d so far, "
                "from the networks sending the most; someone is sending whole knocks faster "
                "than they can be checked",
                self.limit,
                self.prefixes(),
                self.dropped,
            )

    def _resize(self, key: bytes, length: int, change: int) -> None:
        """Move ``key`` from queue length ``length`` to ``length + change``."""
        if length:
            del self._by_length[length][key]
        if length + change:
            self._by_length[length + change][key] = None
        if length + change > self._longest:
            self._longest = length + change
        elif length == self._longest and not self._by_length[length]:
            self._longest = length - 1  # lengths move by one: that one is not empty (or 0)

    def take(self, limit: int | None) -> Iterator[tuple[str | None, Completion]]:
        """Up to ``limit`` completions (all: None), one per source prefix in turn, each
        prefix's oldest first, each with its interface; each is out of the backlog once
        taken."""
        taken = 0
        queues, turns = self._queues, self._turns
        while turns and (limit is None or taken < limit):
            key = turns.popleft()
            queue = queues[key]
            if not queue:  # emptied by the drops of a full backlog
                del queues[key]
                continue
            item = queue.popleft()
            self._resize(key, len(queue) + 1, -1)
            self._size -= 1
            if queue:
                turns.append(key)
            else:
                del queues[key]
            taken += 1
            yield item


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
        for completion in completions(engine.drain()):
            try:
                decision, change = judge_.decide(completion, completion.captured_at)
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
