"""check-config warns when the backend and the host's firewall are of different kinds.

The legacy xtables and nf_tables both run in the kernel; a drop in either wins, so a grant
written to one is dropped by rules in the other (the Debian 12 pitfall). Each case runs in
a network namespace of its own, with the tables made there by the test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import netns
import pytest

from knock_client.keys import write_key_file

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "nft"], capture_output=True).returncode != 0,
    reason="nft is installed by make test (Debian's nftables)",
)


def check_config(ns: str, tmp_path: Path, backend: str) -> subprocess.CompletedProcess:
    write_key_file(tmp_path / "alice.key", bytes(range(64)), overwrite=True)
    extra = 'protect = ["22/tcp"]\n' if backend == "nftables" else ""
    (tmp_path / "config.toml").write_text(
        f'[capture]\ninterface = "lo"\n[grants]\nbackend = "{backend}"\n{extra}'
        f'[state]\ndirectory = "{tmp_path / "state"}"\n'
        '[[users]]\nid = 7\nname = "alice"\nkey_file = "alice.key"\nallow = ["22/tcp"]\n'
    )
    argv = [sys.executable, "-m", "knockd_fast.cli", "check-config"]
    return netns.run_in(
        ns, [*argv, "-c", str(tmp_path / "config.toml")], capture_output=True, text=True
    )


def test_the_iptables_backend_on_an_nftables_host_is_warned_about(tmp_path: Path) -> None:
    with netns.network_namespace("kfco") as ns:
        assert "warning" not in check_config(ns, tmp_path, "iptables").stderr
        netns.run_in(ns, ["nft", "add", "table", "inet", "firewalld"], check=True)
        netns.run_in(ns, ["nft", "add", "table", "ip", "filter"], check=True)
        done = check_config(ns, tmp_path, "iptables")
    assert done.returncode == 0 and done.stdout.startswith(f"{tmp_path / 'config.toml'}: ok: ")
    assert done.stderr.splitlines() == [
        'warning: grants.backend = "iptables" writes legacy xtables rules, but this host also '
        "has nf_tables tables (inet firewalld, ip filter): the kernel runs both, and a drop "
        'there still drops what a grant accepts; use backend = "nftables" (docs/admin.md, '
        '"Which backend")'
    ]


def test_the_nftables_backend_on_a_legacy_host_is_warned_about(tmp_path: Path) -> None:
    with netns.network_namespace("kfco") as ns:
        netns.run_in(ns, ["nft", "add", "table", "inet", "mine"], check=True)
        assert check_config(ns, tmp_path, "nftables").stderr == ""  # one kind: nothing said
        rule = ["-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "DROP"]
        netns.run_in(ns, ["iptables-legacy", "-w", *rule], check=True)
        done = check_config(ns, tmp_path, "nftables")
    assert done.returncode == 0
    (line,) = done.stderr.splitlines()
    assert line.startswith(
        'warning: grants.backend = "nftables" writes nf_tables rules, but this host also has '
        "legacy xtables tables (ip filter)"
    )
    assert line.endswith('write your rules with nft, or use backend = "iptables" '
                         '(docs/admin.md, "Which backend")')  # fmt: skip


def test_the_dry_run_is_never_warned_about(tmp_path: Path) -> None:
    with netns.network_namespace("kfco") as ns:
        netns.run_in(ns, ["nft", "add", "table", "ip", "filter"], check=True)
        assert check_config(ns, tmp_path, "dry-run").stderr == ""
