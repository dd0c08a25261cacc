"""``knockd-fast check-config`` and ``status`` as an admin runs them, without root.

check-config runs on machines (and as users) that have no business loading the capture
engine, the replay cache or libiptc: it must load none of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from knock_client.keys import write_key_file
from knockd_fast.config import load_config
from knockd_fast.firewall import registry
from knockd_fast.firewall.base import FirewallError
from knockd_fast.preflight import host_warnings

HEAVY = ("numpy", "sqlite3", "_sqlite3", "iptc", "knockd_fast._capture_c")
RUN_CLI = """
import json, sys
from knockd_fast import cli
code = cli.main(sys.argv[1:])
loaded = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(%r)))
print(json.dumps({"code": code, "loaded": loaded}), file=sys.stderr)
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    write_key_file(tmp_path / "alice.key", bytes(range(64)))
    path = tmp_path / "config.toml"
    path.write_text(
        '[capture]\ninterface = "eth0"\n'
        '[grants]\nbackend = "dry-run"\n'
        f'[state]\ndirectory = "{tmp_path / "state"}"\n'
        '[[users]]\nid = 7\nname = "alice"\nkey_file = "alice.key"\nallow = ["22/tcp"]\n'
    )
    return path


def cli(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
    code = RUN_CLI % json.dumps(HEAVY)
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    return done, report


def test_check_config_loads_no_engine_no_replay_cache_no_libiptc(config: Path) -> None:
    done, report = cli("check-config", "-c", str(config))
    assert report == {"code": 0, "loaded": []}, report
    assert done.stdout.startswith(f"{config}: ok: 1 users, knock range from 20000 at 8 bits, ")
    assert done.stdout.rstrip().endswith("interface eth0, backend dry-run")


def test_check_config_names_the_backends_the_registry_knows(config: Path) -> None:
    config.write_text(config.read_text().replace('"dry-run"', '"pf"'))
    done, report = cli("check-config", "-c", str(config))
    assert report["code"] == 2
    assert done.stderr.splitlines()[0] == (
        f"knockd-fast: error: {config}: grants.backend: 'pf' is not one of "
        "'iptables', 'ipset', 'nftables', 'dry-run'"
    )


def test_status_of_a_backend_that_keeps_nothing_says_so(config: Path) -> None:
    done, report = cli("status", "-c", str(config))
    assert report["code"] == 3, "no daemon runs: the LSB code for 'not running'"
    assert done.stdout.splitlines() == [
        f"knockd-fast is not running (state directory {config.parent / 'state'}, backend "
        "dry-run): no knock is judged",
        "backend dry-run: no grants are kept in a firewall",
    ]
    assert "iptc" not in report["loaded"]


def test_status_names_the_running_daemon_by_the_lock_it_holds(
    config: Path, state_holder: subprocess.Popen
) -> None:
    done, report = cli("status", "-c", str(config))
    assert report["code"] == 0
    assert done.stdout.splitlines()[0] == (
        f"knockd-fast runs (pid {state_holder.pid}; state directory {config.parent / 'state'}, "
        "backend dry-run)"
    )
    done, report = cli("status", "-c", str(config), "--json")
    assert report["code"] == 0
    assert json.loads(done.stdout) == {
        "running": True,
        "pid": state_holder.pid,
        "state_directory": str(config.parent / "state"),
        "backend": "dry-run",
        "grants": None,
        "counters": None,  # the lock's holder is no daemon: it publishes none
    }


def test_status_that_cannot_read_the_lock_says_it_cannot_tell(config: Path) -> None:
    (config.parent / "state").write_text("a file where the state directory should be")
    done, report = cli("status", "-c", str(config), "--json")
    assert report["code"] == 4, "the LSB code for 'unknown'"
    assert json.loads(done.stdout)["running"] is None
    done, report = cli("status", "-c", str(config))
    assert done.stdout.splitlines()[0] == (
        f"knockd-fast: cannot tell whether it runs (state directory {config.parent / 'state'}, "
        f"backend dry-run): {config.parent / 'state' / 'knockd-fast.pid'}: Not a directory"
    )


def test_check_config_warns_of_an_interface_this_host_lacks_and_names_those_it_has(
    config: Path,
) -> None:
    import socket

    config.write_text(config.read_text().replace('"eth0"', '"kfnope0"'))
    done, report = cli("check-config", "-c", str(config))
    assert report["code"] == 0, "a warning: the interface may appear later"
    present = ", ".join(name for _, name in socket.if_nameindex())
    assert done.stderr.splitlines()[0] == (
        f"warning: {config}: capture.interface: no interface 'kfnope0' here (this host has: "
        f"{present}); the daemon will not start until it exists"
    )


def test_a_key_file_root_does_not_own_is_warned_about(config: Path) -> None:
    """The daemon (root) refuses a key file another user owns; check-config run as that user
    loads it, so the host check says so. Loaded here without the keys, as such a run sees
    them pass."""
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    key = config.parent / "alice.key"
    os.chown(key, 65534, 65534)  # nobody
    warnings = [line for line in host_warnings(load_config(config, load_keys=False))
                if "key_file" in line]  # fmt: skip
    assert warnings == [
        f"users[0].key_file: {key} belongs to nobody, not root: the daemon (root) refuses "
        f"it; run: chown root {key}"
    ]
    os.chown(key, 0, 0)
    assert not [line for line in host_warnings(load_config(config)) if "key_file" in line]


def test_status_lists_grants_soonest_first_in_text_and_json_alike() -> None:
    from knockd_fast.firewall.base import Grant
    from knockd_fast.status import describe_grants, grants_json

    now = 1_800_000_000
    late = Grant("198.51.100.7", "tcp", 22, None, now + 125, "alice")
    soon = Grant("192.0.2.2", "udp", 53, "192.0.2.1", now + 59, "bob")
    gone = Grant("203.0.113.9", "tcp", 443, None, now - 5, "carol")  # past: 0 s left
    assert describe_grants([late, soon, gone], now + 0.9) == [
        "203.0.113.9 443/tcp user=carol expires in 0m00s (2027-01-15T07:59:55.000Z)",
        "192.0.2.2 -> 192.0.2.1 53/udp user=bob expires in 0m59s (2027-01-15T08:00:59.000Z)",
        "198.51.100.7 22/tcp user=alice expires in 2m05s (2027-01-15T08:02:05.000Z)",
    ]
    listed = grants_json([late, soon, gone], now + 0.9)
    assert [(g["user"], g["seconds_left"]) for g in listed] == [
        ("carol", 0), ("bob", 59), ("alice", 125)]  # fmt: skip
    assert listed[1] == {
        "source": "192.0.2.2", "destination": "192.0.2.1", "port": 53, "proto": "udp",
        "user": "bob", "expires": "2027-01-15T08:00:59.000Z", "seconds_left": 59,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("installed", "found"),
    [("0.7.2", "0.7.2 installed"), ("0.10.1", "0.10.1 installed"), (None, "not installed")],
)
def test_the_ipset_backend_names_the_pyroute2_it_needs(
    config: Path, monkeypatch: pytest.MonkeyPatch, installed: str | None, found: str
) -> None:
    """Debian 12's python3-pyroute2 (0.7.2) imports but is not the IPSet the backend is
    written for: selecting the backend fails with one line, check-config warns, and the
    other backends do not care (nothing imports pyroute2 before the ipset backend is chosen)."""

    def version(dist: str) -> str:
        assert dist == "pyroute2"
        if installed is None:
            raise metadata.PackageNotFoundError(dist)
        return installed

    monkeypatch.setattr(registry.metadata, "version", version)
    expected = (
        f"the ipset backend needs pyroute2 >= 0.9.7, < 0.10 ({found}; Debian 12's "
        "python3-pyroute2 is 0.7): pip install 'pyroute2>=0.9.7,<0.10' into the daemon's "
        'Python, or use grants.backend = "nftables" or "iptables"'
    )
    with pytest.raises(FirewallError) as raised:
        registry.backend_class("ipset")
    assert str(raised.value) == expected
    config.write_text(config.read_text().replace('"dry-run"', '"ipset"'))
    assert f"grants.backend: {expected}" in host_warnings(load_config(config))
    for name in ("iptables", "nftables", "dry-run"):
        assert registry.requirement_problem(name) is None


def test_pyroute2_0_9_satisfies_the_ipset_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    for good in ("0.9.7", "0.9.12", "0.9.7.post1"):
        monkeypatch.setattr(registry.metadata, "version", lambda dist, good=good: good)
        assert registry.requirement_problem("ipset") is None


def test_check_config_says_what_a_fleet_shares_and_where_knock_mode_works(config: Path) -> None:
    """No connection is made (check-config never talks to Redis); the ECMP statement is
    printed while knock mode is on, and not for single-packet mode alone."""
    fleet = '[fleet]\nurl = "redis://192.0.2.9:6379/0"\ngateway = "gw1"\nkey_file = "alice.key"\n'
    config.write_text(fleet + config.read_text())
    done, report = cli("check-config", "-c", str(config))
    assert report == {"code": 0, "loaded": []}, report
    lines = done.stderr.splitlines()[:-1]
    assert lines[0] == (
        "fleet: gateway gw1 shares claims and grants through redis at 192.0.2.9:6379 (no TLS); "
        "while it is unreachable: local"
    )
    assert lines[1].startswith(f"note: {config}: fleet: knock mode (syn, udp) needs every packet")
    assert "behind per-flow ECMP or anycast" in lines[1] and 'modes = ["spa"]' in lines[1]
    config.write_text('[knock]\nmodes = ["spa"]\n' + config.read_text())
    done, _ = cli("check-config", "-c", str(config))
    assert [line for line in done.stderr.splitlines() if line.startswith("note:")] == []
