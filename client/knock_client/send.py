"""How knocks leave the machine: TCP SYNs, UDP datagrams, or one SPA datagram.

No raw sockets: an ordinary user can knock. The kernel writes the packets, so
the source address is the one the kernel routes from, as the daemon expects.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .protocol import IPAddress


class SendError(Exception):
    """A destination that cannot be resolved or reached; the message is one line."""


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


def send_syn(destination: Destination, ports: Sequence[int], delay_s: float = 0.0) -> None:
    """One SYN per port, from a non-blocking connect whose socket is closed at once.

    Closing in SYN-SENT makes the kernel forget the attempt, so it never
    retransmits the SYN at 1 s, 3 s, 7 s into a later knock of the same source.
    """
    for number, port in enumerate(ports):
        if number and delay_s:
            time.sleep(delay_s)
        sock = socket.socket(destination.family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            result = sock.connect_ex(destination.sockaddr(port))
            if result not in (0, errno.EINPROGRESS, errno.ECONNREFUSED):
                raise SendError(
                    f"cannot send a SYN to {destination.address} port {port}: {os.strerror(result)}"
                )
        finally:
            sock.close()


def send_udp(destination: Destination, ports: Sequence[int], delay_s: float = 0.0) -> None:
    """One empty datagram per port."""
    with socket.socket(destination.family, socket.SOCK_DGRAM) as sock:
        for number, port in enumerate(ports):
            if number and delay_s:
                time.sleep(delay_s)
            _sendto(sock, b"", destination, port)


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
