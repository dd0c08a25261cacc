"""Raw frames for tests and benchmarks, built by hand (no scapy).

IP headers carry a correct header checksum; TCP and UDP checksums are left 0 (the capture
engine never checks them; for UDP over IPv4, 0 means "no checksum", over IPv6 it is
formally invalid, which no test here depends on).

    frame(LINKTYPE_ETHERNET, ipv4("192.0.2.1", "198.51.100.7", PROTO_TCP, tcp(40000, 20001)))
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from knock_client.protocol import KnockLayout

from .capture_spec import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    LINKTYPE_RAW_DLT12,
    LINKTYPE_RAW_DLT14,
)

PROTO_HOPOPTS = 0
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ROUTING = 43
PROTO_FRAGMENT = 44
PROTO_ESP = 50
PROTO_AH = 51
PROTO_NONE = 59
PROTO_DSTOPTS = 60

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VLAN = 0x8100
ETHERTYPE_QINQ = 0x88A8  # 802.1ad service tag

TCP_FLAGS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20, "E": 0x40, "C": 0x80}

SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")

Address = str | ipaddress.IPv4Address | ipaddress.IPv6Address


def _packed(address: Address, version: int) -> bytes:
    parsed = ipaddress.ip_address(address)
    if parsed.version != version:
        raise ValueError(f"{address} is not an IPv{version} address")
    return parsed.packed


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# --- network layer ------------------------------------------------------------------------


def ipv4(
    src: Address,
    dst: Address,
    proto: int,
    payload: bytes,
    ttl: int = 64,
    ihl_options: bytes = b"",
    frag_offset: int = 0,
    more_fragments: bool = False,
    identification: int = 0x1234,
) -> bytes:
    """An IPv4 packet. ``ihl_options`` is zero-padded to 4 bytes; ``frag_offset`` is in
    8-byte units (the header field), so any value but 0 makes a non-first fragment."""
    options = ihl_options + b"\0" * (-len(ihl_options) % 4)
    header_len = 20 + len(options)
    if header_len > 60:
        raise ValueError(f"IPv4 options of {len(options)} bytes do not fit in 40")
    flags = (0x2000 if more_fragments else 0) | (frag_offset & 0x1FFF)
    header = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | header_len // 4,
            0,
            header_len + len(payload),
            identification,
            flags,
            ttl,
            proto,
            0,
            _packed(src, 4),
            _packed(dst, 4),
        )
        + options
    )
    checksum = _checksum(header)
    return header[:10] + struct.pack("!H", checksum) + header[12:] + payload


class ExtensionHeader(NamedTuple):
    """An IPv6 extension header: its protocol number and its bytes (byte 0, the next
    header, is filled in by ``ipv6``)."""

    code: int
    data: bytes


def _options_header(code: int, options: bytes) -> ExtensionHeader:
    body = 2 + len(options)
    padding = -body % 8
    if padding == 1:
        pad = b"\0"  # Pad1
    elif padding:
        pad = bytes((1, padding - 2)) + b"\0" * (padding - 2)  # PadN
    else:
        pad = b""
    length = body + padding
    return ExtensionHeader(code, bytes((0, length // 8 - 1)) + options + pad)


def hop_by_hop(options: bytes = b"") -> ExtensionHeader:
    return _options_header(PROTO_HOPOPTS, options)


def dstopts(options: bytes = b"") -> ExtensionHeader:
    return _options_header(PROTO_DSTOPTS, options)


def routing(
    addresses: Sequence[Address] = (), routing_type: int = 0, segments_left: int = 0
) -> ExtensionHeader:
    body = b"".join(_packed(a, 6) for a in addresses)
    return ExtensionHeader(
        PROTO_ROUTING,
        bytes((0, len(body) // 8, routing_type, segments_left)) + b"\0" * 4 + body,
    )


def fragment(offset: int = 0, more: bool = False, identification: int = 1) -> ExtensionHeader:
    """Fragment header; ``offset`` in 8-byte units, non-zero for a non-first fragment."""
    return ExtensionHeader(
        PROTO_FRAGMENT,
        struct.pack("!BBHI", 0, 0, (offset & 0x1FFF) << 3 | int(more), identification),
    )


def ah(icv: bytes = b"\0" * 12, spi: int = 0x100, sequence: int = 1) -> ExtensionHeader:
    """Authentication header; its length is (hdr[1] + 2) * 4 and, in IPv6, a multiple of 8."""
    length = 12 + len(icv)
    if length % 8:
        raise ValueError("an IPv6 AH is a multiple of 8 bytes: pad the ICV")
    return ExtensionHeader(
        PROTO_AH, struct.pack("!BBHII", 0, length // 4 - 2, 0, spi, sequence) + icv
    )


def ipv6(
    src: Address,
    dst: Address,
    next_header: int,
    payload: bytes,
    extension_headers: Iterable[ExtensionHeader] = (),
    hop_limit: int = 64,
) -> bytes:
    """An IPv6 packet; ``next_header`` is the protocol after the extension headers."""
    headers = list(extension_headers)
    codes = [h.code for h in headers] + [next_header]
    chain = b"".join(bytes((codes[i + 1],)) + h.data[1:] for i, h in enumerate(headers))
    body = chain + payload
    fixed = struct.pack(
        "!IHBB16s16s",
        0x60000000,
        len(body),
        codes[0],
        hop_limit,
        _packed(src, 6),
        _packed(dst, 6),
    )
    return fixed + body


def ip(src: Address, dst: Address, proto: int, payload: bytes) -> bytes:
    """IPv4 or IPv6, by the source address's family."""
    if ipaddress.ip_address(src).version == 4:
        return ipv4(src, dst, proto, payload)
    return ipv6(src, dst, proto, payload)


# --- transport ------------------------------------------------------------------------------


def tcp(
    sport: int, dport: int, flags: str | int = "S", payload: bytes = b"", seq: int = 1
) -> bytes:
    """A 20-byte TCP header (checksum 0) and payload; ``flags`` as letters (``"SA"``) or int."""
    if isinstance(flags, str):
        bits = 0
        for letter in flags:
            bits |= TCP_FLAGS[letter.upper()]
    else:
        bits = flags
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, bits, 64240, 0, 0) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    """A UDP header (checksum 0) and payload."""
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


# --- link layer -----------------------------------------------------------------------------


def _ethertype(ip_packet: bytes) -> int:
    version = ip_packet[0] >> 4 if ip_packet else 0
    return ETHERTYPE_IPV6 if version == 6 else ETHERTYPE_IPV4


def _tags(vlan_tags: Iterable[int | tuple[int, int]], inner: int) -> tuple[int, bytes]:
    """(outer EtherType, bytes of the tags and the inner EtherType after it).

    A tag is a VLAN id (TPID 0x8100) or a ``(tpid, vlan_id)`` pair, outermost first.
    """
    tags = [(ETHERTYPE_VLAN, tag) if isinstance(tag, int) else tag for tag in vlan_tags]
    if not tags:
        return inner, b""
    following = [tpid for tpid, _ in tags[1:]] + [inner]
    pairs = zip(tags, following, strict=True)
    body = b"".join(struct.pack("!HH", vid & 0x0FFF, nxt) for (_, vid), nxt in pairs)
    return tags[0][0], body


def ethernet(
    ip_packet: bytes,
    vlan_tags: Iterable[int | tuple[int, int]] = (),
    ethertype: int | None = None,
) -> bytes:
    """Ethernet II; ``ethertype`` (default: from the IP version) is the innermost one."""
    outer, tags = _tags(vlan_tags, _ethertype(ip_packet) if ethertype is None else ethertype)
    return DST_MAC + SRC_MAC + struct.pack("!H", outer) + tags + ip_packet


def linux_sll(
    ip_packet: bytes,
    vlan_tags: Iterable[int | tuple[int, int]] = (),
    protocol: int | None = None,
) -> bytes:
    """Linux cooked v1 (16 bytes): packet type, ARPHRD, address length, address, protocol."""
    outer, tags = _tags(vlan_tags, _ethertype(ip_packet) if protocol is None else protocol)
    return struct.pack("!HHH8sH", 0, 1, 6, SRC_MAC, outer) + tags + ip_packet


def linux_sll2(
    ip_packet: bytes,
    vlan_tags: Iterable[int | tuple[int, int]] = (),
    protocol: int | None = None,
) -> bytes:
    """Linux cooked v2 (20 bytes): protocol, reserved, ifindex, ARPHRD, type, addr len, addr."""
    outer, tags = _tags(vlan_tags, _ethertype(ip_packet) if protocol is None else protocol)
    return struct.pack("!HHIHBB8s", outer, 0, 2, 1, 0, 6, SRC_MAC) + tags + ip_packet


def raw(ip_packet: bytes) -> bytes:
    return bytes(ip_packet)


RAW_LINKTYPES = (LINKTYPE_RAW_DLT12, LINKTYPE_RAW_DLT14, LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6)


def frame(linktype: int, ip_packet: bytes, **link_options: object) -> bytes:
    """Wrap an IP packet for a capture of ``linktype`` (a LINKTYPE_ constant)."""
    if linktype == LINKTYPE_ETHERNET:
        return ethernet(ip_packet, **link_options)  # type: ignore[arg-type]
    if linktype == LINKTYPE_LINUX_SLL:
        return linux_sll(ip_packet, **link_options)  # type: ignore[arg-type]
    if linktype == LINKTYPE_LINUX_SLL2:
        return linux_sll2(ip_packet, **link_options)  # type: ignore[arg-type]
    if linktype in RAW_LINKTYPES:
        if link_options:
            raise ValueError(f"link type {linktype} has no link options")
        return raw(ip_packet)
    raise ValueError(f"no frame builder for link type {linktype}")


# --- knocks -------------------------------------------------------------------------------------


def knock_frames(
    layout: KnockLayout,
    message: bytes,
    src: Address,
    dst: Address,
    linktype: int,
    mode: str = "syn",
    sport: int = 43210,
) -> list[bytes]:
    """One frame per knock port of ``message``, in segment order: TCP SYNs or UDP datagrams."""
    if mode not in ("syn", "udp"):
        raise ValueError(f"mode {mode!r} is neither 'syn' nor 'udp'")
    frames = []
    for port in layout.ports_for(message):
        transport = tcp(sport, port, "S") if mode == "syn" else udp(sport, port)
        proto = PROTO_TCP if mode == "syn" else PROTO_UDP
        frames.append(frame(linktype, ip(src, dst, proto, transport)))
    return frames


def spa_frame(
    layout: KnockLayout,
    message: bytes,
    src: Address,
    dst: Address,
    linktype: int,
    sport: int = 43210,
) -> bytes:
    """One UDP datagram to the SPA port carrying the whole message."""
    return frame(linktype, ip(src, dst, PROTO_UDP, udp(sport, layout.spa_port, message)))
