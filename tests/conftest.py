"""Fixtures shared by the test files: the capture twins, the `knock` command, its environment,
a key, a netns, two hosts, a started daemon in them (``e2e``), a holder of a state
directory's lock, a redis-server on loopback; and the ``extension`` marker (skipped in the
pure-twin run)."""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import twins
from e2e import doorman
from netns import NetnsUnavailable, network_namespace, two_hosts
from redis_server import REDIS_SERVER, RedisServer

CLIENT_DIR = Path(__file__).resolve().parent.parent / "client"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "extension: needs the Cython engine (live capture, BPF); skipped in the pure run"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not twins.PURE_RUN:
        return
    skip = pytest.mark.skip(reason="KNOCKD_FAST_NO_EXTENSIONS=1: the pure-Python twin's run")
    for item in items:
        if item.get_closest_marker("extension"):
            item.add_marker(skip)


@pytest.fixture(params=list(twins.TWIN_NAMES))
def engine_module(request: pytest.FixtureRequest) -> ModuleType:
    """Each capture twin's module in turn (only the pure one in the pure run)."""
    return twins.module(request.param)


def _is_our_console_script(path: str) -> bool:
    # Debian's knockd package ships an unrelated /usr/bin/knock (a C binary).
    with open(path, "rb") as script:
        return b"knock_client" in script.read(4096)


@pytest.fixture(scope="session")
def knock_cmd() -> list[str]:
    """argv prefix of the client: the installed console script, else ``python -m``."""
    script = shutil.which("knock")
    if script and _is_our_console_script(script):
        return [script]
    return [sys.executable, "-m", "knock_client.cli"]


@pytest.fixture
def knock_env(tmp_path: Path) -> dict[str, str]:
    """Environment for client subprocesses: a private HOME, so ~/.config/knock is never read."""
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CLIENT_DIR), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def knock_key(tmp_path: Path) -> tuple[Path, bytes]:
    """A fresh 512-bit key in a mode-0600 key file: (path, key)."""
    key = secrets.token_bytes(64)
    path = tmp_path / "user.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.b64encode(key).decode() + "\n")
    return path, key


def _in_namespaces(context: contextlib.AbstractContextManager) -> Iterator:
    """Enter ``context`` (it builds namespaces), or skip the test saying why it cannot."""
    with contextlib.ExitStack() as stack:
        try:
            entered = stack.enter_context(context)
        except NetnsUnavailable as error:
            pytest.skip(f"network namespaces unavailable: {error}")
        yield entered


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace ``kf-<pid>-<n>`` with lo up; deleted afterwards, always."""
    yield from _in_namespaces(network_namespace())


@pytest.fixture
def hosts() -> Iterator[tuple[str, str, str]]:
    """Two hosts on a veth (``netns.two_hosts``): (server namespace, client namespace,
    server interface); deleted afterwards, always."""
    yield from _in_namespaces(two_hosts())


@pytest.fixture
def e2e(tmp_path):
    """``e2e(**options)``: a started ``Harness`` (tests/e2e.py ``doorman``), torn down after."""
    with contextlib.ExitStack() as stack:

        def make(**options):
            try:
                return stack.enter_context(doorman(tmp_path / "e2e", **options))
            except NetnsUnavailable as error:
                pytest.skip(f"network namespaces unavailable: {error}")

        yield make


# Takes a state directory's lock as `knockd-fast run` does, says so, and holds it.
_STATE_HOLDER = """
import sys, time
from pathlib import Path
from knockd_fast.statelock import StateLock
lock = StateLock.acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def state_holder(tmp_path: Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``tmp_path/state``'s lock, as a running daemon would; killed
    by its PID afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _STATE_HOLDER, str(tmp_path / "state")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """Debian's redis-server on loopback, started for the test and ended by its PID."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    server = RedisServer.start(tmp_path / "redis")
    try:
        yield server
    finally:
        server.kill()
