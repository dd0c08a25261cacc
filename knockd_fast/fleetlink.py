"""This gateway's link to its fleet: what it shares through Redis, and when (issue 14).

``fleet`` holds the pieces (claims, signed events, the bus); this module runs them for
the daemon, on three paths:

- Claims, on the loop's thread: the judge claims the messages a slice accepted in one
  round trip (``claim``). While the link is down nothing is asked (a dead Redis would
  stall the loop 0.5 s per slice): the judge applies ``fleet.on_unavailable``, and the
  claims wait (bounded) to be made when the link is back, so that a replay elsewhere is
  refused from then on.
- Publishing, on a thread of its own: the changes this gateway's firewall carried out
  (``FirewallWorker.on_change``: open with the grant in force, close, expire) are signed
  and published in order, in batches. While Redis is away they wait (bounded; the oldest
  go first), and are published when it is back.
- Following, on a thread of its own: it joins (the live grants, or, after an outage, the
  stream again from where it was), then follows the stream. Every entry is verified; the
  other gateways' changes that this gateway's users may have go to its own firewall worker,
  through whatever backend it runs. A Redis that came back empty (restarted without its
  data) is told by a token it keeps: each gateway then publishes its live grants again.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from knock_client.protocol import Action

from .config import FleetSettings
from .firewall.base import Grant, GrantChange
from .firewall.worker import FirewallWorker, describe
from .fleet import (
    COMMAND_TIMEOUT,
    MAX_EVENT_SKEW,
    Claim,
    EventRejected,
    EventSeen,
    EventSigner,
    EventVerifier,
    FleetUnavailable,
    GrantBus,
    GrantEvent,
    ReplayClaims,
    redis_address,
    redis_client,
)
from .logs import Event, flush_logs
from .stats import FleetStats

log = logging.getLogger("knockd_fast")

RETRY_SECONDS = 1.0  # how often a gateway that lost Redis tries again
FOLLOW_BLOCK_MS = 500  # one XREAD waits this long: the follower looks at stop and the link
PUBLISH_BATCH = 256  # changes per round trip
MAX_OUTBOX = 65_536  # changes waiting for Redis (the firewall queue's bound)
MAX_UNSENT_CLAIMS = 65_536  # claims waiting for Redis; each message is claimable its window
MAX_COMPLAINTS = 10  # lines a minute about refused events: a flood costs a count, not a log
STOP_SECONDS = 2.0  # at stop, how long the last changes may take to be published
FLEET_COUNTERS = (
    "claims_new",  # messages claimed first by this gateway
    "claims_taken",  # messages another gateway had claimed: replays here
    "claims_unsent",  # messages accepted while the link was down (claimed later)
    "claims_lost",  # of those, dropped from a full queue before the link came back
    "claims_again",  # remembered messages claimed again: Redis had lost the claims
    "published",  # this gateway's changes on the stream
    "publish_dropped",  # changes dropped from a full outbox while Redis was away
    "applied",  # other gateways' changes handed to this firewall
    "rejected",  # stream entries refused (not made with the fleet key, stale, not ours)
    "outages",  # times the link went down
)


class FleetLink:
    """The fleet, as the daemon sees it: ``claim`` for the judge, ``publish_later`` for the
    firewall worker (set as its ``on_change``), ``start``/``stop``, ``stats``.

    ``entitled(grant)`` says why this gateway will not apply another gateway's open (a user
    it does not know, a port they may not open here), or None: a gateway applies only what
    its own configuration allows, whoever holds the fleet key."""

    def __init__(
        self,
        settings: FleetSettings,
        worker: FirewallWorker,
        entitled: Callable[[Grant], str | None],
        clock: Callable[[], float] = time.time,
        position_file: Path | None = None,
    ) -> None:
        self.settings = settings  # replaced on SIGHUP (on_unavailable)
        self.gateway = settings.gateway
        self.worker = worker
        self.entitled = entitled
        self.clock = clock
        options = _client_options(settings)
        self._claims = ReplayClaims(redis_client(settings.url, **options), self.gateway)
        self._out = GrantBus(redis_client(settings.url, **options))
        follow_timeout = FOLLOW_BLOCK_MS / 1000 + COMMAND_TIMEOUT
        self._in = GrantBus(redis_client(settings.url, timeout=follow_timeout, **options))
        self._signer = EventSigner(settings.key, self.gateway)
        self._verifier = EventVerifier(settings.key, clock)
        self.counters = dict.fromkeys(FLEET_COUNTERS, 0)  # fixed keys: read from any thread
        self._up = threading.Event()
        self._stop = threading.Event()
        self._state = threading.Lock()
        self.down_since: float | None = clock()  # down until the first join
        self._said_down = False
        # (action, grant, its signed fields once a publish was tried): a retry sends the
        # same fields, so if the try reached Redis after all, the others see a replay of
        # it and apply nothing twice; unless they grew too old to be taken (then signed anew).
        self._outbox: collections.deque[tuple[str, Grant, dict[str, str] | None]] = (
            collections.deque()
        )
        self._ready = threading.Condition(threading.Lock())
        self._unsent: collections.deque[tuple[int, bytes, int]] = collections.deque(
            maxlen=MAX_UNSENT_CLAIMS
        )
        self._after: str | None = None  # the last stream entry handled
        self._epoch: str | None = None  # the token of the Redis joined
        # Where this gateway was in the stream, and the last event number seen from each
        # gateway (its own included), kept across restarts: a restarted gateway catches up
        # on the changes it missed, closes included, takes no event it had seen again, and
        # numbers its own on from where it was. Saved only as far as the firewall worker has
        # carried the changes out (``_marks``: ticket, position, numbers seen).
        self.position_file = position_file
        self._marks: collections.deque[tuple[int, str, dict[str, int]]] = collections.deque()
        self._saved: tuple[str, str] | None = None
        self._saved_at = 0.0
        self._unsent_lock = threading.Lock()
        if position_file is not None:
            self._epoch, self._after, seen = _read_position(position_file)
            self._verifier.seen.update(seen)
            self._signer.resume(seen.get(self.gateway, 0))
        # Set when Redis came back without its data: the loop then hands this gateway's
        # remembered messages to ``claim_later``, so its claims are made again.
        self.reclaim = threading.Event()
        self._complaints: collections.deque[float] = collections.deque()
        self._following = threading.Event()  # cleared to stop the follower alone
        self._following.set()
        self._threads = [
            threading.Thread(target=self._follow_loop, name="knockd-fast-fleet-in", daemon=True),
            threading.Thread(target=self._publish_loop, name="knockd-fast-fleet-out", daemon=True),
        ]
        worker.on_change = self.publish_later

    @property
    def up(self) -> bool:
        return self._up.is_set()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop_following(self) -> None:
        """Before the firewall worker stops: take no more changes from the stream (those
        read after would never be applied, and the position would pass them)."""
        self._following.clear()
        self._threads[0].join(FOLLOW_BLOCK_MS / 1000 + COMMAND_TIMEOUT + 1)

    def stop(self) -> None:
        """After the firewall worker stopped: publish what it left (up to ``STOP_SECONDS``),
        end both threads and keep the stream position."""
        self._following.clear()
        self._stop.set()
        with self._ready:
            self._ready.notify_all()
        deadline = time.monotonic() + STOP_SECONDS
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        for client in (self._claims.client, self._out.client, self._in.client):
            try:
                client.close()
            except Exception:  # closing a dead connection may raise: nothing to do then
                pass
        self._save_position(force=True)

    def stats(self) -> FleetStats:
        return FleetStats(
            gateway=self.gateway,
            up=self.up,
            counters=dict(self.counters),
            outbox=len(self._outbox),
            unsent_claims=len(self._unsent),
        )

    # -- claims (the loop's thread) -----------------------------------------------------

    def claim(
        self, messages: Sequence[tuple[int, bytes, int]], now: float
    ) -> list[str | None] | None:
        """Claim (user id, SIV, remembered until) of each message for this gateway: per
        message None (this gateway's now) or the gateway that claimed it first; None for
        all when the fleet cannot be asked (the claims are made when it is back)."""
        if self.up:
            try:
                found = self._claims.claim([_claim(m, now) for m in messages])
            except FleetUnavailable as error:
                self._went_down(str(error))
            else:
                taken = sum(holder is not None for holder in found)
                self.counters["claims_taken"] += taken
                self.counters["claims_new"] += len(found) - taken
                return found
        if self.settings.on_unavailable == "local":  # "refuse": the judge refuses them
            self.claim_later(messages)
        return None

    def claim_later(self, messages: Sequence[tuple[int, bytes, int]], again: bool = False) -> None:
        """Claims to make as soon as the link allows (any thread); ``again``: messages this
        gateway had claimed before Redis lost them (counted apart)."""
        with self._unsent_lock:
            room = MAX_UNSENT_CLAIMS - len(self._unsent)
            self.counters["claims_lost"] += max(0, len(messages) - room)
            self._unsent.extend(messages)
        self.counters["claims_again" if again else "claims_unsent"] += len(messages)

    def release(self, messages: Sequence[tuple[int, bytes]]) -> None:
        """Give up this gateway's claims of messages it then refused (the caps), so they
        are judged again wherever they are sent next; a failure only costs that."""
        if not messages:
            return
        if self.up:
            try:
                self._claims.release(messages)
                return
            except FleetUnavailable as error:
                self._went_down(str(error))
        gone = {(user_id, bytes(siv)) for user_id, siv in messages}  # not claimed yet: never
        with self._unsent_lock:
            kept = [m for m in self._unsent if (m[0], bytes(m[1])) not in gone]
            self._unsent.clear()
            self._unsent.extend(kept)

    # -- publishing ---------------------------------------------------------------------

    def publish_later(self, action: str, grant: Grant) -> None:
        """One change this gateway's firewall carried out (the worker's thread): queued for
        the publisher, never waiting for Redis."""
        with self._ready:
            if len(self._outbox) >= MAX_OUTBOX:
                self._outbox.popleft()
                self.counters["publish_dropped"] += 1
            self._outbox.append((action, grant, None))
            self._ready.notify()

    def _publish_loop(self) -> None:
        while True:
            with self._ready:
                while not (self._outbox and self.up) and not self._stop.is_set():
                    self._ready.wait(RETRY_SECONDS)
                if not (self._outbox and self.up):
                    return  # stopping, with nothing that can be published
                batch = [
                    self._outbox.popleft() for _ in range(min(len(self._outbox), PUBLISH_BATCH))
                ]
            now = self.clock()
            # An open that expired while it waited would open nothing anywhere.
            live = [
                (
                    action,
                    grant,
                    fields
                    if fields is not None and float(fields["t"]) > now - MAX_EVENT_SKEW / 2
                    else self._signer.sign(action, grant),
                )
                for action, grant, fields in batch
                if action != "open" or grant.expires > now
            ]
            try:
                self._out.publish_many([(fields, a, g) for a, g, fields in live])
            except FleetUnavailable as error:
                with self._ready:
                    self._outbox.extendleft(reversed(live))
                self._went_down(str(error))
                continue
            except Exception:  # a bug must not stop the fleet's traffic for good
                log.exception("fleet: internal error publishing %d changes; dropped", len(live))
                continue
            self.counters["published"] += len(live)

    # -- following ----------------------------------------------------------------------

    def _follow_loop(self) -> None:
        while self._following.is_set():
            if not self.up:
                try:
                    self._join()
                except FleetUnavailable as error:
                    self._went_down(str(error))
                    self._stop.wait(RETRY_SECONDS)
                    continue
                except Exception as error:  # a bug: said once per outage, like the outage
                    if not self._said_down:
                        log.exception("fleet: internal error joining; retrying every second")
                    self._went_down(f"internal error joining: {type(error).__name__}")
                    self._stop.wait(RETRY_SECONDS)
                    continue
            try:
                entries = self._in.follow(self._after or "$", block_ms=FOLLOW_BLOCK_MS)
            except FleetUnavailable as error:
                self._went_down(str(error))
                continue
            changes = []
            for entry_id, raw in entries:
                self._after = entry_id
                change = self._receive(raw)
                if change is not None:
                    changes.append(change)
            self._hand_over(changes)
            self._save_position()
            if self._unsent:  # claimed again after Redis lost them (``reclaim``)
                try:
                    self._send_unsent()
                except FleetUnavailable as error:
                    self._went_down(str(error))

    def _join(self) -> None:
        """Join Redis (at start, and after an outage): catch up on the stream from where
        this gateway was if Redis still holds it, else load the live grants; make the
        claims that waited; then say the link is up."""
        token = secrets.token_hex(8)
        snapshot, last, first, epoch = self._in.join(token)
        # A Redis that lost its data has a new token; a gateway that never joined before (no
        # position kept) cannot tell, and needs not: the others that can, republish.
        fresh_redis = self._epoch is not None and epoch != self._epoch
        loaded = 0
        catch_up = self._after is not None and not fresh_redis and _id(first) <= _id(self._after)
        expired: list[Grant] = []
        changes: list[GrantChange] = []
        if catch_up:
            # The stream holds every change since this gateway's last: read them all,
            # closes included (a snapshot would only show what is still open). Nothing
            # dated before that position (less the skew) is new: a copy put there later.
            assert self._after is not None
            not_before = _id(self._after)[0] / 1000 - MAX_EVENT_SKEW
            while True:
                entries = self._in.follow(self._after, block_ms=None, count=PUBLISH_BATCH)
                for entry_id, raw in entries:
                    self._after = entry_id
                    change = self._receive(raw, not_before)
                    if change is not None:
                        changes.append(change)
                loaded += len(entries)
                if len(entries) < PUBLISH_BATCH:
                    break
        else:
            # Live grants numbered at or below what this gateway saw of their makers are
            # known already: applied then, or closed since (a copy put back into Redis).
            floor = dict(self._verifier.seen)
            for raw in snapshot:
                try:
                    event = self._verifier.verify(raw, snapshot=floor)
                except EventSeen:
                    continue
                except EventRejected as error:
                    self._complain(f"fleet: ignored a live grant in redis: {error}")
                    continue
                loaded += 1
                if event.grant.expires <= self.clock():
                    expired.append(event.grant)  # nobody expired it in Redis: this one does
                    continue
                change = self._change_of(event, own_again=event.gateway == self.gateway)
                if change is not None:
                    changes.append(change)
            self._after = last
        self._hand_over(changes)
        self._in.forget(expired)
        self._epoch = epoch
        self._save_position(force=True)
        sent, doubled = self._send_unsent()
        if fresh_redis:  # Redis lost what it held: every gateway tells it again
            self.worker.request_republish()
            self.reclaim.set()
        with self._state:
            was_down_for = self.clock() - self.down_since if self.down_since else 0.0
            self.down_since = None
            self._said_down = False
            self._up.set()
        with self._ready:
            self._ready.notify_all()
        if catch_up:
            how = f"caught up on {loaded} changes, {len(changes)} to apply here"
        else:
            how = f"{loaded} live grants read, {len(changes)} to apply here"
        if fresh_redis:
            how += (
                "; redis had lost its data: publishing this gateway's live grants and claiming "
                "its remembered messages again"
            )
        back = f"back after {was_down_for:.1f} s" if self.counters["outages"] else "joined"
        text = (
            f"fleet: redis at {redis_address(self.settings.url)} {back} as gateway {self.gateway}: "
            f"{how}; {sent} claims made late"
        )
        log.info(Event(text, "fleet", state="up", gateway=self.gateway, claims_late=sent))
        if doubled:
            text = (
                f"fleet: {doubled} messages accepted here while the fleet was apart had been "
                "accepted by another gateway too (replays no gateway could see then)"
            )
            log.warning(Event(text, "fleet", state="doubled", gateway=self.gateway, count=doubled))
        flush_logs()

    def _send_unsent(self) -> tuple[int, int]:
        """Make the claims that waited for the link: (how many, how many another gateway
        had made too)."""
        now = self.clock()
        with self._unsent_lock:
            waiting = [m for m in self._unsent if m[2] > now]
            self._unsent.clear()
        try:
            found = self._claims.claim([_claim(m, now) for m in waiting])
        except FleetUnavailable:
            with self._unsent_lock:
                self._unsent.extendleft(reversed(waiting))
            raise
        return len(waiting), sum(holder is not None for holder in found)

    def _save_position(self, force: bool = False) -> None:
        """Keep where this gateway is in the stream, as far as the worker has carried the
        changes out (at most once a second, or now)."""
        if self.position_file is None or self._epoch is None:
            return
        if not force and time.monotonic() - self._saved_at < 1.0:
            return
        done, mark = self.worker.done, None
        while self._marks and self._marks[0][0] <= done:
            mark = self._marks.popleft()
        if mark is None:
            return
        _, after, seen = mark
        if self._saved == (self._epoch, after):
            return
        try:
            temporary = self.position_file.with_suffix(".tmp")
            state = {"epoch": self._epoch, "after": after, "seen": seen}
            temporary.write_text(json.dumps(state) + "\n")
            os.replace(temporary, self.position_file)
        except OSError as error:  # a restart then loads the live grants: said once
            if self._saved_at >= 0:
                log.warning("fleet: cannot keep the stream position in %s: %s",
                            self.position_file, error.strerror)  # fmt: skip
            self._saved_at = -math.inf
            return
        self._saved, self._saved_at = (self._epoch, after), time.monotonic()

    def _receive(self, raw: Any, not_before: float | None = None) -> GrantChange | None:
        try:
            event = self._verifier.verify(raw, not_before=not_before)
        except EventRejected as error:
            self._complain(f"fleet: ignored an event on the stream: {error}")
            return None
        if event.gateway == self.gateway:
            return None  # ours: applied here already
        return self._change_of(event)

    def _change_of(self, event: GrantEvent, own_again: bool = False) -> GrantChange | None:
        """What this gateway's firewall does for a verified event, if anything. ``own_again``:
        one of this gateway's own live grants, which its firewall lost (a reboot): put back
        as its own (its expiry is then published by it, as the maker)."""
        grant = event.grant
        if event.action == "expire":
            return None  # every gateway expires a grant at its (absolute) expiry itself
        if event.action == "close":
            return GrantChange(Action.CLOSE, grant, event.gateway)
        if grant.expires <= self.clock() or self.worker.holds(grant):
            return None
        why = self.entitled(grant)
        if why is not None:
            self._complain(
                f"fleet: not applying gateway {event.gateway}'s open of {describe(grant)}: {why}"
            )
            return None
        return GrantChange(Action.OPEN, grant, None if own_again else event.gateway)

    def _hand_over(self, changes: list[GrantChange]) -> None:
        """Changes to the firewall worker; the stream position reached is kept once the
        worker has carried them out."""
        self.counters["applied"] += len(changes)
        ticket = self.worker.submit(changes)
        if self._after is not None:
            self._marks.append((ticket, self._after, dict(self._verifier.seen)))

    # -- the link's state ---------------------------------------------------------------

    def _went_down(self, why: str) -> None:
        with self._state:
            if self.up:
                self._up.clear()
                self.down_since = self.clock()
                self.counters["outages"] += 1
            elif self._said_down:
                return
            self._said_down = True
        if self.settings.on_unavailable == "refuse":
            meanwhile = "refusing knocks that pass every other check (fleet.on_unavailable)"
        else:
            meanwhile = (
                "judging on this gateway's own replay cache and firewall; a replay to "
                "another gateway is not seen meanwhile"
            )
        text = (
            f"fleet: redis at {redis_address(self.settings.url)} unavailable ({why}); {meanwhile}; "
            f"retrying every {RETRY_SECONDS:.0f} s"
        )
        log.error(Event(text, "fleet", state="down", gateway=self.gateway, error=why))
        flush_logs()

    def _complain(self, text: str) -> None:
        """Log a refused entry: at most ``MAX_COMPLAINTS`` lines a minute (all counted)."""
        self.counters["rejected"] += 1
        now = time.monotonic()
        while self._complaints and now - self._complaints[0] > 60:
            self._complaints.popleft()
        if len(self._complaints) < MAX_COMPLAINTS:
            self._complaints.append(now)
            log.warning(Event(text, "fleet", state="rejected", gateway=self.gateway))


def _read_position(path: Path) -> tuple[str | None, str | None, dict[str, int]]:
    """(Redis's token, the last stream entry handled, the last event number seen from each
    gateway) as a run before this one left them; nothing when there is none or it is
    unreadable (then the live grants are loaded)."""
    try:
        state = json.loads(path.read_text())
        epoch, after, seen = str(state["epoch"]), str(state["after"]), state["seen"]
        _id(after)
        seen = {str(gateway): int(seq) for gateway, seq in seen.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None, {}
    return epoch, after, seen


def _claim(message: tuple[int, bytes, int], now: float) -> Claim:
    user_id, siv, until = message
    return Claim(user_id, siv, max(1, until - int(now)))


def _id(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``MS-SEQ``) as a comparable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _client_options(settings: FleetSettings) -> dict[str, Any]:
    def text(path: object) -> str | None:
        return str(path) if path is not None else None

    return {
        "username": settings.username,
        "password": settings.password,
        "ca_file": text(settings.tls_ca_file),
        "cert_file": text(settings.tls_cert_file),
        "key_file": text(settings.tls_key_file),
    }
