"""Record the TCP and UDP packets seen on one interface as JSON lines; pure Python, AF_PACKET.

    ip netns exec NS python tests/sniff.py --iface lo --seconds 5 --out FILE

One line per packet: {family, src, dst, proto, sport, dport, tcp_flags, payload_hex, time}
(tcp_flags is null for UDP). Prints "ready" on stdout once the socket is bound, so a test
sends only when the capture runs; stops after --seconds, or at SIGTERM/SIGINT after
reading what is already queued. Needs CAP_NET_RAW.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import select
import signal
import socket
import struct
import sys
import time
from typing import Any

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
VLAN_ETHERTYPES = (0x8100, 0x88A8)
ETH_HEADER_LEN = 14
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
PACKET_OUTGOING = 4
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPV6_EXTENSION_HEADERS = (0, 43, 60)  # hop-by-hop, routing, destination options
IPV6_FRAGMENT_HEADER = 44


def parse_frame(frame: bytes, hatype: int, protocol: int) -> dict[str, Any] | None:
    """A link-layer frame (as AF_PACKET/SOCK_RAW gives it) -> record, or None if not TCP/UDP."""
    if hatype in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
        if len(frame) < ETH_HEADER_LEN:
            return None
        (ethertype,) = struct.unpack_from("!H", frame, 12)
        offset = ETH_HEADER_LEN
        while ethertype in VLAN_ETHERTYPES and len(frame) >= offset + 4:
            (ethertype,) = struct.unpack_from("!H", frame, offset + 2)
            offset += 4
        return parse_ip(frame[offset:], ethertype)
    return parse_ip(frame, protocol)  # no link header (tun, ARPHRD_NONE)


def parse_ip(packet: bytes, ethertype: int) -> dict[str, Any] | None:
    if ethertype == ETH_P_IP:
        return parse_ipv4(packet)
    if ethertype == ETH_P_IPV6:
        return parse_ipv6(packet)
    return None


def parse_ipv4(packet: bytes) -> dict[str, Any] | None:
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    header_len = (packet[0] & 0x0F) * 4
    (total_len,) = struct.unpack_from("!H", packet, 2)
    (fragment,) = struct.unpack_from("!H", packet, 6)
    if header_len < 20 or not header_len <= total_len <= len(packet) or fragment & 0x1FFF:
        return None  # malformed, truncated, or a later fragment (no transport header)
    return parse_transport(4, packet[12:16], packet[16:20], packet[9], packet[header_len:total_len])


def parse_ipv6(packet: bytes) -> dict[str, Any] | None:
    if len(packet) < 40 or packet[0] >> 4 != 6:
        return None
    (payload_len,) = struct.unpack_from("!H", packet, 4)
    end = 40 + payload_len
    if len(packet) < end:
        return None
    next_header, offset = packet[6], 40
    while next_header in IPV6_EXTENSION_HEADERS or next_header == IPV6_FRAGMENT_HEADER:
        if end < offset + 8:
            return None
        if next_header == IPV6_FRAGMENT_HEADER:
            if struct.unpack_from("!H", packet, offset + 2)[0] & 0xFFF8:
                return None  # a later fragment
            length = 8
        else:
            length = (packet[offset + 1] + 1) * 8
        next_header, offset = packet[offset], offset + length
    return parse_transport(6, packet[8:24], packet[24:40], next_header, packet[offset:end])


def parse_transport(
    family: int, src: bytes, dst: bytes, protocol: int, segment: bytes
) -> dict[str, Any] | None:
    if protocol == IPPROTO_TCP and len(segment) >= 20:
        sport, dport = struct.unpack_from("!HH", segment)
        data_offset = (segment[12] >> 4) * 4
        flags = ((segment[12] & 0x01) << 8) | segment[13]
        payload, name = segment[data_offset:], "tcp"
    elif protocol == IPPROTO_UDP and len(segment) >= 8:
        sport, dport, length = struct.unpack_from("!HHH", segment)
        flags, payload, name = None, segment[8:length], "udp"
    else:
        return None
    return {
        "family": family,
        "src": str(ipaddress.ip_address(src)),
        "dst": str(ipaddress.ip_address(dst)),
        "proto": name,
        "sport": sport,
        "dport": dport,
        "tcp_flags": flags,
        "payload_hex": payload.hex(),
    }


def capture(iface: str, seconds: float, out: str) -> int:
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((iface, ETH_P_ALL))
    sock.setblocking(False)
    count = 0
    with sock, open(out, "w") as records:
        print("ready", flush=True)
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            # Once told to stop, drain what is queued without waiting for more.
            wait = 0.0 if stopping else min(max(remaining, 0.0), 0.1)
            readable, _, _ = select.select([sock], [], [], wait)
            if not readable:
                if stopping or remaining <= 0:
                    break
                continue
            frame, (ifname, protocol, pkttype, hatype, _) = sock.recvfrom(1 << 17)
            if ifname != iface:
                continue  # queued before bind() narrowed the socket to iface
            if pkttype == PACKET_OUTGOING and hatype == ARPHRD_LOOPBACK:
                continue  # lo shows every packet twice: as sent and as received
            record = parse_frame(frame, hatype, protocol)
            if record is not None:
                record["time"] = time.time()
                records.write(json.dumps(record) + "\n")
                records.flush()
                count += 1
    print(f"captured {count} packets", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iface", default="lo")
    parser.add_argument("--seconds", type=float, default=5.0, help="stop after this long")
    parser.add_argument("--out", required=True, help="JSON-lines file to write")
    args = parser.parse_args()
    return capture(args.iface, args.seconds, args.out)


if __name__ == "__main__":
    sys.exit(main())
