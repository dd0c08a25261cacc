"""End to end with ``grants.backend = "nftables"``: the real daemon and client, real
libpcap and nftables, in namespaces (tests/e2e.py's harness, ``backend="nftables"``: the
daemon's own chain drops the protected ports unless a set holds the packet).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import json
import shutil
import time

import pytest
from e2e import SERVER_V4, SERVER_V6, doorman, ns_run
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


@pytest.mark.parametrize("server", [SERVER_V4, SERVER_V6], ids=["v4", "v6"])
def test_knock_connect_extend_close(e2e, server: str) -> None:
    h = e2e(default_timeout=300, max_timeout=3600)
    assert not h.can_connect(server, PORT)
    open_and_wait(h, server, "--duration", "60")
    assert h.can_connect(server, PORT)
    (elem,) = elements(h)
    assert elem["timeout"] <= 60
    mark = h.mark()
    h.knock("open", server, f"{PORT}/tcp", "--duration", "600")
    h.wait_log(rf"^firewall: opened {PORT}/tcp for ", since=mark, timeout=10)
    (elem,) = elements(h)
    assert elem["expires"] > 500, elem  # the extension refreshed the kernel's timeout
    h.knock("close", server, f"{PORT}/tcp")
    h.wait_log(rf"^firewall: closed {PORT}/tcp ", timeout=10)
    assert elements(h) == []
    assert not h.can_connect(server, PORT)
    h.stop()


def test_kill9_with_a_3s_grant_the_kernel_closes_the_port(e2e) -> None:
    h = e2e(default_timeout=3)
    open_and_wait(h, SERVER_V4)
    (elem,) = elements(h)
    expires = int(elem["comment"].rsplit("expires=", 1)[1])
    assert h.can_connect(SERVER_V4, PORT)
    h.kill9()
    time.sleep(max(0.0, expires + 0.2 - time.time()))
    assert not h.can_connect(SERVER_V4, PORT), "the kernel times the element out"
    assert elements(h) == []


def test_flush_ruleset_is_repaired_within_seconds(e2e) -> None:
    h = e2e(default_timeout=300)
    open_and_wait(h, SERVER_V4)
    assert ns_run(h.server, ["nft", "flush", "ruleset"]).returncode == 0
    h.wait_log(r"^firewall: what the grants live in was gone", timeout=5)
    assert len(elements(h)) == 1
    assert h.can_connect(SERVER_V4, PORT)
    h.stop()
