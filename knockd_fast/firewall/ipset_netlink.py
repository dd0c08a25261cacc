"""ipset's add, del and test over a raw netlink socket: our own encoder, many per send.

Why not pyroute2's ``IPSet.add`` for these: in pyroute2 0.9 each call runs an asyncio loop
and builds the message through its generic NLA classes; that is about 350 µs of Python
per entry, while the kernel's part (the ``send``) is about 12 µs. The three messages the
ipset backend sends per grant have a fixed shape, so they are packed here with ``struct``
and kept byte for byte what pyroute2 builds for the same entry (tests/test_ipset_netlink.py
compares them). pyroute2 still does the rest (create, list, destroy): rare, and its
decoder reads listings well.

Pipelining. ipset's nfnetlink handler takes any number of messages in one ``sendmsg``
and handles them in order within the call itself: a message that fails is answered with
its error (and the request's sequence number) whatever its flags, one with NLM_F_ACK that
succeeds with an ack (error 0). ``IpsetSocket.exchange`` sends up to ``chunk`` messages
at once, only the last asking for an ack: its answer comes after every error of the
send, so one read tells how a send that went well went. It returns one code per message
(0, or the positive errno / IPSET_ERR_* the kernel answered). A message that fails does
not stop the ones after it in the same send: callers that want all or nothing undo what
succeeded.

Every answer takes room in the socket's receive buffer until read (an ack's skb is under
1 KiB of it), and answers that do not fit are dropped by the kernel (ENOBUFS): the chunk
is sized from the buffer, which is raised with SO_RCVBUFFORCE where we may (we hold
CAP_NET_ADMIN to change sets at all).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # an error's answer carries the request's header only, not all of it
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NFNL_SUBSYS_IPSET = 6

IPSET_CMD_PROTOCOL = 1
IPSET_CMD_ADD = 9
IPSET_CMD_DEL = 10
IPSET_CMD_TEST = 11
IPSET_PROTOCOL_MIN = 6  # what every kernel since 2.6.39 accepts (we ask for its own)

# Top-level attributes (linux/netfilter/ipset/ip_set.h)
_ATTR_PROTOCOL = 1
_ATTR_SETNAME = 2
_ATTR_DATA = 7 | NLA_F_NESTED
# Inside IPSET_ATTR_DATA (the flags as pyroute2 sets them, which the kernel checks)
_ATTR_IP = 1 | NLA_F_NESTED
_ATTR_PORT = 4 | NLA_F_NET_BYTEORDER
_ATTR_TIMEOUT = 6 | NLA_F_NET_BYTEORDER
_ATTR_PROTO = 7 | NLA_F_NET_BYTEORDER
_ATTR_CADT_LINENO = 9
_ATTR_IP2 = 20 | NLA_F_NESTED
_ATTR_COMMENT = 26
_ADDR = {4: 1 | NLA_F_NET_BYTEORDER, 6: 2 | NLA_F_NET_BYTEORDER}  # IPSET_ATTR_IPADDR_IPV4/6

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian, 0 here)
_ERROR = struct.Struct("=i")
_HEAD = _NLMSGHDR.size + _NFGENMSG.size
# The nfgen family pyroute2 sends for every ipset request (the kernel ignores it for these).
_NFGEN_FAMILY = socket.AF_INET

ACK_ROOM = 1024  # receive-buffer bytes one answer may take (its skb's truesize, rounded up)
RCVBUF = 4 << 20
SNDBUF = 4 << 20
MAX_CHUNK = 4096


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + bytes(-size % 4)


def _entry_layout(version: int, bound: bool) -> struct.Struct:
    """One struct for an entry's whole key, as ``_attr`` would nest and pad it: the
    address (nested), port, protocol[, destination (nested)]. Packing it at once costs a
    tenth of the ten ``_attr`` calls, for every grant."""
    address = f"HHHH{4 if version == 4 else 16}s"  # outer size, kind, inner size, kind, bytes
    return struct.Struct("=" + address + "HH2s2x" + "HHB3x" + (address if bound else ""))


_ENTRY_LAYOUTS = {(v, bound): _entry_layout(v, bound) for v in (4, 6) for bound in (False, True)}
_ADDRESS_SIZES = {4: (12, 8), 6: (24, 20)}  # (outer, inner) attribute sizes
_PORT_SIZE, _PROTO_SIZE = 4 + 2, 4 + 1
_LINENO = _attr(_ATTR_CADT_LINENO, struct.pack("!I", 0))
_TIMEOUT_HEAD = struct.pack("=HH", 8, _ATTR_TIMEOUT)


def entry_key(
    source: IPv4Address | IPv6Address,
    port: int,
    proto: int,
    destination: IPv4Address | IPv6Address | None,
) -> bytes:
    """The attributes naming one entry of a ``hash:ip,port[,ip]`` set (del and test send
    only these; add appends the extensions with ``entry_extensions``)."""
    version = source.version
    outer, inner = _ADDRESS_SIZES[version]
    kind = _ADDR[version]
    head = (outer, _ATTR_IP, inner, kind, source.packed, _PORT_SIZE, _ATTR_PORT,
            port.to_bytes(2, "big"), _PROTO_SIZE, _ATTR_PROTO, proto)  # fmt: skip
    if destination is None:
        return _ENTRY_LAYOUTS[version, False].pack(*head)
    return _ENTRY_LAYOUTS[version, True].pack(
        *head, outer, _ATTR_IP2, inner, kind, destination.packed
    )


def entry_extensions(timeout: int, comment: str) -> bytes:
    """An add's comment and timeout, in pyroute2's order (the comment's line number 0, as
    it sends it; the kernel reads it only in restore mode)."""
    text = comment.encode() + b"\0"
    size = 4 + len(text)
    return (
        struct.pack("=HH", size, _ATTR_COMMENT) + text + bytes(-size % 4)
        + _LINENO + _TIMEOUT_HEAD + timeout.to_bytes(4, "big")
    )  # fmt: skip


def set_prefix(protocol: int, set_name: str) -> bytes:
    """The attributes every request to one set starts with (computed once per set)."""
    return _attr(_ATTR_PROTOCOL, bytes((protocol,))) + _attr(
        _ATTR_SETNAME, set_name.encode() + b"\0"
    )


def body(prefix: bytes, data: bytes) -> bytes:
    """A request's attributes: ``set_prefix`` and the entry's data."""
    return prefix + _attr(_ATTR_DATA, data)


def message(cmd: int, flags: int, seq: int, attrs: bytes, pid: int = 0) -> bytes:
    """One whole netlink message: header, nfgenmsg, attributes."""
    return (
        _NLMSGHDR.pack(_HEAD + len(attrs), NFNL_SUBSYS_IPSET << 8 | cmd, flags, seq, pid)
        + _NFGENMSG.pack(_NFGEN_FAMILY, 0, 0)
        + attrs
    )


Request = tuple[int, int, bytes]  # (IPSET_CMD_*, NLM_F_* beyond REQUEST and ACK, attributes)


class IpsetSocket:
    """One NETLINK_NETFILTER socket (one per thread: sequence numbers and answers are
    per socket). ``protocol`` is the kernel's ipset protocol version."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self._sock.bind((0, 0))
            self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            # The kernel answers within our send; a missing answer must not hang the
            # firewall thread for ever.
            self._sock.settimeout(5.0)
            for force, plain, size in (
                (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF, RCVBUF),
                (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF, SNDBUF),
            ):
                try:
                    self._sock.setsockopt(socket.SOL_SOCKET, force, size)
                except PermissionError:  # no CAP_NET_ADMIN: what net.core.[rw]mem_max allows
                    self._sock.setsockopt(socket.SOL_SOCKET, plain, size)
            rcvbuf = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            sndbuf = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            # Answers of one send must all fit in the receive buffer; its requests (about
            # 120 bytes each) in one skb below the send buffer.
            self.chunk = max(1, min(MAX_CHUNK, rcvbuf // ACK_ROOM, sndbuf // 512))
            self._seq = 0
            self._buffer = bytearray(65536)
            self.protocol = IPSET_PROTOCOL_MIN
            self.protocol = self._kernel_protocol()
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def exchange(self, requests: Sequence[Request]) -> list[int]:
        """Send ``requests`` (at most ``chunk``) in one ``sendmsg``; one code per request,
        in order: 0 (done), or the positive errno or IPSET_ERR_* the kernel answered."""
        if len(requests) > self.chunk:
            raise ValueError(f"{len(requests)} requests in one send, more than {self.chunk}")
        if not requests:
            return []
        first = self._seq + 1
        last = self._seq = self._seq + len(requests)
        # Only the last request asks for an ack: the kernel answers a failed one whatever
        # its flags, and in order, so the last one's answer comes after every error of the
        # send. One read for a send that went well, where an ack each cost a read each.
        out = b"".join(
            message(cmd, NLM_F_REQUEST | extra, first + i, attrs)
            for i, (cmd, extra, attrs) in enumerate(requests[:-1])
        )
        cmd, extra, attrs = requests[-1]
        out += message(cmd, NLM_F_REQUEST | NLM_F_ACK | extra, last, attrs)
        self._sock.send(out)
        codes = [0] * len(requests)
        while True:
            for seq, kind, error, _ in self._answers():
                if kind == NLMSG_ERROR and first <= seq <= last:
                    codes[seq - first] = -error
                    if seq == last:
                        return codes
                # anything else is an answer to an earlier call that raised before reading
                # all of its own (its sequence number is below ``first``): dropped

    def _answers(self):  # noqa: ANN202  (an iterator of (seq, type, error, payload))
        """The messages of one datagram (one recv), each with its error code (acks)."""
        try:
            size = self._sock.recv_into(self._buffer)
        except OSError as error:
            if error.errno == errno.ENOBUFS:  # answers dropped: cannot tell which were done
                raise OSError(errno.ENOBUFS, "ipset: netlink answers lost (ENOBUFS)") from None
            raise
        view = memoryview(self._buffer)[:size]
        offset = 0
        while offset + _NLMSGHDR.size <= size:
            length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(view, offset)
            if length < _NLMSGHDR.size:
                break
            payload = view[offset + _NLMSGHDR.size : offset + length]
            error = _ERROR.unpack_from(payload)[0] if kind == NLMSG_ERROR else 0
            yield seq, kind, error, bytes(payload)
            offset += (length + 3) & ~3

    def _kernel_protocol(self) -> int:
        """The kernel's ipset protocol version (IPSET_CMD_PROTOCOL), as pyroute2 asks it."""
        self._seq += 1
        seq = self._seq
        attrs = _attr(_ATTR_PROTOCOL, bytes((IPSET_PROTOCOL_MIN,)))
        self._sock.send(message(IPSET_CMD_PROTOCOL, NLM_F_REQUEST | NLM_F_ACK, seq, attrs))
        protocol = None
        while True:
            for got, kind, error, payload in self._answers():
                if got != seq:
                    continue
                if kind == NLMSG_ERROR:
                    if error:
                        raise OSError(-error, "ipset: the protocol query failed")
                    if protocol is None:
                        raise OSError(errno.EPROTO, "ipset: the kernel sent no protocol")
                    return protocol
                protocol = _find_u8(payload[_NFGENMSG.size :], _ATTR_PROTOCOL) or protocol


def _find_u8(attrs: bytes, kind: int) -> int | None:
    """The first byte of the top-level attribute ``kind``, if present."""
    offset = 0
    while offset + 4 <= len(attrs):
        size, found = struct.unpack_from("=HH", attrs, offset)
        if size < 4:
            return None
        if found & ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) == kind and size > 4:
            return attrs[offset + 4]
        offset += (size + 3) & ~3
    return None
