"""Telling systemd how the daemon is doing: sd_notify(3)'s datagram protocol on a socket.

Under ``Type=notify`` systemd hands the service ``NOTIFY_SOCKET`` (a path, or an abstract
name written ``@name``) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.
Each notification is one datagram of ``KEY=VALUE`` lines. We send ``READY=1`` once the
captures are open and the firewall is set up, ``WATCHDOG=1`` from the loop's turns,
``RELOADING=1`` ... ``READY=1`` around a SIGHUP reload and ``STOPPING=1`` when the stop
begins. Without ``NOTIFY_SOCKET`` (run by hand, by a test, by another supervisor) every
call does nothing.

The watchdog is fed from the loop's own turn, never from a thread: a loop stuck in a
call that does not return stops feeding it, and systemd kills and restarts the daemon.
systemd's default watchdog signal is SIGABRT; with the watchdog on, ``faulthandler``
first writes every thread's Python stack to standard error (the journal), so the kill
says where the loop was stuck.

A failed send is logged once and never raised: losing a notification must not stop the
doorman (if it is a watchdog ping, systemd's restart is the right outcome anyway).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, MutableMapping

log = logging.getLogger("knockd_fast")

# What systemd passes to the main process for this protocol; taken out of the environment
# once read, so that the programs the daemon starts (ip, ldconfig) do not notify for it.
ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str | None) -> str | None:
    """``NOTIFY_SOCKET`` as an AF_UNIX address for ``sendto``: a path as is, ``@name`` as
    the abstract name (a leading NUL); None when unset or empty. Raises ValueError for a
    kind we do not speak (e.g. systemd 254's ``vsock:``)."""
    if not value:
        return None
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise ValueError(f"NOTIFY_SOCKET={value!r}: neither a path nor an abstract name (@name)")


def watchdog_period(usec: str | None, for_pid: str | None, pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1``: half of ``WATCHDOG_USEC`` (as sd_watchdog_enabled(3)
    advises), or None when there is no watchdog for process ``pid``: no or a bad
    ``WATCHDOG_USEC``, or a ``WATCHDOG_PID`` naming another process (the variables were
    inherited from a parent the watchdog is for)."""
    if not usec:
        return None
    try:
        microseconds = int(usec)
        owner = int(for_pid) if for_pid else pid
    except ValueError:
        return None
    if microseconds <= 0 or owner != pid:
        return None
    return microseconds / 2e6


class ServiceNotifier:
    """The daemon's side of sd_notify: ``ready``, ``turn`` (the watchdog), ``reloading``,
    ``stopping``. ``address`` None: every call does nothing."""

    def __init__(
        self,
        address: str | None,
        watchdog_every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.address = address
        self.watchdog_every = watchdog_every if address is not None else None
        self.clock = clock
        # The first turn pings at once: systemd's watchdog runs from the start of the process.
        self._ping_at = clock() if self.watchdog_every is not None else None
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, pid: int | None = None
    ) -> ServiceNotifier:
        """The notifier systemd's variables in ``environ`` (default ``os.environ``) ask for,
        for process ``pid`` (default this one); the variables are removed from ``environ``."""
        environ = os.environ if environ is None else environ
        values = {name: environ.pop(name, None) for name in ENVIRONMENT}
        try:
            address = socket_address(values["NOTIFY_SOCKET"])
        except ValueError as error:
            log.warning("%s; systemd will not hear from this daemon", error)
            address = None
        every = watchdog_period(
            values["WATCHDOG_USEC"], values["WATCHDOG_PID"], os.getpid() if pid is None else pid
        )
        if address is not None and every is not None and not faulthandler.is_enabled():
            faulthandler.enable()  # the watchdog's SIGABRT prints where each thread was
        return cls(address, every)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> None:
        """One datagram of ``fields`` (``"READY=1"``, ``"STATUS=..."``), one per line."""
        if self.address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)  # a busy systemd never blocks the loop
            self._socket.sendto("\n".join(fields).encode(), self.address)
        except OSError as error:
            if not self._failed:
                self._failed = True
                log.warning(
                    "cannot notify systemd (%s): %s; said once, retried at every notification",
                    fields[0],
                    error.strerror or error,
                )

    def ready(self, status: str) -> None:
        """Started (or reloaded): ``READY=1`` with a one-line ``STATUS``."""
        self.notify("READY=1", "STATUS=" + " ".join(status.split()))

    def turn(self) -> None:
        """Once per turn of the loop: ``WATCHDOG=1`` when half the watchdog time has passed
        since the last one (a clock read and a comparison otherwise)."""
        if self._ping_at is not None and (now := self.clock()) >= self._ping_at:
            self._ping_at = now + self.watchdog_every
            self.notify("WATCHDOG=1")

    @contextlib.contextmanager
    def reloading(self) -> Iterator[None]:
        """Around a reload: ``RELOADING=1`` before (with the CLOCK_MONOTONIC stamp systemd
        253 and later ask for), ``READY=1`` after, also when the reload fails."""
        stamp = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={stamp}")
        try:
            yield
        finally:
            self.notify("READY=1")

    def stopping(self) -> None:
        """The stop has begun (the last packets are read and judged after this)."""
        self.notify("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
