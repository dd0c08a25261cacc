"""packaging/knockd-fast.service booted by a real systemd, sandbox and all.

PID 1 here is not systemd, so systemd boots in a container: ``systemd-nspawn`` (Debian's
systemd-container; skipped without it, or point ``KNOCKD_FAST_NSPAWN`` at the binary) on
an overlay of this machine's root (writes go to a scratch directory, in a mount namespace
of the test's own), inside the server namespace of ``netns.two_hosts``. Only the unit's
ExecStart= is changed (to this checkout's console script) and, where this interpreter or
this checkout lies under /root or /home (which the unit hides: then ProtectHome=tmpfs) or
under /tmp or /var/tmp (a CI clone; the unit's are private), a read-only bind of it.

Proven: the unit starts (Type=notify: READY=1 reaches systemd, STATUS= shown), a knock
opens a dropped port, a reload works, a stopped loop is killed by the watchdog (SIGABRT,
Python stacks in the journal) and restarted, and systemctl stop exits cleanly.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e import knock_command, write_key
from netns import (
    CLIENT_V4,
    SERVER_V4,
    NetnsUnavailable,
    iptables_commands,
    run_in,
    tcp_listener,
    two_hosts,
)

pytestmark = [pytest.mark.netns, pytest.mark.extension]

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "packaging" / "knockd-fast.service"
PORT = 2222
NSPAWN = os.environ.get("KNOCKD_FAST_NSPAWN") or shutil.which("systemd-nspawn")
SCRIPT = Path(sys.executable).with_name("knockd-fast")
TEST_WATCHDOG_SECONDS = 3  # the shipped 30 s, shortened for the watchdog's part only


def _tmp_paths() -> list[str]:
    """This interpreter's prefix and this checkout where they lie under /tmp or /var/tmp (a
    CI clone): the container mounts a /tmp of its own, so they are bound into it."""
    paths = {str(path) for path in (Path(os.path.realpath(sys.base_prefix)), ROOT.resolve())}
    return sorted(path for path in paths if path.startswith(("/tmp/", "/var/tmp/")))


def _paths_drop_in() -> str:
    """The unit hides /root and /home (ProtectHome=) and gives the daemon a /tmp and
    /var/tmp of its own (PrivateTmp=): show it this interpreter's prefix and this checkout
    (the venv, the editable install) where they lie there, read-only."""
    paths = {str(path) for path in (Path(os.path.realpath(sys.base_prefix)), ROOT.resolve())}
    hidden = sorted(
        path for path in paths if path.startswith(("/root/", "/home/", "/tmp/", "/var/tmp/"))
    )
    if not hidden:
        return ""
    lines = ["[Service]"]
    if any(path.startswith(("/root/", "/home/")) for path in hidden):
        lines.append("ProtectHome=tmpfs")
    lines.append("BindReadOnlyPaths=" + " ".join(hidden))
    return "\n".join(lines) + "\n"


class Container:
    """systemd booted by nspawn over an overlay of /, in network namespace ``netns``."""

    def __init__(self, scratch: Path, netns: str, config: str, key: str):
        self.scratch = scratch
        upper, work, self.merged = (scratch / name for name in ("upper", "work", "merged"))
        for folder in (work, self.merged):
            folder.mkdir(parents=True)
        units = upper / "etc/systemd/system"
        (units / "knockd-fast.service.d").mkdir(parents=True)
        unit = UNIT.read_text().replace(
            "ExecStart=/usr/local/bin/knockd-fast ", f"ExecStart={SCRIPT} "
        )
        (units / "knockd-fast.service").write_text(unit)
        (units / "knockd-fast.service.d/paths.conf").write_text(_paths_drop_in())
        (units / "knockd-boot-test.target").write_text(
            "[Unit]\nDescription=knockd-fast boot test\nWants=knockd-fast.service\n"
        )
        etc = upper / "etc/knockd-fast"
        (etc / "keys").mkdir(parents=True, mode=0o700)
        (etc / "config.toml").write_text(config)
        (etc / "config.toml").chmod(0o600)
        (etc / "keys/alice.key").write_text(key)
        (etc / "keys/alice.key").chmod(0o600)
        mount = (
            f"mount -t overlay overlay -o lowerdir=/,upperdir={upper},workdir={work} {self.merged}"
        )
        boot = [
            NSPAWN, "-D", str(self.merged), "--register=no", "--keep-unit",
            "--link-journal=no", "--capability=CAP_NET_ADMIN",
            f"--network-namespace-path=/run/netns/{netns}",
            *(f"--bind-ro={path}" for path in _tmp_paths()),
            "-b", "--", "systemd.unit=knockd-boot-test.target",
        ]  # fmt: skip
        self.console = open(scratch / "console.log", "wb")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f'{mount} && exec "$@"', "boot", *boot],
            stdin=subprocess.DEVNULL, stdout=self.console, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.init_pid = self._find_init()

    def _find_init(self, timeout: float = 30.0) -> int:
        """The container's systemd, as this machine's pid (nspawn's child)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("nspawn exited:\n" + self.console_text())
            for entry in Path("/proc").iterdir():
                try:
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                    parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                # unshare and sh exec, so nspawn is our child's pid; systemd is nspawn's child.
                if parent == self.proc.pid and b"systemd.unit=knockd-boot-test.target" in argv:
                    return int(entry.name)
            time.sleep(0.2)
        raise AssertionError("the container's systemd did not start:\n" + self.console_text())

    def console_text(self) -> str:
        return (self.scratch / "console.log").read_text(errors="replace")[-5000:]

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["nsenter", "-t", str(self.init_pid), "-a", *argv],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def show(self, *properties: str) -> dict[str, str]:
        """The unit's properties; {} while the container's systemd does not answer yet (a
        busy machine boots it slower)."""
        done = self.run("systemctl", "show", "knockd-fast", "-p", ",".join(properties))
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    def journal(self) -> str:
        return self.run("journalctl", "-u", "knockd-fast", "--no-pager", "-o", "cat").stdout

    def wait_until(self, check, what: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = check()
            if found:
                return found
            time.sleep(0.3)
        raise AssertionError(f"no {what} in {timeout} s; journal:\n{self.journal()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.console.close()


@pytest.fixture
def booted(tmp_path):
    if NSPAWN is None or os.geteuid() != 0 or not SCRIPT.is_file():
        pytest.skip("needs root, systemd-nspawn (or KNOCKD_FAST_NSPAWN) and the console script")
    key = tmp_path / "alice.key"
    write_key(key)
    try:
        hosts = two_hosts()
        server, client, interface = hosts.__enter__()
    except NetnsUnavailable as error:
        pytest.skip(f"network namespaces unavailable: {error}")
    try:
        iptables = iptables_commands()[0]
        dropped = run_in(server, [iptables, "-A", "INPUT", "-p", "tcp", "--dport", str(PORT),
                                  "-j", "DROP"], capture_output=True, text=True)  # fmt: skip
        assert dropped.returncode == 0, dropped.stderr
        config = (
            f'[capture]\ninterface = "{interface}"\n\n[[users]]\nid = 7\nname = "alice"\n'
            f'key_file = "keys/alice.key"\nallow = ["{PORT}/tcp"]\n'
        )
        container = Container(tmp_path / "boot", server, config, key.read_text())
        try:
            yield container, server, client, key
        finally:
            container.close()
    finally:
        hosts.__exit__(None, None, None)


def test_the_unit_boots_serves_reloads_is_watched_and_stops(booted):
    container, server, client, key = booted
    state = container.wait_until(
        lambda: (s := container.show("ActiveState", "StatusText", "Type")).get("ActiveState")
        == "active" and s, "active knockd-fast.service", 90
    )  # fmt: skip
    assert state["Type"] == "notify"
    assert re.fullmatch(r"capturing on kfs\w+, iptables backend", state["StatusText"]), state

    with tcp_listener(server, client, PORT) as connects:
        assert not connects(SERVER_V4)
        env = dict(os.environ, HOME=str(key.parent))
        argv = [*knock_command(), "open", SERVER_V4, f"{PORT}/tcp", "--user", "7"]
        knocked = run_in(client, [*argv, "--key-file", str(key)], capture_output=True,
                         text=True, env=env)  # fmt: skip
        assert knocked.returncode == 0, knocked.stderr
        container.wait_until(
            lambda: f"firewall: opened {PORT}/tcp for {CLIENT_V4}" in container.journal(),
            "grant",
        )
        assert connects(SERVER_V4)

    assert container.run("systemctl", "reload", "knockd-fast").returncode == 0
    container.wait_until(lambda: "reloaded /etc/knockd-fast/config.toml" in container.journal(),
                         "reload")  # fmt: skip
    assert container.show("ActiveState")["ActiveState"] == "active"

    # The watchdog: a stopped loop sends no WATCHDOG=1; systemd aborts and restarts it.
    drop_in = f"[Service]\nWatchdogSec={TEST_WATCHDOG_SECONDS}s\n"
    container.run("sh", "-c", "cat > /etc/systemd/system/knockd-fast.service.d/watchdog.conf"
                  f" <<'EOF'\n{drop_in}EOF\nsystemctl daemon-reload && systemctl restart "
                  "knockd-fast")  # fmt: skip
    first = container.wait_until(
        lambda: (s := container.show("MainPID", "ActiveState", "WatchdogUSec")).get("ActiveState")
        == "active" and s, "restart with the short watchdog"
    )  # fmt: skip
    assert first["WatchdogUSec"] == f"{TEST_WATCHDOG_SECONDS}s"
    time.sleep(2 * TEST_WATCHDOG_SECONDS)  # fed all along: still the same process
    assert container.show("MainPID")["MainPID"] == first["MainPID"]
    container.run("kill", "-STOP", first["MainPID"])
    container.wait_until(
        lambda: (s := container.show("MainPID", "ActiveState", "NRestarts")).get("NRestarts", "0")
        != "0" and s["ActiveState"] == "active" and s["MainPID"] != first["MainPID"],
        "restart by the watchdog",
    )  # fmt: skip
    journal = container.journal()
    assert f"Watchdog timeout (limit {TEST_WATCHDOG_SECONDS}s)!" in journal
    assert "Fatal Python error: Aborted" in journal and "Failed with result 'watchdog'" in journal

    assert container.run("systemctl", "stop", "knockd-fast").returncode == 0
    stopped = container.show("ActiveState", "Result", "ExecMainStatus")
    assert stopped == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert re.search(r"^stopped: packets=", container.journal(), re.M)
