"""The kernel filter never hides a packet the engine would use, and does hide the noise.

libpcap runs the same BPF program over capture files when asked (bpf=True), so the filter
that live handles load into the kernel is checked here against the parser, frame by frame.
"""

from __future__ import annotations

import ipaddress
import secrets
from pathlib import Path

import numpy as np
import pytest

from knock_client.protocol import KnockLayout
from knockd_fast import frames as fr
from knockd_fast.capture_spec import (
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
)
from knockd_fast.pcapfile import CaptureWriter

pytestmark = pytest.mark.extension  # BPF runs in libpcap, behind the Cython engine

LAYOUT = KnockLayout(base_port=30000, digit_bits=6, spa_port=40999)
SERVER4, SERVER6 = "192.0.2.1", "2001:db8::1"
OTHER4, OTHER6 = "192.0.2.99", "2001:db8::99"


def message(family: int) -> bytes:
    return secrets.token_bytes(34 if family == 4 else 46)


def wanted_frames(linktype: int) -> list[bytes]:
    """Knocks and SPA datagrams the engine completes, in every shape the link allows."""
    out: list[bytes] = []
    shapes = [{}] + ([{"vlan_tags": [5]}] if linktype == LINKTYPE_ETHERNET else [])
    for link in shapes:
        for number, (family, src, dst) in enumerate(
            [(4, "198.51.100.7", SERVER4), (6, "2001:db8:1::7", SERVER6)]
        ):
            for mode in ("syn", "udp"):
                for port in LAYOUT.ports_for(message(family)):
                    transport = fr.tcp(1234, port, "S") if mode == "syn" else fr.udp(1234, port)
                    proto = 6 if mode == "syn" else 17
                    out.append(fr.frame(linktype, fr.ip(src, dst, proto, transport), **link))
            out.append(
                fr.frame(
                    linktype,
                    fr.ip(src, dst, 17, fr.udp(1234, LAYOUT.spa_port, message(family))),
                    **link,
                )
            )
            # IPv6 behind extension headers: the filter passes them for the engine to walk.
            if family == 6:
                for port in LAYOUT.ports_for(message(6)):
                    packet = fr.ipv6(
                        f"2001:db8:2::{number + 1}",
                        dst,
                        6,
                        fr.tcp(1234, port, "S"),
                        [fr.hop_by_hop(), fr.dstopts()],
                    )
                    out.append(fr.frame(linktype, packet, **link))
    return out


def noise_frames(linktype: int) -> list[bytes]:
    """Packets the engine would ignore, which the kernel should not even copy."""
    port = LAYOUT.base_port + 5
    ips = [
        fr.ip("198.51.100.7", SERVER4, 6, fr.tcp(1234, port, "SA")),  # SYN-ACK
        fr.ip("198.51.100.7", SERVER4, 6, fr.tcp(1234, port, "A")),
        fr.ip("198.51.100.7", SERVER4, 6, fr.tcp(1234, 443, "S")),  # outside the range
        fr.ip("198.51.100.7", SERVER4, 17, fr.udp(1234, 53, b"query")),
        fr.ip("2001:db8:1::7", SERVER6, 6, fr.tcp(1234, port, "SA")),
        fr.ip("2001:db8:1::7", SERVER6, 17, fr.udp(1234, 53)),
        fr.ip("198.51.100.7", SERVER4, 1, b"\x08\x00\x00\x00\x00\x00\x00\x00"),  # ICMP echo
        fr.ip("198.51.100.7", OTHER4, 6, fr.tcp(1234, port, "S")),  # another destination
        fr.ip("2001:db8:1::7", OTHER6, 17, fr.udp(1234, port)),
    ]
    return [fr.frame(linktype, packet) for packet in ips]


def run(path: Path, bpf: bool) -> tuple[np.ndarray, dict[str, int]]:
    from knockd_fast._capture_c import CaptureEngine

    engine = CaptureEngine(LAYOUT, destinations=[SERVER4, SERVER6])
    engine.open_file(path, bpf=bpf)
    records = []
    while engine.dispatch():
        records.append(engine.drain())
    records.append(engine.drain())
    return np.concatenate(records), engine.stats()


@pytest.mark.parametrize(
    "linktype", [LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_RAW]
)
def test_filter_keeps_every_knock_and_drops_the_noise(linktype: int, tmp_path: Path) -> None:
    wanted, noise = wanted_frames(linktype), noise_frames(linktype)
    path = tmp_path / "mixed.pcap"
    with CaptureWriter(path, linktype) as writer:
        # Interleave noise between the knocks, as on a real link.
        for number, frame in enumerate(wanted):
            writer.write(1_800_000_000, number, frame)
            if number % 7 == 0:
                writer.write(1_800_000_000, number, noise[number // 7 % len(noise)])
    unfiltered, plain = run(path, bpf=False)
    filtered, kernel = run(path, bpf=True)

    # Per link shape (untagged, and VLAN-tagged on Ethernet): IPv4 syn, udp, SPA and IPv6
    # syn, udp, SPA, syn behind extension headers.
    shapes = 2 if linktype == LINKTYPE_ETHERNET else 1
    assert len(unfiltered) == 7 * shapes, "everything completes without the filter"
    assert np.array_equal(filtered, unfiltered)
    assert kernel["packets"] == len(wanted)  # the noise never reached the callback
    assert plain["ignored"] > 0 and kernel["ignored"] == 0
    assert kernel["completions"] == plain["completions"]


def test_filter_names_the_protected_destinations() -> None:
    from knockd_fast._capture_c import CaptureEngine

    text = CaptureEngine(LAYOUT, destinations=[ipaddress.ip_address(SERVER4)]).filter_expression
    assert f"dst host {SERVER4}" in text
    assert f"dst portrange {LAYOUT.base_port}-" in text
    assert f"dst port {LAYOUT.spa_port}" in text
