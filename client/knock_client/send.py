"""How knocks leave the machine: TCP SYNs, UDP datagrams, or one SPA datagram.

No raw sockets: an ordinary user can knock. The kernel writes the packets, so
the source address is the one the kernel routes from, as the daemon expects.

Every packet of one knock leaves from one source port, drawn at random for the knock
(docs/protocol.md, "Transport"): the daemon groups a knock's digits by address and port,
so a blind attacker who spoofs our address must also guess the port to touch our knock.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .protocol import IPAddress


class SendError(Exception):
    """A destination that cannot be resolved or reached; the message is one line."""


# Source ports a knock may use: every unprivileged one, so a blind guesser faces 2**16 - 1024.
SOURCE_PORTS = range(1024, 65536)
_PORT_TRIES = 32  # a random port may be taken; a few more draws find a free one


@dataclass(frozen=True)
class Destination:
    host: str
    address: IPAddress
    family: socket.AddressFamily
    scope_id: int = 0

    def sockaddr(self, port: int) -> tuple:
        if self.family == socket.AF_INET6:
            return (str(self.address), port, 0, self.scope_id)
        return (str(self.address), port)


def resolve(host: str, family: int = 0) -> Destination:
    """The first address ``host`` resolves to (of ``family``: 4, 6, or 0 for either)."""
    want = {0: socket.AF_UNSPEC, 4: socket.AF_INET, 6: socket.AF_INET6}[family]
    try:
        infos = socket.getaddrinfo(host, None, want, socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as error:
        detail = error.strerror if isinstance(error, socket.gaierror) else str(error)
        raise SendError(f"cannot resolve host {host!r}: {detail}") from None
    for info_family, _, _, _, sockaddr in infos:
        if info_family in (socket.AF_INET, socket.AF_INET6):
            address = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
            scope = sockaddr[3] if info_family == socket.AF_INET6 else 0
            return Destination(host, address, socket.AddressFamily(info_family), scope)
    raise SendError(f"host {host!r} has no IPv{family or '4 or IPv6'} address")


def local_address_toward(destination: Destination) -> IPAddress:
    """The source address the kernel routes from toward ``destination`` (sends nothing)."""
    with socket.socket(destination.family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(destination.sockaddr(9))
        except OSError as error:
            raise SendError(f"no route to {destination.address}: {error.strerror}") from None
        return ipaddress.ip_address(probe.getsockname()[0].split("%", 1)[0])


def send_syn(
    destination: Destination,
    ports: Sequence[int],
    delay_s: float = 0.0,
    source_port: int | None = None,
) -> int:
    """One SYN per port, all from one source port (random unless given); returns it.

    Each SYN comes from a non-blocking connect whose socket is closed at once: closing
    in SYN-SENT makes the kernel forget the attempt, so it never retransmits the SYN at
    1 s, 3 s, 7 s into a later knock, and frees the port for the next SYN of this knock.
    """
    bound = source_port
    for number, port in enumerate(ports):
        if number and delay_s:
            time.sleep(delay_s)
        sock = socket.socket(destination.family, socket.SOCK_STREAM)
        try:
            bound = _bind_source(sock, destination, bound)
            sock.setblocking(False)
            result = sock.connect_ex(destination.sockaddr(port))
            if result not in (0, errno.EINPROGRESS, errno.ECONNREFUSED):
                raise SendError(
                    f"cannot send a SYN to {destination.address} port {port}: {os.strerror(result)}"
                )
        finally:
            sock.close()
    return bound if bound is not None else 0


def send_udp(
    destination: Destination,
    ports: Sequence[int],
    delay_s: float = 0.0,
    source_port: int | None = None,
) -> int:
    """One empty datagram per port, from one source port (random unless given); returns it."""
    with socket.socket(destination.family, socket.SOCK_DGRAM) as sock:
        bound = _bind_source(sock, destination, source_port)
        for number, port in enumerate(ports):
            if number and delay_s:
                time.sleep(delay_s)
            _sendto(sock, b"", destination, port)
    return bound


def _bind_source(sock: socket.socket, destination: Destination, port: int | None) -> int:
    """Bind ``sock`` to ``port`` on the wildcard address (the kernel still picks the source
    address by route), or to a free random one of SOURCE_PORTS; returns the port."""
    # Several sockets of one knock share the port in turn (each closed before the next).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    wildcard = "::" if destination.family == socket.AF_INET6 else "0.0.0.0"
    candidates = (
        [port] if port is not None else [secrets.choice(SOURCE_PORTS) for _ in range(_PORT_TRIES)]
    )
    error: OSError | None = None
    for candidate in candidates:
        try:
            sock.bind((wildcard, candidate))
            return candidate
        except OSError as failure:
            if failure.errno != errno.EADDRINUSE:
                raise SendError(
                    f"cannot bind source port {candidate}: {failure.strerror}"
                ) from None
            error = failure
    what = f"source port {port}" if port is not None else f"any of {_PORT_TRIES} random ports"
    raise SendError(f"cannot bind {what}: {error.strerror if error else 'in use'}")


def send_spa(destination: Destination, spa_port: int, message: bytes) -> None:
    """The whole message as the payload of one datagram."""
    with socket.socket(destination.family, socket.SOCK_DGRAM) as sock:
        _sendto(sock, message, destination, spa_port)


def _sendto(sock: socket.socket, payload: bytes, destination: Destination, port: int) -> None:
    try:
        sock.sendto(payload, destination.sockaddr(port))
    except OSError as error:
        raise SendError(
            f"cannot send a datagram to {destination.address} port {port}: {error.strerror}"
        ) from None
