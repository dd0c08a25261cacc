"""Firewall backends: the iptables backend in fresh network namespaces, the dry run in memory.

The test process never enters a namespace: ``tests/firewall_probe.py`` runs the backend
inside one (``ip netns exec``), and results are checked with ``iptables-legacy -S`` /
``ip6tables-legacy -S`` there. The xtables lock file is a private one per test
(``$XTABLES_LOCKFILE``), so nothing here waits for, or blocks, the host's own iptables.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from ipaddress import ip_address
from pathlib import Path

import pytest
from firewall_probe import grant_to_json, run_ops
from hypothesis import given, settings
from hypothesis import strategies as st
from netns import CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, run_in, tcp_listener

from knock_client.protocol import Action
from knockd_fast.firewall import (
    DryRunFirewall,
    Firewall,
    FirewallError,
    Grant,
    backend_class,
    format_comment,
    format_key,
    parse_comment,
)
from knockd_fast.firewall.base import GrantChange, sort_key

PROBE = Path(__file__).with_name("firewall_probe.py")
CHAIN = "KNOCKD-FAST"
NOW = 1_800_000_000
LATER = NOW + 3600
IPT = {4: "iptables-legacy", 6: "ip6tables-legacy"}
BITS = {4: 32, 6: 128}

netns_test = pytest.mark.netns
needs_legacy = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in IPT.values()),
    reason="iptables-legacy / ip6tables-legacy not installed",
)


def grant(source: str, port: int = 22, *, proto: str = "tcp", dest: str | None = None, **kw):
    """A grant as JSON, the form the probe takes."""
    return {
        "source": source,
        "proto": proto,
        "port": port,
        "destination": dest,
        "expires": kw.get("expires", LATER),
        "user": kw.get("user", "alice"),
    }


def key(data: dict) -> dict:
    return {name: data[name] for name in ("source", "proto", "port", "destination")}


def rule_line(g: dict, timed: bool = True) -> str:
    """The ``-S`` line of a grant, written out by hand (the spec of the rule format): the
    expiry in the comment and, so that the kernel stops matching at expiry whatever the
    daemon does, in a time match (``timed=False``: a rule of an earlier version)."""
    family = ip_address(g["source"]).version
    dest = f" -d {g['destination']}/{BITS[family]}" if g["destination"] else ""
    until = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(g["expires"] - 1))  # last second
    stop = f" -m time --datestop {until}" if timed else ""
    return (
        f"-A {CHAIN} -s {g['source']}/{BITS[family]}{dest} -p {g['proto']} -m {g['proto']} "
        f'--dport {g["port"]} -m comment --comment "knockd-fast user={g["user"]} '
        f'expires={g["expires"]}"{stop} -j ACCEPT'
    )


def family_of(g: dict) -> int:
    return ip_address(g["source"]).version


def sort_json(grants: list[dict]) -> list[dict]:
    """Grants (JSON) in the order the backends list them."""
    return [grant_to_json(g) for g in sorted(map(to_grant, grants), key=sort_key)]


def to_grant(g: dict) -> Grant:
    dest = g["destination"]
    return Grant(
        ip_address(g["source"]),
        g["proto"],
        g["port"],
        None if dest is None else ip_address(dest),
        g["expires"],
        g["user"],
    )


def split(line: str) -> list[str]:
    return shlex.split(line)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, XTABLES_LOCKFILE=str(tmp_path / "xtables.lock"))


class Probe:
    """Runs ops on one IptablesFirewall object in a namespace; remembers stderr."""

    def __init__(self, ns: str, env: dict[str, str]) -> None:
        self.ns, self.env, self.stderr = ns, env, ""

    def raw(self, ops: list, **spec) -> list[dict]:
        done = run_in(
            self.ns,
            [sys.executable, str(PROBE), "run"],
            input=json.dumps({"ops": ops, **spec}),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        self.stderr = done.stderr
        return json.loads(done.stdout)

    def __call__(self, ops: list, **spec) -> list:
        """The results of the ops, which must all succeed."""
        results = self.raw(ops, **spec)
        errors = [r["error"] for r in results if "error" in r]
        assert not errors, errors
        return [r["ok"] for r in results]

    def ipt(self, family: int, *args: str) -> str:
        done = run_in(
            self.ns, [IPT[family], *args], capture_output=True, text=True, env=self.env, timeout=30
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def rules(self, family: int, chain: str | None = None) -> list[str]:
        lines = self.ipt(family, "-S", *([chain] if chain else [])).splitlines()
        return [line for line in lines if line.startswith("-A ")]

    def chain(self, family: int) -> list[str]:
        return [line for line in self.rules(family) if line.startswith(f"-A {CHAIN} ")]


def sh_rules(family: int) -> list:
    """An op that lists our chain from inside the probe (state between two ops)."""
    return ["sh", [IPT[family], "-S", CHAIN]]


def chain_of(sh_result: dict) -> list[str]:
    return [line for line in sh_result["out"].splitlines() if line.startswith("-A ")]


@pytest.fixture
def probe(netns: str, env: dict[str, str]) -> Probe:
    return Probe(netns, env)


# -- the iptables backend, one fresh namespace per test ----------------------------------


@netns_test
@needs_legacy
def test_setup_is_idempotent_with_the_jump_first(probe: Probe) -> None:
    for family in (4, 6):
        probe.ipt(family, "-A", "INPUT", "-p", "tcp", "--dport", "2222", "-j", "DROP")
        probe.ipt(family, "-N", CHAIN)
        probe.ipt(family, "-A", "INPUT", "-j", CHAIN)  # a stale jump below the drop
    probe([["setup"], ["setup"]], hooks=["INPUT", "FORWARD"])
    probe([["setup"]], hooks=["INPUT", "FORWARD"])  # and again from a fresh process
    for family in (4, 6):
        listing = probe.ipt(family, "-S").splitlines()
        assert listing.count(f"-N {CHAIN}") == 1
        for hook in ("INPUT", "FORWARD"):
            rules = [line for line in listing if line.startswith(f"-A {hook} ")]
            assert rules[0] == f"-A {hook} -j {CHAIN}"
            assert rules.count(f"-A {hook} -j {CHAIN}") == 1
        assert "-A INPUT -p tcp -m tcp --dport 2222 -j DROP" in listing
        assert not [line for line in listing if line.startswith("-A OUTPUT")]


CASES = [
    ("192.0.2.2", None),
    ("192.0.2.2", "192.0.2.1"),
    ("2001:db8::2", None),
    ("2001:db8::2", "2001:db8::1"),
]


@netns_test
@needs_legacy
@pytest.mark.parametrize(("source", "dest"), CASES, ids=["v4", "v4-dest", "v6", "v6-dest"])
def test_open_extend_close(probe: Probe, source: str, dest: str | None) -> None:
    family = ip_address(source).version
    first = grant(source, 22, dest=dest, expires=NOW + 10)
    other = grant(source, 53, proto="udp", dest=dest, user="bob")
    extended = {**first, "expires": NOW + 20, "user": "carol"}
    _, _, after_open, _, _, after_extend, listed, closed, again, after_close = probe(
        [
            ["setup"],
            ["open", first],
            sh_rules(family),
            ["open", other],
            ["open", extended],
            sh_rules(family),
            ["grants"],
            ["close", key(first)],
            ["close", key(first)],
            sh_rules(family),
        ]
    )
    assert chain_of(after_open) == [rule_line(first)]
    assert chain_of(after_extend) == [rule_line(extended), rule_line(other)]  # in place
    assert listed == sort_json([extended, other])
    assert (closed, again) == (True, False)
    assert chain_of(after_close) == [rule_line(other)]
    assert probe.chain({4: 6, 6: 4}[family]) == []  # the other family is untouched


@netns_test
@needs_legacy
def test_grants_round_trip_through_the_kernel(probe: Probe) -> None:
    grants = [
        grant("192.0.2.7", 22, user="zoë o'brien"),
        grant("192.0.2.2", 443, dest="192.0.2.1", user="a%b"),
        grant("2001:db8::7", 51820, proto="udp"),
        grant("2001:db8::2", 22, dest="2001:db8::1", expires=NOW),
        grant("192.0.2.8", 22, user="!$&()*;:,@+=/\\`#~^[]{}|<>?\"' -"),
    ]
    probe([["setup"], *[["open", g] for g in grants]])
    (listed,) = probe([["grants"]])  # a new process: nothing but the kernel to read from
    assert listed == sort_json(grants)
    comment = probe.chain(4)[0].split('--comment "')[1].split('"')[0]
    assert comment == f"knockd-fast user=zo%C3%AB%20o%27brien expires={LATER}"


@netns_test
@needs_legacy
def test_reconcile_keeps_live_and_removes_expired_and_unparsable(probe: Probe) -> None:
    live4 = grant("192.0.2.2", 22, expires=NOW + 1)
    live6 = grant("2001:db8::2", 22, dest="2001:db8::1", expires=NOW + 100)
    untimed = grant("192.0.2.5", 22, expires=NOW + 7)  # made before rules had a time match
    dead = [
        grant("192.0.2.3", 22, expires=NOW),  # expires == now: expired
        grant("192.0.2.4", 80, proto="udp", expires=1),
        grant("2001:db8::3", 22, expires=NOW - 1),
        {**live4, "expires": NOW - 5},  # an expired duplicate of a live key
        {**live6, "expires": NOW + 50},  # a live duplicate with the earlier expiry
    ]
    ours = '-m comment --comment "knockd-fast user=x expires=1900000000"'
    junk4 = [  # rules in our chain that are no grant of ours
        "-s 192.0.2.9/32 -p tcp -m tcp --dport 22 -j ACCEPT",
        '-s 192.0.2.10/32 -p tcp -m tcp --dport 22 -m comment --comment "hello" -j ACCEPT',
        f"-s 192.0.2.0/24 -p tcp -m tcp --dport 22 {ours} -j ACCEPT",
        f"-s 192.0.2.11/32 -p tcp -m multiport --dports 22,23 {ours} -j ACCEPT",
        f"-s 192.0.2.12/32 -p tcp -m tcp --dport 22 {ours} -j DROP",
        f"! -s 192.0.2.13/32 -p tcp -m tcp --dport 22 {ours} -j ACCEPT",
        # The comment's expiry and the kernel's disagree: edited by hand.
        f"-s 192.0.2.14/32 -p tcp -m tcp --dport 22 {ours} -m time "
        "--datestop 2031-01-01T00:00:00 -j ACCEPT",
    ]
    junk6 = [
        f"-s 2001:db8::9/128 -i lo -p udp -m udp --dport 53 {ours} -j ACCEPT",
        f"-s 2001:db8::9/128 -p tcp -m tcp --dport 1:1024 {ours} -j ACCEPT",
    ]
    probe([["setup"]])
    for g in [live4, live6, *dead]:
        probe.ipt(family_of(g), *split(rule_line(g)))  # as if left by an earlier run
    probe.ipt(4, *split(rule_line(untimed, timed=False)))
    for family, lines in ((4, junk4), (6, junk6)):
        for line in lines:
            probe.ipt(family, "-A", CHAIN, *split(line))
    result, listed = probe([["reconcile", NOW], ["grants"]])
    assert result["kept"] == sort_json([live4, live6, untimed]) == listed
    assert result["removed"] == sort_json(dead)
    assert probe.chain(4) == [rule_line(live4), rule_line(untimed, timed=False)]
    assert probe.chain(6) == [rule_line(live6)]
    warnings = [line for line in probe.stderr.splitlines() if "not a grant" in line]
    assert len(warnings) == len(junk4) + len(junk6), probe.stderr
    assert "multiport" in probe.stderr and "target DROP" in probe.stderr
    assert "disagree on the expiry (1924992001 vs 1900000000)" in probe.stderr


@netns_test
@needs_legacy
def test_expire_removes_what_is_due(probe: Probe) -> None:
    a = grant("192.0.2.2", 22, expires=NOW + 100)
    b = grant("192.0.2.3", 22, expires=NOW + 200)
    c = grant("2001:db8::2", 443, expires=NOW + 150)
    results = probe(
        [
            ["setup"],
            *[["open", g] for g in (a, b, c)],
            ["expire", NOW + 99],
            ["expire", NOW + 150],
            ["grants"],
            ["expire", NOW + 150],
            ["expire", NOW + 10**6],
        ]
    )
    none, first, listed, again, last = results[4:]
    assert none == [] and again == []
    assert first == sort_json([a, c])
    assert listed == sort_json([b])
    assert last == sort_json([b])
    assert probe.chain(4) == [] and probe.chain(6) == []


@netns_test
@needs_legacy
def test_rule_deleted_by_hand(probe: Probe) -> None:
    g4, g6 = grant("192.0.2.2", 22), grant("2001:db8::2", 22, dest="2001:db8::1")
    ops = [["setup"], ["open", g4], ["open", g6]]
    ops += [["sh", [IPT[family_of(g)], "-D", CHAIN, *split(rule_line(g))[2:]]] for g in (g4, g6)]
    ops += [["close", key(g4)], ["close", key(g6)], ["grants"], ["expire", LATER + 1]]
    *_, removed4, removed6, closed4, closed6, listed, expired = probe(ops)
    assert removed4["rc"] == removed6["rc"] == 0
    assert (closed4, closed6, listed, expired) == (False, False, [], [])
    # and the same grants open again without complaint
    probe([["open", g4], ["open", g6]])
    assert probe.chain(4) == [rule_line(g4)] and probe.chain(6) == [rule_line(g6)]


@netns_test
@needs_legacy
def test_chain_flushed_by_someone_else(probe: Probe) -> None:
    g4, g6 = grant("192.0.2.2", 22), grant("2001:db8::2", 22)
    ops = [["setup"], ["open", g4], ["open", g6], ["sh", [IPT[4], "-F"]], ["sh", [IPT[6], "-F"]]]
    *_, listed, _ = probe([*ops, ["grants"], ["setup"]])
    assert listed == []
    for family in (4, 6):
        assert probe.rules(family) == [f"-A INPUT -j {CHAIN}"]
    probe([["open", g4]])
    assert probe.chain(4) == [rule_line(g4)]


@netns_test
@needs_legacy
def test_repair_restores_a_flushed_chain_but_never_a_grant_its_user_closed(probe: Probe) -> None:
    """Emptied by hand, the chain gets its live grants back at the next sweep; a grant
    whose rule was gone and which its user then closed stays closed."""
    g4, g6 = grant("192.0.2.2", 22), grant("2001:db8::2", 22)
    flush = [["sh", [IPT[4], "-F", CHAIN]], ["sh", [IPT[6], "-F", CHAIN]]]
    results = probe(
        [["setup"], ["open", g4], ["open", g6], ["repair"], *flush, ["repair"], ["repair"]]
        + [*flush, ["close", key(g4)], ["close", key(g6)], ["repair"], ["grants"]]
    )
    assert results[3] is None  # all in place
    assert [g["source"] for g in results[6]] == ["192.0.2.2", "2001:db8::2"]  # re-added
    assert results[7] is None
    assert results[10:12] == [False, False]  # nothing of theirs in the kernel to remove
    assert results[12] is None and results[13] == []  # and nothing comes back


@netns_test
@needs_legacy
def test_teardown_leaves_nothing(probe: Probe) -> None:
    for family in (4, 6):
        probe.ipt(family, "-A", "INPUT", "-p", "tcp", "--dport", "2222", "-j", "DROP")
    pristine = {family: probe.ipt(family, "-S") for family in (4, 6)}
    probe(
        [["setup"], ["open", grant("192.0.2.2")], ["open", grant("2001:db8::2")], ["teardown"]],
        hooks=["INPUT", "FORWARD"],
    )
    assert {family: probe.ipt(family, "-S") for family in (4, 6)} == pristine
    assert probe([["teardown"], ["grants"]]) == [None, []]  # idempotent, and nothing left


@netns_test
@needs_legacy
def test_forward_hook(probe: Probe) -> None:
    g = grant("192.0.2.2", 22, dest="198.51.100.10")
    probe([["setup"], ["open", g]], hooks=["FORWARD"])
    for family in (4, 6):
        assert probe.rules(family, "FORWARD") == [f"-A FORWARD -j {CHAIN}"]
        assert probe.rules(family, "INPUT") == []
    assert probe.chain(4) == [rule_line(g)]
    probe([["setup"]], hooks=["INPUT"])  # the config moved the hook: the old jump goes
    for family in (4, 6):
        assert probe.rules(family, "FORWARD") == []
        assert probe.rules(family, "INPUT") == [f"-A INPUT -j {CHAIN}"]


@netns_test
@needs_legacy
def test_lock_contention_is_a_firewall_error(probe: Probe, env: dict[str, str]) -> None:
    probe([["setup"]])
    with open(env["XTABLES_LOCKFILE"], "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        results = probe.raw([["open", grant("192.0.2.2")], ["grants"]], lock_wait=0.3)
        fcntl.flock(holder, fcntl.LOCK_UN)
    busy = "iptables: add grant 192.0.2.2 22/tcp: xtables lock held by another process"
    assert results == [{"error": f"{busy} (waited 0.3 s)"}, {"ok": []}]  # reading takes no lock
    probe([["open", grant("192.0.2.2")]], lock_wait=0.3)
    assert probe.chain(4) == [rule_line(grant("192.0.2.2"))]


BUSY_SCRIPT = """
import json, sys
from knockd_fast.firewall import FirewallBusy, FirewallError, Grant, IptablesFirewall
fw = IptablesFirewall(lock_wait=5.0)
out = {"default_wait": fw.lock_wait}
fw.lock_wait = 0.2
out["wait"] = fw.lock_wait
try:
    fw.open(Grant("192.0.2.2", "tcp", 22, None, 1800003600, "alice"))
except FirewallError as error:
    out["type"], out["error"] = type(error).__name__, str(error)
print(json.dumps(out))
"""


@netns_test
@needs_legacy
def test_lock_contention_is_firewall_busy_and_lock_wait_can_be_changed(
    probe: Probe, env: dict[str, str]
) -> None:
    # The daemon shortens the wait once started and tells "busy" from other failures
    # (it repairs the chain before retrying those, never for a busy lock).
    def attempt() -> dict:
        done = run_in(
            probe.ns,
            [sys.executable, "-c", BUSY_SCRIPT],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    not_set_up = attempt()  # the lock is free: the failure is the missing chain
    assert not_set_up["type"] == "FirewallError", not_set_up
    assert "chain KNOCKD-FAST is missing" in not_set_up["error"], not_set_up
    with open(env["XTABLES_LOCKFILE"], "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        busy = attempt()
    assert busy == {
        "default_wait": 5.0,
        "wait": 0.2,
        "type": "FirewallBusy",
        "error": "iptables: add grant 192.0.2.2 22/tcp: xtables lock held by another process "
        "(waited 0.2 s)",
    }
    assert probe.ipt(4, "-S").count(CHAIN) == 0  # nothing was touched


@netns_test
@needs_legacy
def test_errors_before_setup_and_disabled_family(probe: Probe) -> None:
    results = probe.raw(
        [
            ["open", grant("192.0.2.2")],
            ["close", key(grant("192.0.2.2"))],
            ["grants"],
            ["reconcile", NOW],
            ["expire", NOW],
        ]
    )
    missing = (
        f"iptables: add grant 192.0.2.2 22/tcp: chain {CHAIN} is missing from the IPv4 filter "
        "table (setup() not called, or removed by hand)"
    )
    assert results == [
        {"error": missing},
        {"ok": False},
        {"ok": []},
        {"ok": {"kept": [], "removed": []}},
        {"ok": []},
    ]
    v6 = grant("2001:db8::2", dest="2001:db8::1")
    results = probe.raw([["setup"], ["open", v6]], families=[4])
    assert results[1] == {
        "error": "iptables: add grant 2001:db8::2 -> 2001:db8::1 22/tcp: IPv6 is not enabled "
        "(families 4)"
    }
    assert probe.ipt(6, "-S").count(CHAIN) == 0  # IPv6 left alone entirely


@netns_test
@needs_legacy
def test_a_change_made_during_our_commit_is_not_lost(probe: Probe, tmp_path: Path) -> None:
    drop = ["-A", "INPUT", "-s", "203.0.113.9", "-j", "DROP"]
    g = grant("192.0.2.2")
    # iptables-legacy honours the xtables lock we hold: it cannot get in between
    _, polite = probe([["setup"], ["race", [IPT[4], "-w", "1", *drop], ["open", g]]])
    assert polite["rc"] == 4 and "xtables lock" in polite["err"], polite
    # a tool that ignores the lock: the kernel refuses our commit (EAGAIN), we redo it
    rude = ["env", f"XTABLES_LOCKFILE={tmp_path / 'other.lock'}", IPT[4], *drop]
    (raced,) = probe([["race", rude, ["open", grant("192.0.2.3")]]])
    assert raced == {"inner": {"ok": grant("192.0.2.3")}, "rc": 0, "err": ""}
    assert "-A INPUT -s 203.0.113.9/32 -j DROP" in probe.rules(4)
    assert probe.chain(4) == [rule_line(g), rule_line(grant("192.0.2.3"))]


SCENARIO = [
    ["setup"],
    ["open", grant("192.0.2.2", 22, expires=NOW + 10)],
    ["open", grant("192.0.2.2", 22, dest="192.0.2.1", expires=NOW + 30)],
    ["open", grant("192.0.2.3", 53, proto="udp", expires=NOW + 20, user="bob")],
    ["open", grant("2001:db8::2", 22, expires=NOW + 5)],
    ["open", grant("2001:db8::2", 22, expires=NOW + 40, user="carol")],
    ["close", key(grant("192.0.2.3", 53, proto="udp"))],
    ["close", key(grant("192.0.2.3", 54, proto="udp"))],
    ["grants"],
    ["expire", NOW + 10],
    ["open", grant("2001:db8::3", 443, dest="2001:db8::1", expires=NOW + 60)],
    ["reconcile", NOW + 35],
    ["grants"],
    ["teardown"],
    ["grants"],
]


@netns_test
@needs_legacy
def test_same_results_as_the_dry_run(probe: Probe) -> None:
    assert probe.raw(SCENARIO) == run_ops(DryRunFirewall(), SCENARIO)


# A grant belongs to whoever holds it: another user's knock neither closes nor shortens it.
ALICE = grant("192.0.2.2", 22, user="alice", expires=NOW + 300)
BOB_SHORTER = grant("192.0.2.2", 22, user="bob", expires=NOW + 60)
BOB_LONGER = grant("192.0.2.2", 22, user="bob", expires=NOW + 900)
OWNERSHIP = [
    ["setup"],
    ["open", ALICE],
    ["open", BOB_SHORTER],  # kept as it was: alice's, until NOW + 300
    ["open", {**ALICE, "expires": NOW + 100}],  # nor does its own user shorten it
    ["close", key(ALICE), "bob"],  # not bob's to close
    ["grants"],
    ["open", BOB_LONGER],  # longer: now bob's, until NOW + 900
    ["close", key(ALICE), "alice"],
    ["close", key(ALICE), "bob"],
    ["grants"],
]
OWNERSHIP_RESULTS = [
    {"ok": None},
    {"ok": ALICE},
    {"ok": ALICE},
    {"ok": ALICE},
    {"ok": False},
    {"ok": [ALICE]},
    {"ok": BOB_LONGER},
    {"ok": False},
    {"ok": True},
    {"ok": []},
]


def test_a_grant_is_never_shortened_nor_closed_by_another_user_dry_run() -> None:
    assert run_ops(DryRunFirewall(), OWNERSHIP) == OWNERSHIP_RESULTS


@netns_test
@needs_legacy
def test_a_grant_is_never_shortened_nor_closed_by_another_user_iptables(probe: Probe) -> None:
    assert probe.raw(OWNERSHIP) == OWNERSHIP_RESULTS
    assert probe.chain(4) == []


# -- reachability: a real listener behind a real drop rule -------------------------------

@netns_test
@needs_legacy
@pytest.mark.parametrize(
    ("family", "client", "server", "dest"),
    [(4, CLIENT_V4, SERVER_V4, None), (6, CLIENT_V6, SERVER_V6, SERVER_V6)],
    ids=["v4", "v6-dest"],
)
def test_reachability(hosts, env, family: int, client: str, server: str, dest) -> None:
    server_ns, client_ns, _ = hosts
    probe = Probe(server_ns, env)
    probe.ipt(family, "-A", "INPUT", "-p", "tcp", "--dport", "2222", "-j", "DROP")
    probe([["setup"]])  # the jump goes above the drop
    assert probe.rules(family, "INPUT")[0] == f"-A INPUT -j {CHAIN}"
    with tcp_listener(server_ns, client_ns, 2222) as connects:
        assert not connects(server)
        g = grant(client, 2222, dest=dest)
        probe([["open", g]])
        assert connects(server)
        assert probe([["close", key(g)]]) == [True]
        assert not connects(server)


# -- the dry run and the grant, no namespace --------------------------------------------


def test_dry_run_open_extend_close_expire() -> None:
    fw = DryRunFirewall(hooks=("INPUT", "FORWARD"))
    assert isinstance(fw, Firewall)
    fw.setup()
    fw.setup()
    a = to_grant(grant("192.0.2.2", 22, expires=NOW + 10))
    b = to_grant(grant("2001:db8::2", 22, dest="2001:db8::1", expires=NOW + 20))
    fw.open(a)
    fw.open(b)
    fw.open(Grant(a.source, "tcp", 22, None, NOW + 30, "carol"))
    assert fw.grants() == [Grant(a.source, "tcp", 22, None, NOW + 30, "carol"), b]
    assert fw.expire(NOW + 20) == [b]
    assert fw.close(a.key) is True and fw.close(a) is False
    assert fw.grants() == [] and fw.expire(NOW + 10**6) == []
    assert list(fw.actions) == [
        "create chain KNOCKD-FAST and jump to it from INPUT, FORWARD",
        f"add grant 192.0.2.2 22/tcp user=alice expires={NOW + 10}",
        f"add grant 2001:db8::2 -> 2001:db8::1 22/tcp user=alice expires={NOW + 20}",
        f"extend grant 192.0.2.2 22/tcp user=carol expires={NOW + 30}",
        f"remove expired grant 2001:db8::2 -> 2001:db8::1 22/tcp user=alice expires={NOW + 20}",
        f"remove grant 192.0.2.2 22/tcp user=carol expires={NOW + 30}",
    ]


def test_dry_run_reconcile_and_teardown(caplog: pytest.LogCaptureFixture) -> None:
    fw = DryRunFirewall(history=3)
    live = to_grant(grant("192.0.2.2", 22, expires=NOW + 1))
    gone = to_grant(grant("192.0.2.3", 22, expires=NOW))
    fw.open(live)
    fw.open(gone)
    with caplog.at_level("INFO", logger="knockd_fast.firewall"):
        assert fw.reconcile(NOW) == ([live], [gone])
    assert "dry-run: would remove expired grant 192.0.2.3 22/tcp" in caplog.text
    fw.teardown()
    assert fw.grants() == [] and len(fw.actions) == 3


def test_dry_run_disabled_family() -> None:
    fw = DryRunFirewall(families=(4,))
    with pytest.raises(FirewallError, match=r"^dry-run: add grant 2001:db8::2 22/tcp: IPv6 is not"):
        fw.open(to_grant(grant("2001:db8::2")))
    assert fw.close(to_grant(grant("2001:db8::2")).key) is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chain": "INPUT"}, "built-in"),
        ({"chain": "a" * 29}, "1..28"),
        ({"chain": "has space"}, "1..28"),
        ({"hooks": ("OUTPUT",)}, "INPUT, FORWARD"),
        ({"hooks": ()}, "INPUT, FORWARD"),
        ({"families": (4, 4)}, "4, 6"),
    ],
)
def test_backend_arguments_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DryRunFirewall(**kwargs)
    with pytest.raises(ValueError, match="unknown firewall backend 'pf'"):
        backend_class("pf")


A = ip_address("192.0.2.2")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((A, "icmp", 22, None, 1, "u"), "protocol"),
        ((A, "tcp", 0, None, 1, "u"), "port"),
        ((A, "tcp", 65536, None, 1, "u"), "port"),
        ((A, "tcp", True, None, 1, "u"), "port"),
        ((A, "tcp", 22, ip_address("2001:db8::1"), 1, "u"), "families"),
        ((A, "tcp", 22, None, -1, "u"), "expiry"),
        ((A, "tcp", 22, None, 1.5, "u"), "expiry"),
        ((A, "tcp", 22, None, 1, "a\nb"), "printable"),
        ((A, "tcp", 22, None, 1, "x" * 240), "too long"),
        (("not an address", "tcp", 22, None, 1, "u"), "does not appear"),
        ((22, "tcp", 22, None, 1, "u"), "not an IP address"),
    ],
)
def test_grant_is_validated(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Grant(*args)


def test_grant_takes_numpy_integers_as_plain_ints() -> None:
    np = pytest.importorskip("numpy")
    g = Grant(A, "tcp", np.uint16(22), None, np.int64(NOW), "u")
    assert type(g.port) is int and type(g.expires) is int
    assert g == Grant(A, "tcp", 22, None, NOW, "u")


def test_grant_key_and_text() -> None:
    g = Grant("2001:db8::2", "udp", 53, "2001:db8::1", 7, "bob")  # strings are converted
    assert g.key == (ip_address("2001:db8::2"), "udp", 53, ip_address("2001:db8::1"))
    assert g == Grant(ip_address("2001:db8::2"), "udp", 53, ip_address("2001:db8::1"), 7, "bob")
    assert format_key(g.key) == "2001:db8::2 -> 2001:db8::1 53/udp"
    assert str(g) == "2001:db8::2 -> 2001:db8::1 53/udp user=bob expires=7"
    assert g.family == 6 and g.expired(7) and not g.expired(6)


@pytest.mark.parametrize("user", ["alice", "zoë o'brien", "a%20b", 'q"uote\\', "", "日本"])
def test_comment_round_trip(user: str) -> None:
    g = Grant(A, "tcp", 22, None, 1_700_000_000, user)
    text = format_comment(g)
    assert " " not in text.split("user=", 1)[1].split(" expires=")[0]
    assert '"' not in text and "\\" not in text
    assert parse_comment(text) == (user, 1_700_000_000)


@pytest.mark.parametrize(
    "text",
    [
        "hello",
        "knockd-fast user=a expires=",
        "knockd-fast user=a expires=01",
        "knockd-fast user=a expires=1 extra",
        "knockd-fast user=%ff expires=1",
        "knockd-fast user=%0a expires=1",
        "knockd-fast user=a b expires=1",
    ],
)
def test_foreign_comments_are_not_parsed(text: str) -> None:
    assert parse_comment(text) is None


def test_dry_run_does_not_import_iptc() -> None:
    code = "import sys, knockd_fast.firewall as f; f.DryRunFirewall(); print('iptc' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# --- the dry run's own bookkeeping: its expiry heap and its batch journal ------------------

_DRY_SOURCES = [ip_address("192.0.2.10"), ip_address("192.0.2.11"), ip_address("2001:db8::10")]
_DRY_DESTINATIONS = [None, ip_address("198.51.100.1"), ip_address("2001:db8::1")]


def _dry_grant(source: int, destination: int, expires: int, user: str) -> Grant:
    src = _DRY_SOURCES[source]
    dst = _DRY_DESTINATIONS[destination]
    if dst is not None and dst.version != src.version:
        dst = None
    return Grant(src, "tcp", 22, dst, NOW + expires, user)


_DRY_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.integers(0, 2), st.integers(0, 2), st.integers(0, 20),
                  st.sampled_from(["alice", "bob"])),
        st.tuples(st.just("close"), st.integers(0, 2), st.integers(0, 2), st.just(0),
                  st.sampled_from(["alice", "bob"])),
        st.tuples(st.just("expire"), st.just(0), st.just(0), st.integers(0, 25), st.just("")),
    ),
    max_size=40,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(_DRY_OPS)
def test_dry_run_expires_exactly_what_a_full_scan_would(ops: list[tuple]) -> None:
    """Whatever the opens, extends, closes and sweeps, the dry run's heap expires the same
    grants as scanning every grant held, and holds the same ones afterwards."""
    fw, model = DryRunFirewall(history=0), {}
    for op, source, destination, when, user in ops:
        if op == "expire":
            due = sorted((g for g in model.values() if g.expired(NOW + when)), key=sort_key)
            for grant in due:
                del model[grant.key]
            assert fw.expire(NOW + when) == due
            continue
        grant = _dry_grant(source, destination, when, user)
        held = model.get(grant.key)
        if op == "open" and (held is None or held.expires < grant.expires):
            model[grant.key] = grant
        elif op == "close" and held is not None and held.user == user:
            del model[grant.key]
        if op == "open":
            fw.open(grant)
        else:
            fw.close(grant.key, user)
        assert fw.grants() == sorted(model.values(), key=sort_key)


def test_dry_run_batch_that_fails_changes_nothing() -> None:
    fw = DryRunFirewall(families=(4,), history=0)
    kept = _dry_grant(0, 0, 10, "alice")
    fw.open(kept)
    changes = [
        GrantChange(Action.OPEN, _dry_grant(0, 0, 20, "alice")),  # extends the one held
        GrantChange(Action.OPEN, _dry_grant(1, 1, 20, "bob")),  # a new one
        GrantChange(Action.CLOSE, kept),
        GrantChange(Action.OPEN, _dry_grant(2, 0, 20, "bob")),  # IPv6: not enabled, fails
    ]
    with pytest.raises(FirewallError):
        fw.apply_batch(changes)
    assert fw.grants() == [kept]
    # The undone extension left no stale expiry behind: the grant expires when it did.
    assert fw.expire(NOW + 15) == [kept] and fw.grants() == []
