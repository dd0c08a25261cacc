"""The nftables backend in fresh network namespaces, and its settings.

As in tests/test_firewall.py the test process never enters a namespace:
``tests/firewall_probe.py`` runs the backend inside one and the kernel's view is read there
with ``nft -j``. The ``nft`` command only inspects and sabotages; the backend itself goes
through libnftables.
"""

from __future__ import annotations

import ctypes.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, run_in, tcp_listener

from knockd_fast.config import ConfigError, load_config
from knockd_fast.firewall import backend_class
from knockd_fast.firewall.nftables import MAX_COMMENT_BYTES, NftablesFirewall, comment_fits

PROBE = Path(__file__).with_name("firewall_probe.py")
TABLE = "knockd_fast"

netns_test = pytest.mark.netns
needs_nft = pytest.mark.skipif(
    not shutil.which("nft") or not ctypes.util.find_library("nftables"),
    reason="nft / libnftables1 not installed (Debian: nftables libnftables1)",
)


def grant(source: str, port: int = 22, *, proto: str = "tcp", dest: str | None = None, **kw):
    return {
        "source": source,
        "proto": proto,
        "port": port,
        "destination": dest,
        "expires": kw.get("expires", int(time.time()) + 3600),
        "user": kw.get("user", "alice"),
    }


def key(data: dict) -> dict:
    return {name: data[name] for name in ("source", "proto", "port", "destination")}


class Probe:
    def __init__(self, ns: str, **spec) -> None:
        self.ns, self.spec = ns, {"backend": "nftables", "protect": [[22, "tcp"]], **spec}

    def raw(self, ops: list, **spec) -> list[dict]:
        done = run_in(
            self.ns,
            [sys.executable, str(PROBE), "run"],
            input=json.dumps({"ops": ops, **self.spec, **spec}),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def __call__(self, ops: list, **spec) -> list:
        results = self.raw(ops, **spec)
        errors = [r["error"] for r in results if "error" in r]
        assert not errors, errors
        return [r["ok"] for r in results]

    def nft(self, *args: str | list[str], check: bool = True) -> subprocess.CompletedProcess:
        if len(args) == 1 and isinstance(args[0], list):
            args = tuple(args[0])
        done = run_in(self.ns, ["nft", *args], capture_output=True, text=True, timeout=30)
        assert not check or done.returncode == 0, done.stderr
        return done

    def ruleset(self) -> list[dict]:
        out = json.loads(self.nft("-j", "list", "ruleset").stdout)["nftables"]
        return [item for item in out if "metainfo" not in item]

    def elements(self, set_name: str) -> list[dict]:
        out = json.loads(self.nft("-j", "list", "set", "inet", TABLE, set_name).stdout)
        (listing,) = [item["set"] for item in out["nftables"] if "set" in item]
        return [e["elem"] for e in listing.get("elem", [])]


@pytest.fixture
def probe(netns: str) -> Probe:
    return Probe(netns)


def _set_of(g: dict) -> str:
    family = 6 if ":" in g["source"] else 4
    return f"grants{family}{'d' if g['destination'] else ''}"


def _value(g: dict) -> list:
    parts = [g["source"], g["proto"], g["port"]]
    return parts + ([g["destination"]] if g["destination"] else [])


# -- in a namespace ----------------------------------------------------------------------


@netns_test
@needs_nft
def test_setup_idempotent_and_teardown_exact(probe: Probe) -> None:
    probe.nft("add", "table", "inet", "admin")
    probe.nft(
        "add chain inet admin input { type filter hook input priority 0; policy accept; }".split()
    )
    probe([["setup"], ["setup"]], hooks=["INPUT", "FORWARD"])
    before = probe.ruleset()
    probe([["setup"]], hooks=["INPUT", "FORWARD"])  # a fresh process: nothing changes
    assert probe.ruleset() == before
    chains = {i["chain"]["name"]: i["chain"] for i in before if "chain" in i}
    assert chains["input"]["prio"] == -10 and chains["forward"]["hook"] == "forward"
    sets = {i["set"]["name"] for i in before if "set" in i and i["set"]["table"] == TABLE}
    assert sets == {"grants4", "grants4d", "grants6", "grants6d"}
    probe([["teardown"], ["teardown"]])
    left = probe.ruleset()
    assert [i for i in left if "table" in i] == [
        i for i in before if "table" in i and i["table"]["name"] == "admin"
    ]
    assert not [i for i in left if TABLE in json.dumps(i)]


CASES = [
    ("192.0.2.2", None),
    ("192.0.2.2", "192.0.2.1"),
    ("2001:db8::2", None),
    ("2001:db8::2", "2001:db8::1"),
]


@netns_test
@needs_nft
@pytest.mark.parametrize(("source", "dest"), CASES, ids=["v4", "v4-dest", "v6", "v6-dest"])
def test_open_extend_close_and_ownership(probe: Probe, source: str, dest: str | None) -> None:
    now = int(time.time())
    a = grant(source, dest=dest, expires=now + 100, user="alice")
    shorter = grant(source, dest=dest, expires=now + 50, user="bob")
    longer = grant(source, dest=dest, expires=now + 200, user="bob")
    results = probe(
        [
            ["setup"],
            ["open", a],
            ["open", shorter],  # never shortens, keeps alice
            ["grants"],
            ["open", longer],  # extends, takes bob
            ["grants"],
            ["close", key(a), "alice"],  # not alice's any more
            ["close", key(a), "bob"],
            ["close", key(a), "bob"],
            ["grants"],
        ]
    )
    assert results[1] == a and results[2] == a and results[3] == [a]
    assert results[4] == longer and results[5] == [longer]
    assert results[6:9] == [False, True, False]
    assert results[9] == []
    assert probe.elements(_set_of(a)) == []
    # The kernel holds the element with its comment: read back by a fresh process.
    probe([["open", a]])
    (elem,) = probe.elements(_set_of(a))
    assert elem["val"]["concat"] == _value(a)
    assert elem["comment"] == f"knockd-fast user=alice expires={a['expires']}"
    assert 95 <= elem["timeout"] <= 100
    assert probe([["grants"]]) == [[a]]


@netns_test
@needs_nft
def test_reconcile_removes_junk_and_expired_and_reads_back(probe: Probe) -> None:
    now = int(time.time())
    live = grant("192.0.2.2", expires=now + 300)
    dest = grant("2001:db8::2", dest="2001:db8::1", expires=now + 300, user="bob")
    probe([["setup"], ["open", live], ["open", dest]])
    # A hand-made element without our comment, and one whose comment says it expired.
    probe.nft("add element inet knockd_fast grants4 { 192.0.2.9 . tcp . 22 timeout 1h }".split())
    probe.nft(
        "add",
        "element",
        "inet",
        TABLE,
        "grants4",
        f'{{ 192.0.2.8 . udp . 53 timeout 1h comment "knockd-fast user=x expires={now - 5}" }}',
    )
    (result,) = probe([["reconcile", now]])
    assert result["kept"] == [live, dest]
    assert [g["source"] for g in result["removed"]] == ["192.0.2.8"]
    assert [e["val"]["concat"] for e in probe.elements("grants4")] == [_value(live)]
    assert probe([["grants"]]) == [[live, dest]]


@netns_test
@needs_nft
def test_the_kernel_expires_and_expire_reports(probe: Probe) -> None:
    now = int(time.time())
    short = grant("192.0.2.2", expires=now + 2)
    results = probe([["setup"], ["open", short], ["sleep", 3.2], ["expire", now + 2]])
    assert probe.elements("grants4") == []  # gone from the kernel by itself
    assert results[3] == [short]  # and reported, from the view


@netns_test
@needs_nft
def test_extend_refreshes_the_kernel_timeout(probe: Probe) -> None:
    now = int(time.time())
    first = grant("192.0.2.2", expires=now + 6)
    probe([["setup"], ["open", first]])
    before = probe.elements("grants4")[0]["expires"]
    time.sleep(2)
    later = grant("192.0.2.2", expires=int(time.time()) + 120)
    # What the kernel is told, as it happens: re-adding an element refreshes its timeout
    # only from Linux 6.12 (Debian 12's 6.1 ignores it), so an extension must delete the
    # element and add it again, in one transaction, on this kernel too.
    monitor = subprocess.Popen(
        ["ip", "netns", "exec", probe.ns, "nft", "monitor", "elements"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)  # subscribed before the change
        # The backend's view lives in the process: read back, then extend.
        assert probe([["grants"], ["open", later]])[1] == later
        time.sleep(0.5)
    finally:
        monitor.terminate()
        events = monitor.communicate(timeout=10)[0].splitlines()
    ours = [e for e in events if "192.0.2.2 . tcp . 22" in e]
    deleted = next((i for i, e in enumerate(ours) if e.startswith("delete element")), None)
    assert deleted is not None, events  # not a re-add alone
    assert any(
        e.startswith("add element") and f"expires={later['expires']}" in e
        for e in ours[deleted + 1 :]
    ), events
    (elem,) = probe.elements("grants4")
    assert elem["expires"] > before and elem["expires"] >= 115
    assert elem["comment"].endswith(f"expires={later['expires']}")


@netns_test
@needs_nft
@pytest.mark.parametrize(
    "sabotage",
    [["nft", "flush", "ruleset"], ["nft", "delete", "table", "inet", TABLE]],
    ids=["flush-ruleset", "delete-table"],
)
def test_repair_after_sabotage(probe: Probe, sabotage: list[str]) -> None:
    g4 = grant("192.0.2.2")
    g6 = grant("2001:db8::2", dest="2001:db8::1")
    results = probe(
        [
            ["setup"],
            ["open", g4],
            ["open", g6],
            ["repair"],
            ["sh", sabotage],
            ["repair"],
            ["repair"],
        ]
    )
    assert results[3] is None and results[4]["rc"] == 0
    assert results[5] == [g4, g6]  # re-created and re-added
    assert results[6] is None
    assert [e["comment"] for e in probe.elements("grants6d")] == [
        f"knockd-fast user=alice expires={g6['expires']}"
    ]
    # A flushed chain (sets intact) is noticed too.
    results = probe(
        [["grants"], ["sh", ["nft", "flush", "chain", "inet", TABLE, "input"]], ["repair"]]
    )
    assert results[2] == [g4, g6]


@netns_test
@needs_nft
def test_apply_batch_is_all_or_nothing(probe: Probe) -> None:
    a, b = grant("192.0.2.2"), grant("192.0.2.3", user="bob")
    v6 = grant("2001:db8::2")
    results = probe(
        [
            ["setup"],
            ["batch", [["open", a], ["open", b], ["close", {**key(a), "user": "alice"}]]],
            ["grants"],
        ]
    )
    assert results[1] == [a, b, True] and results[2] == [b]
    # Sabotage the IPv6 set so that the kernel refuses the batch's last change.
    results = probe.raw(
        [
            ["grants"],
            ["sh", ["nft", "flush", "chain", "inet", TABLE, "input"]],
            ["sh", ["nft", "delete", "set", "inet", TABLE, "grants6"]],
            ["batch", [["open", a], ["close", {**key(b), "user": "bob"}], ["open", v6]]],
        ]
    )
    assert "error" in results[3] and results[3]["error"].startswith("nftables: a batch of 3")
    assert [e["val"]["concat"] for e in probe.elements("grants4")] == [_value(b)]
    # A change of a family not enabled is refused before anything is sent.
    results = probe.raw([["batch", [["open", a], ["open", v6]]]], families=[4])
    assert "IPv6 is not enabled" in results[0]["error"]
    assert len(probe.elements("grants4")) == 1


@netns_test
@needs_nft
def test_a_batch_of_interleaved_changes_ends_as_one_by_one(probe: Probe) -> None:
    """One transaction sends each run of element commands on one set as one command: the
    kernel must still end as the changes applied in their order leave it."""
    now = int(time.time())
    a, b = grant("192.0.2.2", expires=now + 100), grant("192.0.2.3", expires=now + 100)
    a_later, c6 = {**a, "expires": now + 300}, grant("2001:db8::2", expires=now + 100)
    d = grant("192.0.2.4", dest="192.0.2.1", expires=now + 100)
    def close(g: dict) -> list:
        return ["close", {**key(g), "user": "alice"}]

    changes = [
        ["open", a], ["open", b], ["open", c6], ["open", a_later], close(b),
        ["open", d], ["open", b], close(a), ["open", a], close(c6),
    ]  # fmt: skip
    results = probe([["setup"], ["batch", changes], ["grants"]])
    assert results[1] == [a, b, c6, a_later, True, d, b, True, a, True]
    assert results[2] == [a, b, d]
    assert [e["val"]["concat"] for e in probe.elements("grants4")] == [_value(a), _value(b)]
    assert [e["val"]["concat"] for e in probe.elements("grants4d")] == [_value(d)]
    assert probe.elements("grants6") == []


def test_element_commands_are_one_per_run_of_one_verb_and_set() -> None:
    from knockd_fast.firewall.nftables import _Elements

    elements = _Elements(TABLE)
    for verb, set_, value in [
        ("add", "grants4", 1), ("add", "grants4", 2), ("delete", "grants4", 2),
        ("add", "grants6", 3), ("add", "grants4", 4), ("add", "grants4", 5),
    ]:  # fmt: skip
        elements.add(verb, set_, value)
    assert [
        (verb, body["element"]["name"], body["element"]["elem"])
        for command in elements.commands
        for verb, body in command.items()
    ] == [
        ("add", "grants4", [1, 2]), ("delete", "grants4", [2]), ("add", "grants6", [3]),
        ("add", "grants4", [4, 5]),
    ]  # fmt: skip
    assert all(c[v]["element"]["table"] == TABLE for c in elements.commands for v in c)


@netns_test
@needs_nft
def test_sets_only_makes_sets_in_the_admins_table(probe: Probe) -> None:
    probe.nft("add", "table", "inet", "filter")
    spec = {"table": "filter", "sets_only": True, "protect": []}
    probe([["setup"], ["open", grant("192.0.2.2")], ["setup"]], **spec)
    # The admin's rule references our set; a repeated setup leaves it in place.
    probe.nft(
        "add chain inet filter input { type filter hook input priority 0; policy drop; }".split()
    )
    probe.nft(
        "add rule inet filter input ip saddr . meta l4proto . th dport @grants4 accept".split()
    )
    probe([["setup"], ["repair"]], **spec)
    chains = [i["chain"]["name"] for i in probe.ruleset() if "chain" in i]
    assert chains == ["input"]
    out = json.loads(probe.nft("-j", "list", "set", "inet", "filter", "grants4").stdout)
    (listing,) = [i["set"] for i in out["nftables"] if "set" in i]
    assert [e["elem"]["val"]["concat"][0] for e in listing["elem"]] == ["192.0.2.2"]


# -- real traffic between two namespaces --------------------------------------------------

@netns_test
@needs_nft
@pytest.mark.parametrize(
    ("client", "server", "dest"),
    [(CLIENT_V4, SERVER_V4, None), (CLIENT_V6, SERVER_V6, SERVER_V6)],
    ids=["v4", "v6-dest"],
)
def test_protect_mode_with_real_connects(hosts, client: str, server: str, dest) -> None:
    server_ns, client_ns, _ = hosts
    probe = Probe(server_ns, protect=[[2222, "tcp"]])
    probe([["setup"]])
    with tcp_listener(server_ns, client_ns, 2222) as connects:
        assert not connects(server)
        g = grant(client, 2222, dest=dest)
        probe([["open", g]])
        assert connects(server)
        if dest is not None:  # bound to its destination: another local address stays shut
            run_in(server_ns, ["ip", "addr", "add", "2001:db8::3/64", "dev", "lo", "nodad"])
            assert not connects("2001:db8::3")
        assert probe([["grants"], ["close", key(g), "alice"]])[1] is True
        assert not connects(server)
        # A short grant: the kernel closes the port at its expiry, without the backend.
        short = grant(client, 2222, dest=dest, expires=int(time.time()) + 3)
        probe([["open", short]])
        assert connects(server)
        time.sleep(max(0.0, short["expires"] - time.time()) + 0.3)
        assert not connects(server)


# -- settings, no namespace ----------------------------------------------------------------

CONFIG = """
[capture]
interface = "eth0"
[grants]
backend = "nftables"
{grants}
[[users]]
id = 1
name = "{name}"
key_file = "k.key"
allow = ["22/tcp"]
"""


def _config(tmp_path: Path, grants: str, name: str = "alice"):
    path = tmp_path / "knockd-fast.toml"
    path.write_text(CONFIG.format(grants=grants, name=name))
    return load_config(path, load_keys=False)


def test_settings(tmp_path: Path) -> None:
    config = _config(tmp_path, 'protect = ["22/tcp", "51820/udp"]\nhooks = ["INPUT", "FORWARD"]')
    assert config.grants.protect == ((22, "tcp"), (51820, "udp"))
    assert (config.grants.nft_table, config.grants.nft_priority) == ("knockd_fast", -10)
    assert config.grants.nft_sets_only is False
    config = _config(tmp_path, 'nft_sets_only = true\nnft_table = "filter"\nnft_priority = -200')
    assert (config.grants.nft_table, config.grants.nft_priority) == ("filter", -200)
    assert backend_class("nftables") is NftablesFirewall


@pytest.mark.parametrize(
    ("grants", "where", "says"),
    [
        ("", "grants.protect", "empty"),
        ('protect = ["22/tcp", "22/tcp"]', "grants.protect[1]", "listed twice"),
        ('protect = ["22/icmp"]', "grants.protect[0]", ""),
        ('protect = ["22/tcp"]\nnft_sets_only = true', "grants.protect", "nft_sets_only"),
        ('protect = ["22/tcp"]\nnft_table = "a b"', "grants.nft_table", "characters"),
        ('protect = ["22/tcp"]\nnft_priority = 5000', "grants.nft_priority", "-1000..1000"),
        ('protect = ["22/tcp"]\nnft_sets_only = 1', "grants.nft_sets_only", "true or false"),
    ],
)
def test_settings_refused(tmp_path: Path, grants: str, where: str, says: str) -> None:
    with pytest.raises(ConfigError) as error:
        _config(tmp_path, grants)
    assert where in str(error.value) and says in str(error.value)


def test_nft_settings_only_with_the_nftables_backend(tmp_path: Path) -> None:
    path = tmp_path / "knockd-fast.toml"
    text = CONFIG.format(grants='protect = ["22/tcp"]', name="alice")
    path.write_text(text.replace('backend = "nftables"', 'backend = "iptables"'))
    with pytest.raises(ConfigError, match=r"grants\.protect.*only for backend"):
        load_config(path, load_keys=False)


def test_a_user_name_too_long_for_an_element_comment(tmp_path: Path) -> None:
    fits, too_long = "a" * 64, "é" * 30  # 6 bytes each once percent-encoded
    assert comment_fits(fits) and not comment_fits(too_long)
    assert _config(tmp_path, 'protect = ["22/tcp"]', name=fits).users[1].name == fits
    with pytest.raises(ConfigError, match=rf"users\[0\]\.name.*{MAX_COMMENT_BYTES} bytes"):
        _config(tmp_path, 'protect = ["22/tcp"]', name=too_long)
