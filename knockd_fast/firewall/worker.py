"""The firewall thread: applies grant changes in order, retries failures, sweeps expiry.

Firewall work runs on its own thread, so a burst of grants never holds up the capture: the
kernel keeps queueing packets in the capture buffer while a backend commits. Changes wait
in a ``ChangeQueue``: coalesced per grant key, bounded, and never blocking the loop that
hands them over. The clock and the pause between attempts are injected, so every retry,
repair and give-up path runs in a unit test against a failing backend double, without root
and without sleeping.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence

from knock_client.protocol import Action

from ..addresses import address_text
from ..decisions import iso_time
from ..logs import Event, flush_logs, log_lines
from .base import (
    MAX_BATCH,
    AppliesBatches,
    ChangeOutcome,
    Firewall,
    FirewallBusy,
    FirewallError,
    Grant,
    GrantChange,
    GrantKey,
    SelfHealing,
    WaitsForLock,
)

log = logging.getLogger("knockd_fast")

FIREWALL_RETRIES = (0.1, 0.5, 2.0)  # seconds between attempts of one firewall change
# Seconds one attempt waits for the xtables lock once the daemon runs (at start it waits
# the backend's default, 5 s). With the pauses above, a change held up by another process
# holding the lock gives up after about 4 * 1 + 2.6 = 6.6 s, so one stuck `iptables -w`
# never stalls the firewall thread (and the expiry sweep) for long per change.
FIREWALL_LOCK_WAIT = 1.0
SWEEP_SECONDS = 1.0  # how often expired grants are removed
# Changes waiting for the firewall thread, after coalescing. The caps bound them already:
# distinct keys opened are at most the sum of the users' max_grants (16 each by default),
# and each user adds at most max_knocks_per_minute changes a minute. This bound holds when
# the firewall stalls for long (a lock held for minutes): about 25 MB at most.
MAX_PENDING_CHANGES = 65_536
COMPLAIN_SECONDS = 60  # at most one "queue full" warning per minute
# What a change carried out did to the firewall, as the metrics count it: "kept" is an open
# that found a grant lasting longer already (an open never shortens one).
GRANT_CHANGES = ("opened", "extended", "kept", "closed", "expired")


class ChangeQueue:
    """Grant changes waiting for the firewall thread, in the order they came: coalesced per
    grant key, bounded.

    A change that cannot alter what its key's pending changes leave in the firewall,
    whatever that held before, is absorbed into them (counted in ``absorbed``):

    - an open after an open of the same key: the later expiry is the one to apply (on a
      tie the first, which the firewall would keep);
    - a close after a run of closes of the same key that holds one by the same user: that
      one already left nothing of the user's.

    An open followed by a close by the same user is not collapsed into the close: the open
    may take over another user's shorter grant, which the close then removes and the
    close alone would leave standing. So the firewall ends as the changes applied one by
    one would leave it (tests/test_worker.py holds it to that on random sequences).

    Past ``limit`` pending changes a new one is dropped (counted by kind, a warning at most
    once a minute); one that is absorbed is always taken. ``put`` never waits but for the
    lock, which ``take`` holds only to swap the pending changes out.
    """

    def __init__(self, limit: int = MAX_PENDING_CHANGES, clock: Callable[[], float] = time.time):
        self.limit = limit
        self.absorbed = 0  # changes that needed no firewall call of their own
        self.dropped = {Action.OPEN: 0, Action.CLOSE: 0}  # refused while full, by kind
        self._clock = clock
        self._pending: list[GrantChange] = []
        self._positions: dict[GrantKey, list[int]] = {}  # each key's places in _pending
        self._closed = False
        self._ready = threading.Condition(threading.Lock())
        self._last_complaint = -math.inf
        # Each ``put`` gets a number; ``taken`` is the last one ``take`` handed out: a
        # caller can tell when what it put has been taken (the worker: carried out).
        self.tickets = 0
        self.taken = 0

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, changes: Sequence[GrantChange]) -> int:
        """Queue ``changes``, in order; their ticket (0: refused, the queue is closed)."""
        full = 0
        with self._ready:
            if self._closed:  # nothing would take them: say so rather than lose them quietly
                log.warning("firewall: %d changes came after the stop; not applied", len(changes))
                return 0
            self.tickets += 1
            ticket = self.tickets
            pending = self._pending
            for change in changes:
                key = change.grant.key
                positions = self._positions.get(key)
                if positions and _absorb(pending, positions, change):
                    self.absorbed += 1
                elif len(pending) < self.limit:
                    if positions is None:
                        self._positions[key] = [len(pending)]
                    else:
                        positions.append(len(pending))
                    pending.append(change)
                else:
                    self.dropped[change.action] += 1
                    full += 1
            self._ready.notify()
        if full and self._clock() - self._last_complaint >= COMPLAIN_SECONDS:
            self._last_complaint = self._clock()
            log.warning(
                "firewall queue full (%d changes waiting): dropped %d opens and %d closes so "
                "far (a dropped close leaves its grant until it expires); the firewall is "
                "not keeping up",
                self.limit,
                self.dropped[Action.OPEN],
                self.dropped[Action.CLOSE],
            )
        return ticket

    def take(self, timeout: float) -> tuple[list[GrantChange], bool]:
        """Every pending change, oldest first (waiting up to ``timeout`` seconds for one),
        and whether the queue is closed: then nothing more comes."""
        with self._ready:
            if not self._pending and not self._closed:
                self._ready.wait(timeout)
            taken, self._pending, self._positions = self._pending, [], {}
            self.taken = self.tickets
            return taken, self._closed

    def close(self) -> None:
        """Nothing more comes: ``take`` returns at once from now on."""
        with self._ready:
            self._closed = True
            self._ready.notify()


def _absorb(pending: list[GrantChange], positions: list[int], change: GrantChange) -> bool:
    """Fold ``change`` into its key's pending changes (at ``positions`` of ``pending``) if
    the firewall ends the same as with ``change`` applied after them; whether it did."""
    if change.action == Action.OPEN:
        last = pending[positions[-1]]
        if last.action != Action.OPEN:
            return False
        if change.grant.expires > last.grant.expires:
            pending[positions[-1]] = change
        return True
    for position in reversed(positions):  # the run of closes at the end
        earlier = pending[position]
        if earlier.action != Action.CLOSE:
            return False
        if earlier.grant.user == change.grant.user:
            return True
    return False


class FirewallWorker(threading.Thread):
    """Applies grant changes in order on its own thread, retries failures, sweeps expiry.

    A failed change is retried after each pause of ``retries``. Before a retry what the
    grants live in is restored (``setup()``: someone may have flushed our chain), except
    when the failure was a lock held by another process (``FirewallBusy``): then only
    waiting helps. After the last attempt the failure is logged with its cause and what it
    left behind, read back from the firewall, so the log never claims a grant the firewall
    does not hold.
    """

    def __init__(
        self,
        firewall: Firewall,
        clock: Callable[[], float] = time.time,
        lock_wait: float | None = FIREWALL_LOCK_WAIT,
        sleep: Callable[[float], None] = time.sleep,
        retries: Sequence[float] = FIREWALL_RETRIES,
        queue_limit: int = MAX_PENDING_CHANGES,
        on_change: Callable[[str, Grant], None] | None = None,
    ):
        super().__init__(name="knockd-fast-firewall", daemon=True)
        self.firewall = firewall
        if lock_wait is not None and isinstance(firewall, WaitsForLock):
            firewall.lock_wait = lock_wait
        self.clock = clock
        self.sleep = sleep
        self.retries = tuple(retries)
        # A backend that keeps nothing outside this process says so on every line.
        self.tag = "firewall" if firewall.persistent else "firewall (dry run)"
        self.queue = ChangeQueue(queue_limit, clock)
        self._reread = threading.Event()  # SIGHUP: read the grants back from the kernel
        self._republish = threading.Event()  # the fleet's Redis lost them: tell them again
        self.applied = 0  # changes carried out (opens and closes, not sweeps)
        self.failed = 0  # changes and sweeps given up on, after every attempt
        self.retried = 0  # attempts after a failure
        self.changes = dict.fromkeys(GRANT_CHANGES, 0)  # fixed keys: read from other threads
        # Each live grant's expiry as this thread last saw it: tells an open from an
        # extension, and counts the live grants, without asking the kernel.
        self._live: dict[GrantKey, int] = {}
        self.done = 0  # the ticket (ChangeQueue.put) of the last changes carried out
        # The live grants that came from the fleet: their expiry is the fleet's news already
        # (each gateway expires a grant itself, and only its maker publishes that).
        self._from_fleet: set[GrantKey] = set()
        # Told of every change this gateway made ("open" with the grant in force, "close",
        # "expire"), on this thread, once carried out: the fleet publishes them. It must
        # not block. Changes that came from the fleet are not passed on.
        self.on_change = on_change

    def track(self, grants: Sequence[Grant]) -> None:
        """The grants the firewall holds (read back at start): what later changes count from."""
        self._live = {grant.key: grant.expires for grant in grants}
        self._from_fleet &= self._live.keys()

    def holds(self, grant: Grant) -> bool:
        """Whether the firewall holds ``grant``'s key until its expiry or later, as this
        thread last saw it (callable from any thread: one dictionary read)."""
        return self._live.get(grant.key, 0) >= grant.expires

    @property
    def live(self) -> int:
        """Grants in the firewall, as the changes and sweeps carried out leave it."""
        return len(self._live)

    def submit(self, changes: Sequence[GrantChange]) -> int:
        """Several changes, applied in order; one hand-over for the lot, never waiting.
        Returns the ticket that ``done`` reaches once they (and all before) are carried out."""
        if changes:
            return self.queue.put(changes)
        return self.queue.tickets

    def stop(self) -> None:
        """Apply what was submitted, then end the thread."""
        self.queue.close()
        self.join()

    def request_reread(self) -> None:
        """Read the grants back from the kernel on the thread's next turn (within a second):
        on SIGHUP, after an admin changed them by hand."""
        self._reread.set()

    def request_republish(self) -> None:
        """Pass every live grant to ``on_change`` again on the thread's next turn: the
        fleet's Redis came back without them."""
        self._republish.set()

    def pending(self) -> int:
        """Changes handed over and not yet taken (after coalescing)."""
        return len(self.queue)

    def run(self) -> None:
        next_sweep = self.clock() + SWEEP_SECONDS
        while True:
            changes, closed = self.queue.take(max(0.0, next_sweep - self.clock()))
            ticket = self.queue.taken
            self.apply_all(changes)
            self.done = ticket
            if self._reread.is_set():
                self._reread.clear()
                self._attempts("read back", None, lambda _: self._read_back())
            if self._republish.is_set():
                self._republish.clear()
                self._attempts("read back", None, lambda _: self._tell_live())
            if changes:
                flush_logs()
            if self.clock() >= next_sweep:
                self.sweep()
                next_sweep = self.clock() + SWEEP_SECONDS
                flush_logs()
            if closed:
                return

    # -- one change or sweep, with its retries (the thread's work; callable directly) --

    def apply_all(self, changes: Sequence[GrantChange]) -> None:
        """Carry out ``changes`` in order: in transactions of at most ``MAX_BATCH`` where
        the backend applies batches, else one by one."""
        if len(changes) > 1 and isinstance(self.firewall, AppliesBatches):
            for start in range(0, len(changes), MAX_BATCH):
                self._batch(self.firewall, changes[start : start + MAX_BATCH])
        else:
            for change in changes:
                self.apply(change)

    def _batch(self, firewall: AppliesBatches, changes: Sequence[GrantChange]) -> None:
        try:
            outcomes = firewall.apply_batch(changes)
        except FirewallError as error:  # nothing was changed: one by one, with retries
            log.warning(
                "firewall: a batch of %d changes failed (%s); applying them one by one",
                len(changes),
                error,
            )
        except Exception:  # a bug must not lose the changes: one by one
            log.exception("firewall: unexpected error in a batch of %d changes", len(changes))
        else:
            lines = [
                self._report_line(change, outcome)
                for change, outcome in zip(changes, outcomes, strict=True)
            ]
            log_lines(log, lines)
            self.applied += len(changes)
            return
        for change in changes:
            self.apply(change)

    def apply(self, change: GrantChange) -> None:
        """Open or close one grant now, retrying as the class says."""
        if change.action == Action.CLOSE:
            close = self.firewall.close
            self._attempts(
                "close", change.grant, lambda g: self._report(change, close(g.key, g.user))
            )
        else:
            self._attempts(
                "open", change.grant, lambda g: self._report(change, self.firewall.open(g))
            )

    def sweep(self) -> None:
        """Repair what the grants live in if someone removed it; remove the grants whose
        expiry has come."""
        if isinstance(self.firewall, SelfHealing):
            self._attempts("repair", None, lambda _: self._repair(self.firewall))
        self._attempts("expire", None, lambda _: self._expire())

    def _report(self, change: GrantChange, outcome: ChangeOutcome) -> None:
        log.info(self._report_line(change, outcome))

    def _report_line(self, change: GrantChange, outcome: ChangeOutcome) -> Event:
        """The log line of one change carried out (counted in ``changes``)."""
        grant, origin = change.grant, change.origin
        # A change from the fleet says so; one of ours goes on to the fleet.
        fields = {"origin": origin} if origin else {}
        suffix = f" (from gateway {origin})" if origin else ""
        tell = self.on_change if origin is None else None
        if change.action == Action.CLOSE:
            self._live.pop(grant.key, None)
            self._from_fleet.discard(grant.key)
            self.changes["closed"] += bool(outcome)
            if tell is not None:
                tell("close", grant)  # the user's wish, whatever this firewall held
            verb = "closed" if outcome else "no grant to close for"
            return self._event(
                f"{verb} {describe(grant, expiry=False)}{suffix}",
                "closed" if outcome else "nothing_to_close",
                grant,
                **fields,
            )
        held = self._live.get(grant.key)
        in_force = outcome if isinstance(outcome, Grant) else grant
        self._live[grant.key] = in_force.expires
        if in_force.expires > grant.expires:
            self.changes["kept"] += 1
            text = f"kept {describe(in_force)}{suffix}"  # never shortened
            return self._event(text, "kept", in_force, **fields)
        kind = "extended" if held is not None and held > self.clock() else "opened"
        self.changes[kind] += 1
        if origin:
            self._from_fleet.add(grant.key)
        else:
            self._from_fleet.discard(grant.key)
        if tell is not None:
            tell("open", grant)
        return self._event(f"opened {describe(grant)}{suffix}", kind, grant, **fields)

    def _event(
        self, text: str, change: str, grant: Grant | None, tag: str | None = None, **fields: object
    ) -> Event:
        """A firewall line: ``TAG: TEXT`` (the worker's tag by default), and for the JSON log
        the change with its grant's fields."""
        return Event(
            f"{tag or self.tag}: {text}",
            "firewall",
            change=change,
            backend=self.firewall.name,
            **(grant_fields(grant) if grant is not None else {}),
            **fields,
        )

    def _read_back(self) -> None:
        live = self.firewall.grants()  # the backend's view is reset to what the kernel holds
        self.track(live)
        log.info("%s: grants read back from the firewall: %d live", self.tag, len(live))
        flush_logs()

    def _tell_live(self) -> None:
        now = self.clock()
        if self.on_change is not None:
            for grant in self.firewall.grants():
                if grant.expires > now:
                    self.on_change("open", grant)

    def _repair(self, firewall: SelfHealing) -> None:
        restored = firewall.repair()
        if restored is not None:
            log.warning(
                "%s: what the grants live in was gone (a flushed ruleset, destroyed sets, a "
                "firewall reload?): re-created it and re-added %d live grants",
                self.tag,
                len(restored),
            )

    def _expire(self) -> None:
        for gone in self.firewall.expire(int(self.clock())):
            self._live.pop(gone.key, None)
            self.changes["expired"] += 1
            if gone.key in self._from_fleet:
                self._from_fleet.discard(gone.key)
            elif self.on_change is not None:
                self.on_change("expire", gone)
            log.info(self._event(f"expired {describe(gone, expiry=False)}", "expired", gone))

    def _attempts(self, what: str, grant: Grant | None, operation: Callable) -> None:
        for attempt, pause in enumerate((*self.retries, None)):
            try:
                operation(grant)
            except FirewallError as error:
                if pause is None:
                    self.failed += 1
                    self._give_up(what, grant, attempt + 1, error)
                    return
                log.warning("firewall: %s failed (%s); retrying in %.1f s", what, error, pause)
                self.sleep(pause)
                self.retried += 1
                if not isinstance(error, FirewallBusy):
                    self._heal()
            except Exception:  # a bug must not kill the thread that closes ports
                log.exception("firewall: unexpected error during %s", what)
                self.failed += 1
                return
            else:
                self.applied += grant is not None
                return

    def _heal(self) -> None:
        # Someone may have flushed or deleted our chain or the jump to it: setup() is
        # idempotent and commits nothing when all is in place.
        try:
            self.firewall.setup()
        except FirewallError as error:
            log.warning("firewall: cannot restore the chain and jumps: %s", error)

    def _give_up(self, what: str, grant: Grant | None, attempts: int, error: Exception) -> None:
        """Log the failure with what it left in the firewall, and re-read the grants."""
        live = self._resync()
        if grant is None:
            outcome = "expired grants are removed at a later sweep"
        else:
            text = describe(grant, expiry=False)
            held = next((g for g in live or () if g.key == grant.key), None)
            if live is None:
                outcome = f"unknown whether the firewall holds {text}"
            elif what != "open":
                outcome = f"still open until it expires: {text}" if held else f"gone: {text}"
            elif held is None:
                outcome = f"not granted: {text}"
            elif held.expires < grant.expires:  # an extension that did not happen
                outcome = f"not extended: {text} stays until {iso_time(held.expires)}"
            else:
                outcome = f"in the firewall after all: {text}"
        text = f"{what} failed after {attempts} attempts: {error}; {outcome}"
        log.error(self._event(text, "failed", grant, tag="firewall", operation=what))
        if live is not None:
            log.warning("firewall: view reconciled from the firewall: %d live grants", len(live))

    def _resync(self) -> list[Grant] | None:
        """The grants read back from the firewall (the backend's view is reset to them)."""
        try:
            live = self.firewall.grants()
        except FirewallError as error:
            log.error("firewall: cannot read back the grants: %s", error)
            return None
        self.track(live)
        return live


def grant_fields(grant: Grant) -> dict[str, object]:
    """A grant as the JSON log's fields."""
    return {
        "port": grant.port,
        "proto": grant.proto,
        "source": address_text(grant.source),
        "destination": address_text(grant.destination) if grant.destination else None,
        "user": grant.user,
        "expires": iso_time(grant.expires),
    }


def describe(grant: Grant, expiry: bool = True) -> str:
    """``22/tcp for 192.0.2.2 to 192.0.2.1 (user alice) until 2026-...Z``, as logs say it."""
    where = f" to {address_text(grant.destination)}" if grant.destination else ""
    until = f" until {iso_time(grant.expires)}" if expiry else ""
    source = address_text(grant.source)
    return f"{grant.port}/{grant.proto} for {source}{where} (user {grant.user}){until}"
