"""The firewall worker's retry, repair and give-up paths, against a failing backend double;
its queue's coalescing and bound.

No root and no sleeping: the clock and the pause between attempts are injected, and the
double is the dry run with failures scheduled per operation. Every message checked here is
one an admin reads in the log when the firewall misbehaves.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from ipaddress import ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knock_client.protocol import Action
from knockd_fast.firewall import DryRunFirewall, FirewallBusy, FirewallError, Grant, GrantChange
from knockd_fast.firewall.worker import (
    FIREWALL_LOCK_WAIT,
    FIREWALL_RETRIES,
    ChangeQueue,
    FirewallWorker,
)

NOW = 1_800_000_000
ALICE = Grant(ip_address("192.0.2.2"), "tcp", 22, ip_address("192.0.2.1"), NOW + 300, "alice")
WHAT = "22/tcp for 192.0.2.2 to 192.0.2.1 (user alice)"


class Flaky(DryRunFirewall):
    """The dry run, with the next calls of an operation made to fail: ``fail("open",
    FirewallError("..."), ...)`` queues one failure per exception (or a bug: any other
    exception). Records every call, ``setup`` (the repair) included."""

    def __init__(self) -> None:
        super().__init__(history=0)
        self.failures: dict[str, deque[Exception]] = {}
        self.calls: list[str] = []

    def fail(self, operation: str, *errors: Exception) -> None:
        self.failures.setdefault(operation, deque()).extend(errors)

    def _maybe_fail(self, operation: str) -> None:
        self.calls.append(operation)
        pending = self.failures.get(operation)
        if pending:
            raise pending.popleft()

    def setup(self) -> None:
        self._maybe_fail("setup")
        super().setup()

    def grants(self):  # noqa: ANN201
        self._maybe_fail("grants")
        return super().grants()

    def open(self, grant: Grant) -> Grant:
        self._maybe_fail("open")
        return super().open(grant)

    def close(self, key, user=None) -> bool:  # noqa: ANN001
        self._maybe_fail("close")
        return super().close(key, user)

    def expire(self, now: int):  # noqa: ANN201
        self._maybe_fail("expire")
        return super().expire(now)


class Locked(Flaky):
    """A double with the lock capability (``WaitsForLock``), as the iptables backend."""

    name = "locked"
    persistent = True
    lock_wait = 5.0


@pytest.fixture
def worker_for():
    def make(firewall: Flaky) -> tuple[FirewallWorker, list[float]]:
        pauses: list[float] = []
        worker = FirewallWorker(firewall, clock=lambda: NOW, sleep=pauses.append)
        return worker, pauses

    return make


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "knockd_fast"]


def opening(grant: Grant = ALICE) -> GrantChange:
    return GrantChange(Action.OPEN, grant)


def test_a_failure_then_success_retries_after_repairing(worker_for, caplog) -> None:
    fw = Flaky()
    fw.fail("open", FirewallError("iptables: add grant: chain gone"), FirewallError("again"))
    worker, pauses = worker_for(fw)
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        worker.apply(opening())
    assert pauses == list(FIREWALL_RETRIES[:2])
    assert fw.calls == ["open", "setup", "open", "setup", "open"]
    assert fw.grants() == [ALICE]
    assert (worker.applied, worker.failed, worker.retried) == (1, 0, 2)
    assert messages(caplog) == [
        "firewall: open failed (iptables: add grant: chain gone); retrying in 0.1 s",
        "firewall: open failed (again); retrying in 0.5 s",
        f"firewall (dry run): opened {WHAT} until 2027-01-15T08:05:00.000Z",
    ]


def test_a_busy_lock_is_waited_out_without_repairs(worker_for, caplog) -> None:
    fw = Flaky()
    fw.fail("open", FirewallBusy("xtables lock held"), FirewallBusy("xtables lock held"))
    worker, pauses = worker_for(fw)
    worker.apply(opening())
    assert "setup" not in fw.calls, "repairing cannot help while another process holds the lock"
    assert pauses == [0.1, 0.5] and fw.grants() == [ALICE]


def test_giving_up_says_what_the_firewall_holds(worker_for, caplog) -> None:
    fw = Flaky()
    fw.fail("open", *[FirewallError("no luck")] * 4)
    worker, pauses = worker_for(fw)
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        worker.apply(opening())
    assert pauses == list(FIREWALL_RETRIES)
    assert (worker.applied, worker.failed, worker.retried) == (0, 1, 3)
    assert messages(caplog)[-2:] == [
        f"firewall: open failed after 4 attempts: no luck; not granted: {WHAT}",
        "firewall: view reconciled from the firewall: 0 live grants",
    ]


def test_a_failed_extension_keeps_the_old_expiry_and_says_until_when(worker_for, caplog) -> None:
    fw = Flaky()
    worker, _ = worker_for(fw)
    worker.apply(opening())
    longer = Grant(ALICE.source, "tcp", 22, ALICE.destination, NOW + 900, "alice")
    fw.fail("open", *[FirewallError("no luck")] * 4)
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        worker.apply(opening(longer))
    assert f"not extended: {WHAT} stays until 2027-01-15T08:05:00.000Z" in messages(caplog)[-2]
    assert fw.grants() == [ALICE]


def test_a_failed_close_says_whether_the_grant_is_still_open(worker_for, caplog) -> None:
    fw = Flaky()
    worker, _ = worker_for(fw)
    worker.apply(opening())
    fw.fail("close", *[FirewallError("no luck")] * 4)
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        worker.apply(GrantChange(Action.CLOSE, ALICE))
    assert messages(caplog)[-2] == (
        f"firewall: close failed after 4 attempts: no luck; still open until it expires: {WHAT}"
    )


def test_when_the_grants_cannot_be_read_back_the_log_says_it_does_not_know(
    worker_for, caplog
) -> None:
    fw = Flaky()
    fw.fail("open", *[FirewallError("no luck")] * 4)
    fw.fail("grants", FirewallError("cannot list"))
    fw.fail("setup", *[FirewallError("cannot create the chain")] * 3)
    worker, _ = worker_for(fw)
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        worker.apply(opening())
    said = messages(caplog)
    assert said.count("firewall: cannot restore the chain and jumps: cannot create the chain") == 3
    assert said[-2:] == [
        "firewall: cannot read back the grants: cannot list",
        "firewall: open failed after 4 attempts: no luck; "
        f"unknown whether the firewall holds {WHAT}",
    ]


def test_a_failed_sweep_is_left_for_the_next_one(worker_for, caplog) -> None:
    fw = Flaky()
    fw.fail("expire", *[FirewallError("no luck")] * 4)
    worker, _ = worker_for(fw)
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        worker.sweep()
    assert (worker.applied, worker.failed) == (0, 1)
    assert messages(caplog)[-2] == (
        "firewall: expire failed after 4 attempts: no luck; "
        "expired grants are removed at a later sweep"
    )


def test_a_bug_in_a_backend_is_logged_and_the_next_change_still_applies(worker_for, caplog) -> None:
    fw = Flaky()
    fw.fail("open", KeyError("a bug"))
    worker, pauses = worker_for(fw)
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        worker.apply(opening())
        worker.apply(opening())
    assert pauses == [] and worker.failed == 1 and worker.applied == 1
    assert "firewall: unexpected error during open" in messages(caplog)
    assert fw.grants() == [ALICE]


def test_the_lock_wait_is_shortened_only_for_backends_with_a_lock(worker_for) -> None:
    locked = Locked()
    FirewallWorker(locked)
    assert locked.lock_wait == FIREWALL_LOCK_WAIT
    plain = Flaky()
    FirewallWorker(plain)
    assert not hasattr(plain, "lock_wait")


def test_the_thread_applies_changes_in_order_and_sweeps_expiry(caplog) -> None:
    now = [float(NOW)]
    fw = Flaky()
    worker = FirewallWorker(fw, clock=lambda: now[0], sleep=lambda _: None)
    soon = Grant(ip_address("192.0.2.3"), "tcp", 22, None, NOW, "bob")  # due at once
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        worker.start()
        worker.submit([opening(), GrantChange(Action.OPEN, soon)])
        now[0] += 5  # past the sweep interval: the thread sweeps at its next wake-up
        worker.submit([GrantChange(Action.CLOSE, ALICE)])
        worker.stop()
    said = [m for m in messages(caplog) if m.startswith("firewall")]
    # The sweep runs after whichever job finds the interval passed; the jobs keep their order.
    assert "firewall (dry run): expired 22/tcp for 192.0.2.3 (user bob)" in said
    assert [m for m in said if " expired " not in m] == [
        f"firewall (dry run): opened {WHAT} until 2027-01-15T08:05:00.000Z",
        "firewall (dry run): opened 22/tcp for 192.0.2.3 (user bob) until 2027-01-15T08:00:00.000Z",
        f"firewall (dry run): closed {WHAT}",
    ]
    assert fw.calls.count("close") == 1 and worker.applied == 3


def test_an_open_that_would_shorten_a_grant_keeps_it_and_says_so(worker_for, caplog) -> None:
    fw = Flaky()
    worker, _ = worker_for(fw)
    longer = Grant(ALICE.source, "tcp", 22, ALICE.destination, NOW + 900, "bob")
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        worker.apply(opening(longer))
        worker.apply(opening(ALICE))  # alice asks for less: bob's longer grant stays
        worker.apply(GrantChange(Action.CLOSE, ALICE))  # and is not alice's to close
    said = messages(caplog)
    assert said[1] == (
        "firewall (dry run): kept 22/tcp for 192.0.2.2 to 192.0.2.1 (user bob) "
        "until 2027-01-15T08:15:00.000Z"
    )
    assert said[2] == f"firewall (dry run): no grant to close for {WHAT}"
    assert fw.grants() == [longer]


# --- the queue: coalesced per key, bounded, never blocking ------------------------------


def grant(user: str = "alice", expires: int = NOW + 300, port: int = 22) -> Grant:
    return Grant(ALICE.source, "tcp", port, ALICE.destination, expires, user)


def closing(grant_: Grant = ALICE) -> GrantChange:
    return GrantChange(Action.CLOSE, grant_)


def test_opens_of_one_grant_coalesce_into_the_longest_in_its_place() -> None:
    queue = ChangeQueue()
    other = opening(grant(port=443))
    queue.put([opening(grant(expires=NOW + 300)), other, opening(grant(expires=NOW + 900))])
    queue.put([opening(grant(expires=NOW + 600)), opening(grant("bob", expires=NOW + 900))])
    taken, closed = queue.take(0)
    # The tie keeps alice's: the firewall would keep the grant it holds until then.
    assert taken == [opening(grant(expires=NOW + 900)), other] and not closed
    assert queue.absorbed == 3 and len(queue) == 0


def test_repeated_closes_by_one_user_coalesce_and_an_open_between_keeps_its_place() -> None:
    queue = ChangeQueue()
    bob = closing(grant("bob"))
    queue.put([closing(), bob, closing(), bob])
    queue.put([opening(), closing()])
    taken, _ = queue.take(0)
    assert taken == [closing(), bob, opening(), closing()]
    assert queue.absorbed == 2


def test_an_open_then_a_close_by_the_same_user_are_both_applied() -> None:
    """Why an open followed by its user's close is not collapsed into the close: the open
    takes over bob's shorter grant, so alice's close removes it; the close alone would not."""
    fw = DryRunFirewall(history=0)
    fw.open(grant("bob", expires=NOW + 60))
    queue = ChangeQueue()
    queue.put([opening(grant(expires=NOW + 600)), closing()])
    taken, _ = queue.take(0)
    assert len(taken) == 2
    worker = FirewallWorker(fw, clock=lambda: NOW, sleep=lambda _: None)
    for change in taken:
        worker.apply(change)
    assert fw.grants() == []


# Two users, two ports, four expiries: ties, takeovers and closes of another's grant are
# common, and each example is short.
USERS = ("alice", "bob")
users = st.sampled_from(USERS)
expiries = st.integers(NOW + 1, NOW + 4)
ports = st.sampled_from([22, 443])
change_strategy = st.builds(
    GrantChange,
    st.sampled_from([Action.OPEN, Action.CLOSE]),
    st.builds(grant, users, expiries, ports),
)


@settings(max_examples=500, deadline=None)
@given(
    held=st.lists(st.builds(grant, users, expiries, ports), max_size=4),
    changes=st.lists(change_strategy, max_size=16),
    takes=st.sets(st.integers(0, 16), max_size=4),
)
def test_the_coalesced_queue_leaves_the_firewall_as_the_changes_one_by_one(
    held, changes, takes
) -> None:
    """Whatever the firewall held before, and wherever the thread takes the pending changes,
    applying what the queue hands out ends in the state of applying every change in order."""
    one_by_one, coalesced = DryRunFirewall(history=0), DryRunFirewall(history=0)
    for firewall in (one_by_one, coalesced):
        for start in held:
            firewall.open(start)
    apply_all = FirewallWorker(one_by_one, clock=lambda: NOW, sleep=lambda _: None)
    for change in changes:
        apply_all.apply(change)
    worker = FirewallWorker(coalesced, clock=lambda: NOW, sleep=lambda _: None)
    handed_out: list[GrantChange] = []
    for index, change in enumerate(changes):
        if index in takes:
            handed_out += worker.queue.take(0)[0]
        worker.submit([change])
    handed_out += worker.queue.take(0)[0]
    for change in handed_out:
        worker.apply(change)
    assert coalesced.grants() == one_by_one.grants()
    assert len(handed_out) + worker.queue.absorbed == len(changes)


def test_a_full_queue_drops_new_changes_counts_them_and_warns_once_a_minute(caplog) -> None:
    now = [float(NOW)]
    queue = ChangeQueue(limit=3, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="knockd_fast"):
        queue.put([opening(grant(port=port)) for port in (1, 2, 3, 4)])
        queue.put([opening(grant(port=1, expires=NOW + 900))])  # absorbed: taken when full
        queue.put([closing(grant(port=5)), opening(grant(port=6))])
        now[0] += 60
        queue.put([closing(grant(port=7))])
    assert queue.dropped == {Action.OPEN: 2, Action.CLOSE: 2} and len(queue) == 3
    warnings = [r.getMessage() for r in caplog.records if "firewall queue full" in r.getMessage()]
    assert warnings == [
        "firewall queue full (3 changes waiting): dropped 1 opens and 0 closes so far (a "
        "dropped close leaves its grant until it expires); the firewall is not keeping up",
        "firewall queue full (3 changes waiting): dropped 2 opens and 2 closes so far (a "
        "dropped close leaves its grant until it expires); the firewall is not keeping up",
    ]
    taken, _ = queue.take(0)
    assert [c.grant.port for c in taken] == [1, 2, 3] and taken[0].grant.expires == NOW + 900


def test_submit_never_waits_for_a_firewall_call_in_progress() -> None:
    """The thread is stuck inside the backend (as behind another process's xtables lock):
    handing changes over still returns at once, and they are applied once it is free."""

    class Stuck(Flaky):
        def __init__(self) -> None:
            super().__init__()
            self.entered, self.release = threading.Event(), threading.Event()

        def open(self, grant_: Grant) -> Grant:
            self.entered.set()
            assert self.release.wait(30), "never released"
            return super().open(grant_)

    fw = Stuck()
    worker = FirewallWorker(fw, clock=lambda: NOW, sleep=lambda _: None)
    worker.start()
    try:
        worker.submit([opening()])
        assert fw.entered.wait(30)
        for port in range(1000, 6000):  # all handed over while the thread is stuck
            worker.submit([opening(grant(port=port))])
        assert worker.pending() == 5000
    finally:
        fw.release.set()
        worker.stop()
    assert len(fw.grants()) == 5001 and worker.pending() == 0


# --- batches and repair -------------------------------------------------------------------


class Batching(Flaky):
    """The dry run's transactional ``apply_batch``, with its calls counted and failures
    scheduled as ``fail("apply_batch", ...)``."""

    def apply_batch(self, changes):  # noqa: ANN001, ANN201
        self._maybe_fail("apply_batch")
        return super().apply_batch(changes)


def grant_for(n: int, user: str = "alice") -> Grant:
    return Grant(ip_address("198.51.100.0") + n, "tcp", 22, ip_address("192.0.2.1"), NOW + 60, user)


def test_waiting_changes_go_to_the_firewall_as_one_transaction(worker_for, caplog) -> None:
    fw = Batching()
    worker, _ = worker_for(fw)
    changes = [opening(grant_for(n)) for n in range(5)] + [
        GrantChange(Action.CLOSE, grant_for(0)),
        GrantChange(Action.CLOSE, grant_for(1, "bob")),  # not bob's: nothing to close
    ]
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        worker.apply_all(changes)
    assert fw.calls.count("apply_batch") == 1 and worker.applied == 7
    said = messages(caplog)
    assert len(said) == 7 and said[0].startswith("firewall (dry run): opened 22/tcp for 198.51.")
    assert said[5].startswith("firewall (dry run): closed 22/tcp for 198.51.100.0 ")
    assert said[6].startswith("firewall (dry run): no grant to close for 22/tcp for 198.51.100.1")
    assert [str(g.source) for g in fw.grants()] == [f"198.51.100.{n}" for n in range(1, 5)]


def test_a_failed_transaction_changes_nothing_and_the_changes_go_one_by_one(
    worker_for, caplog
) -> None:
    fw = Batching()
    fw.fail("open", FirewallError("dry-run: boom"))  # in the batch: it is rolled back
    worker, pauses = worker_for(fw)
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        worker.apply_all([opening(grant_for(n)) for n in range(3)])
    said = messages(caplog)
    assert said[0] == (
        "firewall: a batch of 3 changes failed (dry-run: boom); applying them one by one"
    )
    assert len(fw.grants()) == 3 and worker.applied == 3 and pauses == []
    assert fw.calls.count("open") == 4  # the failed one in the batch, then each on its own


def test_a_bug_in_a_batch_is_logged_and_no_change_is_lost(worker_for, caplog) -> None:
    fw = Batching()
    fw.fail("apply_batch", KeyError("bug"))
    worker, _ = worker_for(fw)
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        worker.apply_all([opening(grant_for(n)) for n in range(2)])
    assert "firewall: unexpected error in a batch of 2 changes" in messages(caplog)
    assert len(fw.grants()) == 2


class Vanishing(Flaky):
    """A backend whose table someone flushes: ``repair`` re-creates it and its grants."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed = False

    def repair(self):  # noqa: ANN201
        self._maybe_fail("repair")
        if not self.flushed:
            return None
        self.flushed = False
        return self.grants()


def test_a_sweep_repairs_what_someone_removed_and_says_so(worker_for, caplog) -> None:
    fw = Vanishing()
    worker, pauses = worker_for(fw)
    worker.apply(opening())
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        worker.sweep()  # all in place: nothing said
        fw.flushed = True
        worker.sweep()
        fw.fail("repair", FirewallError("dry-run: table busy"))
        fw.flushed = True
        worker.sweep()  # fails, retried after a pause
    said = messages(caplog)
    assert said[0] == (
        "firewall (dry run): what the grants live in was gone (a flushed ruleset, destroyed "
        "sets, a firewall reload?): re-created it and re-added 1 live grants"
    )
    assert said[1].startswith("firewall: repair failed (dry-run: table busy); retrying in 0.1 s")
    assert said[-1] == said[0] and pauses == [0.1]


def test_a_reread_request_reads_the_grants_back_on_the_thread(caplog) -> None:
    """SIGHUP: the firewall thread re-reads the kernel's grants (its view is reset)."""
    fw = Flaky()
    worker = FirewallWorker(fw, clock=lambda: float(NOW), sleep=lambda _: None)
    worker.apply(opening())
    with caplog.at_level(logging.INFO, logger="knockd_fast"):
        worker.start()
        worker.request_reread()
        worker.stop()
    assert fw.calls.count("grants") == 1
    assert "firewall (dry run): grants read back from the firewall: 1 live" in messages(caplog)


# --- what the metrics count -------------------------------------------------------------


@pytest.mark.parametrize("batching", [False, True], ids=["one by one", "one transaction"])
def test_changes_are_counted_by_what_they_did_and_live_grants_follow(batching) -> None:
    """An open of a new key, one of a live key (extended), one that finds a longer grant
    (kept), a close that finds a grant and one that does not, an expiry: each counted as
    what it did to the firewall, the live grants as the firewall holds them."""
    now = [NOW]
    fw = Batching() if batching else Flaky()
    worker = FirewallWorker(fw, clock=lambda: now[0], sleep=lambda _: None)
    fw.open(grant_for(9))
    worker.track(fw.grants())  # read back at start: live, and no change of this run

    def until(n: int, expires: int) -> Grant:
        return Grant(grant_for(n).source, "tcp", 22, ALICE.destination, expires, "alice")

    worker.apply_all([
        opening(grant_for(1)),
        opening(grant_for(2)),
        opening(until(1, NOW + 90)),  # a live grant lasting longer: extended
        opening(until(2, NOW + 30)),  # asks for less than the live one holds: kept
        GrantChange(Action.CLOSE, grant_for(9)),
        GrantChange(Action.CLOSE, grant_for(7)),  # nothing to close: no change
    ])  # fmt: skip
    assert worker.changes == {"opened": 2, "extended": 1, "kept": 1, "closed": 1, "expired": 0}
    assert worker.live == len(fw.grants()) == 2
    now[0] = NOW + 120
    worker.sweep()
    assert worker.changes["expired"] == 2
    assert worker.live == len(fw.grants()) == 0
