"""Debian's redis-server, started by a test and stopped by its PID (a helper module).

``RedisServer.start(directory, host, port, netns=None)`` runs ``redis-server`` in the
foreground (no persistence, protected mode, its files in ``directory``), bound to ``host``
(loopback, or an address of a namespace the test made, with ``netns``), and waits until
it answers PING. ``stop()`` ends that process only; ``kill()`` is the crash a test may
want. ``make test`` installs the package; without it the tests that need it skip.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from netns import free_port

REDIS_SERVER = shutil.which("redis-server")
# What a gateway needs of Redis, as docs/admin.md's ACL example grants it: its keys, and
# the commands knockd_fast/fleet.py sends (the script's own commands are checked too).
FLEET_ACL = (
    "resetkeys ~kf:* resetchannels -@all +set +get +del +evalsha +script|load +script|exists "
    "+multi +exec +hgetall +xrange +xrevrange +xlen +xread +xadd +hget +hset +hdel"
)
START_TIMEOUT = 10.0


@dataclass
class RedisServer:
    host: str
    port: int
    directory: Path
    netns: str | None = None
    user: str | None = None  # an ACL user with FLEET_ACL (the default user then is off)
    password: str | None = None
    # TLS only (no plain port): {"cert": server certificate, "key": its key, "ca": the CA
    # that signed the clients' certificates, which it then asks for}
    tls: dict[str, Path] | None = None
    proc: subprocess.Popen | None = None

    @classmethod
    def start(
        cls,
        directory: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        netns: str | None = None,
        user: str | None = None,
        password: str | None = None,
        tls: dict[str, Path] | None = None,
    ) -> RedisServer:
        server = cls(host, port or free_port(), Path(directory), netns, user, password, tls)
        server.restart()
        return server

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/0"

    def restart(self) -> None:
        """Start (again, after ``stop``/``kill``) on the same address, empty."""
        assert REDIS_SERVER, "redis-server is not installed (make test installs it)"
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [
            REDIS_SERVER, "--bind", self.host, "--port", str(self.port),
            "--save", "", "--appendonly", "no", "--dir", str(self.directory),
            "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning",
        ]  # fmt: skip
        if self.tls:
            argv[argv.index("--port") + 1] = "0"
            argv += ["--tls-port", str(self.port), "--tls-cert-file", str(self.tls["cert"]),
                     "--tls-key-file", str(self.tls["key"]), "--tls-ca-cert-file",
                     str(self.tls["ca"]), "--tls-auth-clients", "yes"]  # fmt: skip
        if self.user:  # each word its own argument: redis quotes one that holds spaces
            argv += ["--user", "default", "off", "--user", self.user, "on", f">{self.password}"]
            argv += FLEET_ACL.split()
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]  # exec: the PID is redis's
        log = open(self.directory / "redis.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"redis-server did not start: {(self.directory / 'redis.log').read_text()}"
                )
            time.sleep(0.05)

    def _answers(self) -> bool:
        if self.netns:
            probe = subprocess.run(
                ["ip", "netns", "exec", self.netns, "redis-cli", "-h", self.host, "-p",
                 str(self.port), "PING"], capture_output=True, text=True,
            )  # fmt: skip
            return probe.stdout.strip() in ("PONG", "NOAUTH Authentication required.")
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as connection:
                if self.tls:
                    return True  # listening: the handshake is what the test is about
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM to our redis-server, by its PID; wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: Redis gone without a word, as a crash or a cut cable looks."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
