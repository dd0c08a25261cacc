"""End to end with ``grants.backend = "nftables"``: the real daemon and client, real
libpcap and nftables, in namespaces (tests/e2e.py's harness, ``backend="nftables"``: the
daemon's own chain drops the protected ports unless a set holds the packet).

What only nftables has. The scenarios every backend shares (knock, connect, close, IPv4
and IPv6, expiry, extend, two destinations, kill -9) are in tests/test_e2e_backends.py.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import json
import shutil

import pytest
from e2e import SERVER_V4, doorman, ns_run
from netns import NetnsUnavailable

pytestmark = [
    pytest.mark.netns,
    pytest.mark.extension,  # live capture needs the Cython engine
    pytest.mark.skipif(
        not shutil.which("nft") or not ctypes.util.find_library("nftables"),
        reason="nft / libnftables1 not installed",
    ),
]
PORT = 2222


@pytest.fixture
def e2e(tmp_path):
    with contextlib.ExitStack() as stack:

        def make(**options):
            try:
                return stack.enter_context(doorman(tmp_path / "e2e", backend="nftables", **options))
            except NetnsUnavailable as error:
                pytest.skip(f"network namespaces unavailable: {error}")

        yield make


def elements(h) -> list[dict]:
    """Every element of our sets, read with ``nft -j`` in the server namespace."""
    done = ns_run(h.server, ["nft", "-j", "list", "table", "inet", "knockd_fast"])
    assert done.returncode == 0, done.stderr
    items = json.loads(done.stdout)["nftables"]
    return [e["elem"] for i in items if "set" in i for e in i["set"].get("elem", [])]


def open_and_wait(h, target: str, *extra: str) -> None:
    h.knock("open", target, f"{PORT}/tcp", *extra)
    h.wait_log(rf"^firewall: opened {PORT}/tcp for ", timeout=10)


def test_flush_ruleset_is_repaired_within_seconds(e2e) -> None:
    h = e2e(default_timeout=300)
    open_and_wait(h, SERVER_V4)
    assert ns_run(h.server, ["nft", "flush", "ruleset"]).returncode == 0
    h.wait_log(r"^firewall: what the grants live in was gone", timeout=5)
    assert len(elements(h)) == 1
    assert h.can_connect(SERVER_V4, PORT)
    h.stop()
