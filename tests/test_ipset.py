"""The ipset backend (and the iptables backend's batches) in fresh network namespaces.

As in tests/test_firewall.py, the test process never enters a namespace:
``tests/firewall_probe.py`` runs the backend inside one, and the kernel's view is read
with ``ipset list`` / ``iptables-legacy -S`` there. The end-to-end tests at the bottom run
the real daemon with ``grants.backend = "ipset"`` (tests/e2e.py's harness) where only
ipset is concerned; tests/test_e2e_backends.py has the scenarios all backends share.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time

import pytest
from e2e import SERVER_V4, doorman
from firewall_probe import run_ops
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netns import NetnsUnavailable, run_in
from test_firewall import (
    CHAIN,
    IPT,
    NOW,
    OWNERSHIP,
    OWNERSHIP_RESULTS,
    SCENARIO,
    Probe,
    grant,
    key,
    sort_json,
)

from knockd_fast.firewall import DryRunFirewall

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        not shutil.which("ipset") or not all(shutil.which(t) for t in IPT.values()),
        reason="the ipset and iptables-legacy commands are needed to inspect the kernel",
    ),
]
IPSET = {"backend": "ipset"}
SETS = ["knockd-fast-v4", "knockd-fast-v4-any", "knockd-fast-v6", "knockd-fast-v6-any"]
STATIC = {
    family: [
        f"-A {CHAIN} -m set --match-set knockd-fast-v{family} src,dst,dst -j ACCEPT",
        f"-A {CHAIN} -m set --match-set knockd-fast-v{family}-any src,dst -j ACCEPT",
    ]
    for family in (4, 6)
}


class SetProbe(Probe):
    """A Probe of the ipset backend, with the sets' contents as ``ipset list`` shows them."""

    def __call__(self, ops: list, **spec) -> list:
        return super().__call__(ops, **{**IPSET, **spec})

    def raw(self, ops: list, **spec) -> list[dict]:
        return super().raw(ops, **{**IPSET, **spec})

    def ipset(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = run_in(self.ns, ["ipset", *args], capture_output=True, text=True, timeout=30)
        assert not check or done.returncode == 0, done.stderr
        return done

    def sets(self) -> list[str]:
        return sorted(self.ipset("list", "-n").stdout.split())

    def members(self, name: str) -> list[str]:
        """``ENTRY timeout N comment "..."`` lines of a set."""
        out = self.ipset("list", name).stdout
        return out.split("Members:\n", 1)[1].strip().splitlines()


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """A private xtables lock file: nothing here waits for, or blocks, the host's iptables."""
    return dict(os.environ, XTABLES_LOCKFILE=str(tmp_path / "xtables.lock"))


@pytest.fixture
def sp(netns: str, env: dict[str, str]) -> SetProbe:
    return SetProbe(netns, env)


def soon(seconds: int, **kw) -> dict:
    """A grant expiring ``seconds`` from now (real time: the kernel's timeouts count)."""
    return grant(kw.pop("source", "192.0.2.2"), expires=int(time.time()) + seconds, **kw)


def timeout_of(line: str) -> int:
    return int(re.search(r" timeout (\d+)", line).group(1))


def test_setup_is_idempotent_and_teardown_leaves_nothing(sp: SetProbe) -> None:
    for family in (4, 6):
        sp.ipt(family, "-A", "INPUT", "-p", "tcp", "--dport", "2222", "-j", "DROP")
    pristine = {family: sp.ipt(family, "-S") for family in (4, 6)}
    sp([["setup"], ["setup"]], hooks=["INPUT", "FORWARD"])
    sp([["setup"]], hooks=["INPUT", "FORWARD"])  # and from a fresh process
    assert sp.sets() == SETS
    for family in (4, 6):
        assert sp.chain(family) == STATIC[family]
        for hook in ("INPUT", "FORWARD"):
            assert sp.rules(family, hook)[0] == f"-A {hook} -j {CHAIN}"
    header = sp.ipset("list", "-t", "knockd-fast-v6").stdout
    assert "Type: hash:ip,port,ip" in header and "family inet6" in header
    assert "maxelem 65536 timeout 0 comment" in header
    sp([["open", soon(60)], ["open", soon(60, source="2001:db8::2", dest="2001:db8::1")]])
    sp([["teardown"], ["teardown"]], hooks=["INPUT", "FORWARD"])
    assert {family: sp.ipt(family, "-S") for family in (4, 6)} == pristine
    assert sp.sets() == []


def test_maxelem_and_set_name_from_the_settings(sp: SetProbe) -> None:
    sp([["setup"]], set_name="kf_test", maxelem=1000, families=[4])
    assert sp.sets() == ["kf_test-v4", "kf_test-v4-any"]
    assert "maxelem 1000 " in sp.ipset("list", "-t", "kf_test-v4").stdout
    assert sp.ipt(6, "-S").count(CHAIN) == 0


def test_same_results_as_the_dry_run(sp: SetProbe) -> None:
    assert sp.raw(SCENARIO) == run_ops(DryRunFirewall(), SCENARIO)
    assert sp.sets() == []


def test_a_grant_is_never_shortened_nor_closed_by_another_user(sp: SetProbe) -> None:
    assert sp.raw(OWNERSHIP) == OWNERSHIP_RESULTS
    assert sp.members("knockd-fast-v4-any") == []


@pytest.mark.parametrize(
    ("source", "dest", "name"),
    [
        ("192.0.2.2", None, "knockd-fast-v4-any"),
        ("192.0.2.2", "192.0.2.1", "knockd-fast-v4"),
        ("2001:db8::2", "2001:db8::1", "knockd-fast-v6"),
    ],
)
def test_open_extend_close_in_the_kernel(sp: SetProbe, source, dest, name) -> None:
    first = soon(30, source=source, dest=dest)
    sp([["setup"], ["open", first]])
    (line,) = sp.members(name)
    entry = f"{source},tcp:22" + (f",{dest}" if dest else "")
    assert line.startswith(f"{entry} timeout ")
    assert abs(timeout_of(line) - (first["expires"] - time.time())) <= 2, line
    assert line.endswith(f'comment "knockd-fast user=alice expires={first["expires"]}"')
    # Extend: the timeout is refreshed and the comment (user and expiry) replaced, not lost.
    longer = {**first, "expires": first["expires"] + 500, "user": "carol"}
    sp([["grants"], ["open", longer]])
    (line,) = sp.members(name)
    assert abs(timeout_of(line) - (longer["expires"] - time.time())) <= 2, line
    assert line.endswith(f'comment "knockd-fast user=carol expires={longer["expires"]}"')
    results = sp([["grants"], ["close", key(longer), "alice"], ["close", key(longer), "carol"]])
    assert results == [sort_json([longer]), False, True]
    assert sp.members(name) == []


def test_read_back_by_a_new_process_and_reconcile(sp: SetProbe) -> None:
    users = ["zoë o'brien", "a%b", "!$&()*;:,@+=/\\`#~^[]{}|<>?\"' -"]
    grants = [
        soon(600, user=users[0]),
        soon(700, source="192.0.2.3", dest="192.0.2.1", user=users[1]),
        soon(800, source="2001:db8::7", proto="udp", port=51820, user=users[2]),
        grant("2001:db8::2", 22, dest="2001:db8::1", expires=NOW),  # no kernel timeout
    ]
    sp([["setup"], *[["open", g] for g in grants]])
    (listed,) = sp([["grants"]])  # a new process: nothing but the kernel to read from
    assert listed == sort_json(grants)
    # Entries that are no grant of ours, and one whose comment says it expired.
    sp.ipset("add", "knockd-fast-v4-any", "192.0.2.9,tcp:22", "comment", "hello")
    sp.ipset("add", "knockd-fast-v4", "192.0.2.10,udp:53,192.0.2.1")
    sp.ipset("add", "knockd-fast-v6-any", "2001:db8::9,tcp:22", "comment",
             "knockd-fast user=old expires=1000")  # fmt: skip
    result, after = sp([["reconcile", int(time.time())], ["grants"]])
    assert result["kept"] == sort_json(grants) == after
    assert result["removed"] == [grant_to_json_old()]
    assert sp.stderr.count("removed an entry") == 2, sp.stderr
    assert len(sp.members("knockd-fast-v4-any")) == 1
    assert len(sp.members("knockd-fast-v6-any")) == 1


def grant_to_json_old() -> dict:
    return grant("2001:db8::9", 22, expires=1000, user="old")


def test_the_kernel_expires_entries_and_expire_drops_them(sp: SetProbe) -> None:
    short, long = soon(2), soon(300, source="192.0.2.3")
    results = sp(
        [
            ["setup"],
            ["open", short],
            ["open", long],
            ["sleep", 3.2],
            ["sh", ["ipset", "list", "knockd-fast-v4-any"]],
            ["expire", int(time.time()) + 4],
            ["grants"],
        ]
    )
    listing, expired, listed = results[4:]
    assert "192.0.2.2," not in listing["out"] and "192.0.2.3,tcp:22" in listing["out"]
    assert expired == sort_json([short])
    assert listed == sort_json([long])


@pytest.mark.parametrize(
    "sabotage",
    [
        [[IPT[4], "-F", CHAIN], ["ipset", "destroy", "knockd-fast-v4-any"]],
        [[IPT[4], "-F"], [IPT[6], "-F"]],
        [[IPT[4], "-D", "INPUT", "-j", CHAIN]],
        [["ipset", "flush", "knockd-fast-v6"]],
    ],
    ids=["set-destroyed", "ruleset-flushed", "jump-deleted", "set-flushed"],
)
def test_repair(sp: SetProbe, sabotage: list) -> None:
    g4, g6 = soon(300), soon(300, source="2001:db8::2", dest="2001:db8::1")
    results = sp(
        [["setup"], ["open", g4], ["open", g6], ["repair"]]
        + [["sh", argv] for argv in sabotage]
        + [["repair"], ["repair"], ["grants"]]
    )
    assert results[3] is None  # all in place: nothing to do
    assert all(r["rc"] == 0 for r in results[4:-3]), results
    restored, again, listed = results[-3:]
    assert restored == sort_json([g4, g6]) == listed
    assert again is None
    assert sp.sets() == SETS
    for family in (4, 6):
        assert sp.chain(family) == STATIC[family]
        assert sp.rules(family, "INPUT")[0] == f"-A INPUT -j {CHAIN}"
    assert len(sp.members("knockd-fast-v4-any")) == 1 and len(sp.members("knockd-fast-v6")) == 1


def test_a_batch_is_undone_when_a_change_fails(sp: SetProbe) -> None:
    a, b = soon(300), soon(300, source="192.0.2.3")
    c = soon(300, source="192.0.2.4")
    before = sp([["setup"], ["open", a], ["grants"]])[2]
    # The set holds c behind the view's back: the batch's exclusive add of it fails.
    sp.ipset("add", "knockd-fast-v4-any", "192.0.2.4,tcp:22", "comment", "x")
    changes = [
        ["open", {**a, "expires": a["expires"] + 60}],
        ["open", b],
        ["close", a],
        ["open", c],
    ]
    results = sp.raw([["grants"], ["batch", changes], ["grants"]])
    assert "error" in results[1] and "holds 192.0.2.4 22/tcp already" in results[1]["error"]
    listed = results[2]["ok"]
    assert [g for g in listed if g["source"] != "192.0.2.4"] == before
    (line,) = [m for m in sp.members("knockd-fast-v4-any") if m.startswith("192.0.2.2,")]
    assert f'expires={a["expires"]}"' in line  # the extension was taken back
    assert not [m for m in sp.members("knockd-fast-v4-any") if m.startswith("192.0.2.3,")]


def _many(count: int, seconds: int = 600) -> list[dict]:
    """``count`` grants bound to 192.0.2.1, from 198.18.0.0/15, users and expiries varied."""
    now = int(time.time())
    return [
        grant(f"198.18.{n // 256}.{n % 256}", 22, dest="192.0.2.1", user=f"u{n % 7}",
              expires=now + seconds + n % 50)  # fmt: skip
        for n in range(count)
    ]


def _by_source(lines: list[str]) -> dict[str, str]:
    return {line.split(",", 1)[0]: line for line in lines}


def test_a_batch_of_1000_lands_with_comments_and_timeouts(sp: SetProbe) -> None:
    """1,000 opens in one batch (pipelined sends), then closes and extensions of them."""
    opens = _many(1000)
    closes = [["close", g] for g in opens[::2]]
    longer = [{**g, "expires": g["expires"] + 900, "user": "carol"} for g in opens[1::4]]
    results = sp.raw(
        [
            ["setup"],
            ["batch", [["open", g] for g in opens]],
            ["sh", ["ipset", "list", "knockd-fast-v4"]],
            ["batch", closes + [["open", g] for g in longer]],
            ["grants"],
        ]
    )
    assert results[1]["ok"] == opens
    members = _by_source(results[2]["ok"]["out"].split("Members:\n", 1)[1].strip().splitlines())
    assert len(members) == 1000
    for g in opens:
        line = members[g["source"]]
        assert line.startswith(f"{g['source']},tcp:22,192.0.2.1 timeout "), line
        assert abs(timeout_of(line) - (g["expires"] - time.time())) <= 3, line
        assert line.endswith(f'comment "knockd-fast user={g["user"]} expires={g["expires"]}"')
    assert results[3]["ok"] == [True] * len(closes) + longer
    kept = {g["source"]: g for g in opens[1::2]} | {g["source"]: g for g in longer}
    assert results[4]["ok"] == sort_json(list(kept.values()))
    members = _by_source(sp.members("knockd-fast-v4"))
    assert sorted(members) == sorted(kept)
    for g in longer:
        assert members[g["source"]].endswith(f'user=carol expires={g["expires"]}"')


def test_a_failing_message_mid_batch_is_reported_for_its_change(sp: SetProbe) -> None:
    """The set holds 600 (maxelem): of 1,000 adds sent together the 601st fails, and so do
    the ones after it; a close after them in the same send succeeds in the kernel. The
    error names the 601st grant and everything is put back: the close too."""
    held = soon(300, source="192.0.2.2", dest="192.0.2.1")
    opens = _many(1000)
    before = sp([["setup"], ["open", held], ["grants"]], maxelem=600, families=[4])[2]
    changes = [["open", g] for g in opens] + [["close", held]]
    results = sp.raw([["grants"], ["batch", changes], ["grants"]], maxelem=600, families=[4])
    error = results[1]["error"]
    change = "add grant 198.18.2.87 -> 192.0.2.1 22/tcp"  # #599: the set holds 1 + 599
    assert error.startswith(f"ipset: apply a batch of 1001 changes: {change}: "), error
    assert "Hash is full" in error, error
    assert results[2]["ok"] == before
    (line,) = sp.members("knockd-fast-v4")
    assert line.endswith(f'comment "knockd-fast user=alice expires={held["expires"]}"'), line


def test_an_entry_behind_the_views_back_mid_batch_undoes_the_ones_after_it(sp: SetProbe) -> None:
    opens = _many(1000)
    sp([["setup"]], families=[4])
    sp.ipset("add", "knockd-fast-v4", "198.18.1.244,tcp:22,192.0.2.1", "comment", "x")  # #500
    results = sp.raw([["batch", [["open", g] for g in opens]], ["grants"]], families=[4])
    assert "holds 198.18.1.244 -> 192.0.2.1 22/tcp already" in results[0]["error"], results[0]
    assert results[1]["ok"] == []
    assert sp.members("knockd-fast-v4") == [
        '198.18.1.244,tcp:22,192.0.2.1 timeout 0 comment "x"'
    ]


# -- batches against the dry run: random change sequences, both backends ----------------

SOURCES = ["192.0.2.2", "192.0.2.3", "2001:db8::2"]
change_strategy = st.tuples(
    st.sampled_from(["open", "close"]),
    st.sampled_from(SOURCES),
    st.sampled_from([22, 443]),
    st.sampled_from(["alice", "bob"]),
    st.integers(0, 3),
)


def _changes(raw: list) -> list:
    out = []
    base = int(time.time()) + 600
    for action, source, port, user, step in raw:
        dest = "2001:db8::1" if ":" in source else None
        out.append([action, grant(source, port, dest=dest, user=user, expires=base + 100 * step)])
    return out


def _one_by_one(change: list) -> list:
    action, g = change
    return ["open", g] if action == "open" else ["close", key(g), g["user"]]


@pytest.mark.parametrize("backend", ["iptables", "ipset"])
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(first=st.lists(change_strategy, max_size=6), batch=st.lists(change_strategy, max_size=12))
def test_apply_batch_equals_one_by_one(netns: str, env: dict, backend: str, first, batch) -> None:
    probe = Probe(netns, env)
    before, changes = _changes(first), _changes(batch)
    ops = [["teardown"], ["setup"], *[_one_by_one(c) for c in before]]
    n = len(ops)
    results = probe(
        [*ops, ["commits"], ["batch", changes], ["commits"], ["grants"]], backend=backend
    )
    dry = DryRunFirewall()
    expected = run_ops(dry, [["setup"], *[_one_by_one(c) for c in before + changes], ["grants"]])
    expected = [r["ok"] for r in expected]
    committed_before, outcomes, committed_after, listed = results[n:]
    assert outcomes == expected[len(before) + 1 : -1]
    assert listed == expected[-1]
    if backend == "iptables":  # one commit per family the batch touches at most
        families = {4 if "." in c[1]["source"] else 6 for c in changes}
        assert committed_after - committed_before <= len(families)


def test_iptables_batch_is_one_commit_per_family(netns: str, env: dict) -> None:
    probe = Probe(netns, env)
    opens = [["open", grant(f"192.0.2.{i}", 22, expires=NOW + i)] for i in range(2, 42)]
    opens += [["open", grant(f"2001:db8::{i:x}", 22, expires=NOW)] for i in range(2, 12)]
    closes = [["close", grant(f"192.0.2.{i}", 22)] for i in range(2, 12)]
    results = probe([["setup"], ["commits"], ["batch", opens + closes], ["commits"], ["grants"]])
    assert results[3] - results[1] == 2
    assert len(results[4]) == 40
    assert len(probe.chain(4)) == 30 and len(probe.chain(6)) == 10


# -- the real daemon -------------------------------------------------------------------
# What only ipset needs here; the scenarios every backend shares (knock, connect, close, IPv4
# and IPv6, expiry, extend, two destinations, kill -9) are in tests/test_e2e_backends.py.


@pytest.fixture
def ipset_daemon(tmp_path):
    with contextlib.ExitStack() as stack:

        def make(**options):
            try:
                return stack.enter_context(doorman(tmp_path / "e2e", backend="ipset", **options))
            except NetnsUnavailable as error:
                pytest.skip(f"network namespaces unavailable: {error}")

        yield make


@pytest.mark.extension
def test_daemon_repairs_a_flushed_chain(ipset_daemon) -> None:
    h = ipset_daemon()
    h.knock("open", SERVER_V4, "2222/tcp")
    h.wait_log(r"^firewall: opened 2222/tcp ", timeout=10)
    assert h.can_connect(SERVER_V4, 2222)
    mark = h.mark()
    h.iptables("-F", CHAIN, family=4)
    h.wait_log(r"re-created it and re-added 1 live grants", timeout=5, since=mark)
    assert h.can_connect(SERVER_V4, 2222)
    h.stop()
