"""What both capture twins share: record layout, counter names, limits, protocol numbers,
the one error class, the one argument check, the BPF filter.

docs/capture.md is the specification; ``_capture_c`` (Cython) and ``_capture_py`` (pure
Python) implement it and import their shared numbers from here. The Cython engine keeps its
own C copies of the numbers and asserts at import that they equal these.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import numbers
import operator
import sys
from collections.abc import Iterable
from typing import Any

from knock_client.protocol import (
    HEADER_LEN,
    MAX_USER_ID,
    MESSAGE_LEN_IPV4,
    MESSAGE_LEN_IPV6,
    MIN_DIGIT_BITS,
    USER_ID_BITS,
    VERSION,
    KnockLayout,
    digit_count,
)

from .addresses import IPV4_MAPPED_PREFIX


class CaptureError(Exception):
    """A capture that cannot be opened or read, or an engine used out of order; one line."""


KIND_KNOCK = 1  # completion record kinds
KIND_SPA = 2
MAX_ALTERNATIVES = 8  # per source
ALTERNATIVES_PER_SEGMENT = 2
MAX_CANDIDATES = 16  # messages the verifier authenticates per completion, at most
MAX_VLAN_TAGS = 4
MAX_DESTINATIONS = 64  # protected addresses the engine compares against
MAX_IPV6_EXTENSION_HEADERS = 8
MESSAGE_CAPACITY = 48  # bytes kept per message: 46, rounded up; digits never spill past it

# Live snaplen: the largest link header (Ethernet with 4 tags: 30) + IPv6 (40) + UDP (8) + the
# largest SPA payload (46) leave 388 bytes for IPv6 extension headers. Nothing past the SPA
# payload is ever read; a knock behind more extension headers than that is seen truncated
# (malformed) live, which a genuine client never sends.
SNAPLEN = 512
# Live handles: the kernel hands a block of packets over when it is full or this many ms
# after its first packet. A reader that stops must wait this long to see the last packets.
BLOCK_TIMEOUT_MS = 5

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_DLT12 = 12
LINKTYPE_RAW_DLT14 = 14
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
SUPPORTED_LINKTYPES = frozenset(
    {
        LINKTYPE_ETHERNET,
        LINKTYPE_RAW_DLT12,
        LINKTYPE_RAW_DLT14,
        LINKTYPE_RAW,
        LINKTYPE_LINUX_SLL,
        LINKTYPE_IPV4,
        LINKTYPE_IPV6,
        LINKTYPE_LINUX_SLL2,
    }
)

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VLAN = 0x8100  # 802.1Q
ETHERTYPE_QINQ = 0x88A8  # 802.1ad
ETHERTYPE_QINQ_LEGACY = 0x9100  # pre-standard QinQ, still sent by some switches
VLAN_TPIDS = (ETHERTYPE_VLAN, ETHERTYPE_QINQ, ETHERTYPE_QINQ_LEGACY)

IPPROTO_HOPOPTS = 0
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_AH = 51
IPPROTO_DSTOPTS = 60
# The IPv6 extension headers the engines walk to reach TCP or UDP; any other is ignored.
IPV6_EXTENSION_HEADERS = (
    IPPROTO_HOPOPTS,
    IPPROTO_ROUTING,
    IPPROTO_FRAGMENT,
    IPPROTO_AH,
    IPPROTO_DSTOPTS,
)

TCP_SYN = 0x02
TCP_ACK = 0x10

COUNTER_NAMES = (
    "packets",
    "knock_packets",
    "spa_packets",
    "completions",
    "duplicates",
    "conflicts",
    "alternatives_dropped",
    "evictions",
    "expired",
    "malformed",
    "ignored",
    # Messages refused before Python, needing no key ("Admission" in docs/capture.md).
    "refused_mode",  # packets of a mode that is off (per packet)
    "refused_version",  # messages whose header is not version 1
    "refused_user",  # messages whose header names no configured user
)
PCAP_COUNTER_NAMES = ("pcap_received", "pcap_dropped", "pcap_ifdropped")


def _completion_dtype() -> Any:
    import numpy as np

    return np.dtype(
        [
            ("kind", "u1"),
            ("family", "u1"),
            ("length", "u1"),
            ("n_alternatives", "u1"),
            ("usec", "<u4"),
            ("sec", "<i8"),
            ("source", "u1", 16),
            ("destination", "u1", 16),
            ("message", "u1", MESSAGE_CAPACITY),
            ("alt_segment", "u1", MAX_ALTERNATIVES),
            ("alt_digit", "<u2", MAX_ALTERNATIVES),
        ],
        align=True,
    )


# Knocks that failed before judging, reported with their source (``failed_knocks()``), so
# that the daemon can say why a client gets nowhere: a client whose base_port or digit_bits
# differ from the server's sends digits that land in the wrong segments (partial knocks that
# time out, often with conflicting digits), or that assemble into a refused header.
FAILED_TIMED_OUT = 1  # a partial knock older than knock_timeout, freed by sweep()
FAILED_REFUSED_VERSION = 2  # a whole knock whose header is not version 1
FAILED_REFUSED_USER = 3  # a whole knock whose header names no configured user
FAILED_REASONS = {
    FAILED_TIMED_OUT: "timed_out",
    FAILED_REFUSED_VERSION: "refused_version",
    FAILED_REFUSED_USER: "refused_user",
}
# Reports kept between two failed_knocks(); past it they are dropped (the counters still
# count them). A timed-out partial knock is reported only with at least MIN_REPORTED_DIGITS
# digits: fewer is a scan or a stray packet, not a client trying.
FAILED_RING_CAPACITY = 256
MIN_REPORTED_DIGITS = 4
# Slots one sweep() looks at (a 64-byte line each: 0.12 ms for 65,536 here); the next call goes on
# where it stopped, so a bigger table is swept over several calls.
SWEEP_SLOTS = 65536


def _failed_knock_dtype() -> Any:
    import numpy as np

    return np.dtype(
        [
            ("reason", "u1"),  # FAILED_*
            ("family", "u1"),
            ("filled", "u1"),  # segments that got a digit
            ("alternatives", "u1"),  # conflicting digits kept
            ("sport", "<u2"),  # the knock's source port when grouping by port, else 0
            ("segments", "<u2"),  # segments of a whole message of its family
            ("first_sec", "<i8"),  # when its first digit came
            ("source", "u1", 16),
        ],
        align=True,
    )


def time_us(seconds: float) -> int:
    """A time in whole microseconds, as both engines take it (``sweep``)."""
    return round(seconds * 1_000_000)


_LAZY_DTYPES = {"COMPLETION_DTYPE": _completion_dtype, "FAILED_KNOCK_DTYPE": _failed_knock_dtype}


def __getattr__(name: str) -> Any:
    # The record layouts are built on first use: the limits above are read by the
    # configuration (`check-config`), which has no reason to load numpy.
    if name in _LAZY_DTYPES:
        dtype = globals()[name] = _LAZY_DTYPES[name]()
        return dtype
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def segment_counts(layout: KnockLayout) -> tuple[int, int]:
    """(N4, N6): digits of an IPv4 and an IPv6 message; also checks both ranges fit."""
    layout.port_range(MESSAGE_LEN_IPV6)
    layout.port_range(MESSAGE_LEN_IPV4)
    return (
        digit_count(MESSAGE_LEN_IPV4, layout.digit_bits),
        digit_count(MESSAGE_LEN_IPV6, layout.digit_bits),
    )




def address_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """The 16-byte table key: IPv6 as is, IPv4 as IPv4-mapped IPv6."""
    if address.version == 4:
        return IPV4_MAPPED_PREFIX + address.packed
    return address.packed


def key_address(key: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if type(key) is not bytes:
        key = bytes(key)
    if key[:12] == IPV4_MAPPED_PREFIX:  # the common case, without building an IPv6Address first
        return ipaddress.IPv4Address(key[12:])
    return ipaddress.IPv6Address(key)


# How digits are grouped into one knock (docs/capture.md, "Blind poisoning"): by the source
# address and the source port every packet of one knock shares (the client binds one random
# port per knock), or, for clients behind a NAT that rewrites source ports per flow, by the
# address alone, where a blind spoofer of the address can break a knock with 3 packets.
GROUP_BY_ADDRESS_AND_PORT = "address+port"
GROUP_BY_ADDRESS = "address"
GROUP_BY = (GROUP_BY_ADDRESS_AND_PORT, GROUP_BY_ADDRESS)


HEADER_BITS = 8 * HEADER_LEN  # version (4 bits) and user id (12 bits), in clear
VERSION_SHIFT = USER_ID_BITS
MAX_HEADER_SEGMENTS = -(-HEADER_BITS // MIN_DIGIT_BITS)  # segments holding the header: 4


@dataclasses.dataclass(frozen=True)
class Admission:
    """What an engine refuses before Python, needing no key (docs/capture.md, Admission).

    ``user_ids`` None admits any header (no header check: tests and benchmarks that feed
    random messages); a set admits only version-1 headers naming one of them.
    """

    knock_mode: bool = True  # digits taken from SYNs and UDP datagrams in the knock range
    spa_mode: bool = True  # datagrams to spa_port taken as messages
    user_ids: frozenset[int] | None = None

    def admits_header(self, header: int) -> bool:
        """Whether a 16-bit header (version, user id) may name a message worth judging."""
        return self.user_ids is None or (
            header >> VERSION_SHIFT == VERSION and header & MAX_USER_ID in self.user_ids
        )

    def header_refusal(self, headers: Iterable[int]) -> str | None:
        """None when one of ``headers`` is admitted, else the counter that refuses them all:
        ``refused_user`` when one is at least version 1, ``refused_version`` otherwise."""
        right_version = False
        for header in headers:
            if self.admits_header(header):
                return None
            right_version = right_version or header >> VERSION_SHIFT == VERSION
        return "refused_user" if right_version else "refused_version"


def admission(
    knock_mode: object = True, spa_mode: object = True, user_ids: Iterable[object] | None = None
) -> Admission:
    """Check an engine's admission arguments (both twins' constructors and ``admit()``).

    TypeError for a mode that is not a bool or a user id that is not an integer (a bool
    included); ValueError for a user id outside 0..MAX_USER_ID.
    """
    for name, value in (("knock_mode", knock_mode), ("spa_mode", spa_mode)):
        if not _is_bool(value):
            raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
    ids = None
    if user_ids is not None:
        ids = frozenset(_user_id(value) for value in user_ids)
    return Admission(bool(knock_mode), bool(spa_mode), ids)


def _user_id(value: object) -> int:
    return _integer("a user id", value, 0, MAX_USER_ID)


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """A capture engine's checked and normalised constructor arguments.

    Per-family pairs are (IPv4, IPv6): a digit's family is that of its packet's source.
    """

    layout: KnockLayout
    knock_timeout: float  # seconds
    knock_timeout_us: int  # what the engines compare packet times against
    capacity: int  # table slots
    ring_capacity: int  # completion records
    destinations: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]  # as given
    destination_keys: tuple[bytes, ...]  # their 16-byte keys, sorted, unique
    segments: tuple[int, int]  # digits of a message (N4, N6)
    message_lengths: tuple[int, int]
    pad_bits: tuple[int, int]  # low bits of the last digit past the message's end
    pad_masks: tuple[int, int]  # a last digit with any of these bits set is malformed
    knock_end: int  # one past the last knock port (the IPv6 range is the longer one)
    by_port: bool  # a knock's digits are grouped by source address and source port
    admission: Admission
    header_segments: int  # the first segments, which hold the header's 16 bits


_COUNT_LIMIT = 2**31  # capacities: the C engine's 32-bit slot numbers, index of 2 x capacity
_TIMEOUT_US_LIMIT = 2.0**63  # the C engine's int64_t microseconds


def _is_bool(value: object) -> bool:
    """A bool, Python's or numpy's (without importing numpy: if it is not loaded, the value
    cannot be one of its bools)."""
    numpy = sys.modules.get("numpy")
    return isinstance(value, bool) or (numpy is not None and isinstance(value, numpy.bool_))


def _integer(name: str, value: object, low: int, high: int, high_text: str = "") -> int:
    """``value`` as an int in ``low..high``: TypeError for a bool (an int to Python, but True
    is no count) or a non-integer, ValueError outside the range."""
    if _is_bool(value):
        raise TypeError(f"{name} must be an integer, not bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    if not low <= number <= high:
        raise ValueError(f"{name} must be in {low}..{high_text or high}, not {number}")
    return number


def _count(name: str, value: object) -> int:
    return _integer(name, value, 1, _COUNT_LIMIT - 1, "2**31-1")


def _seconds(name: str, value: object) -> tuple[float, int]:
    """(seconds, microseconds) of a finite positive real; bools refused."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        kind = "bool" if _is_bool(value) else type(value).__name__
        raise TypeError(f"{name} must be a number of seconds, not {kind}")
    seconds = float(value)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name} must be a positive number of seconds, not {seconds}")
    if seconds * 1e6 >= _TIMEOUT_US_LIMIT:
        raise ValueError(f"{name} must be below 2**63 microseconds, not {seconds}")
    return seconds, round(seconds * 1e6)


def engine_settings(
    layout: KnockLayout,
    knock_timeout: float = 10.0,
    capacity: int = 65536,
    ring_capacity: int = 4096,
    destinations: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address | str] = (),
    group_by: str = GROUP_BY_ADDRESS_AND_PORT,
    knock_mode: object = True,
    spa_mode: object = True,
    user_ids: Iterable[object] | None = None,
) -> EngineSettings:
    """Check a ``CaptureEngine``'s arguments, in this order, as both twins' constructors do.

    LayoutError if either family's range does not fit; TypeError for a bool or a wrong type
    (the timeout: any real; capacities: integers); ValueError for a value out of range, a
    bad address, more than MAX_DESTINATIONS distinct destinations, or a ``group_by`` that is
    not one of GROUP_BY; then the admission arguments, as ``admission()`` checks them.
    """
    n4, n6 = segment_counts(layout)
    seconds, microseconds = _seconds("knock_timeout", knock_timeout)
    slots = _count("capacity", capacity)
    records = _count("ring_capacity", ring_capacity)
    addresses = tuple(ipaddress.ip_address(a) for a in destinations)
    keys = tuple(sorted({address_key(a) for a in addresses}))
    if len(keys) > MAX_DESTINATIONS:
        raise ValueError(f"at most {MAX_DESTINATIONS} protected destinations")
    if group_by not in GROUP_BY:
        choices = ", ".join(map(repr, GROUP_BY))
        raise ValueError(f"group_by must be one of {choices}, not {group_by!r}")
    admitted = admission(knock_mode, spa_mode, user_ids)
    pad4 = n4 * layout.digit_bits - 8 * MESSAGE_LEN_IPV4
    pad6 = n6 * layout.digit_bits - 8 * MESSAGE_LEN_IPV6
    return EngineSettings(
        layout=layout,
        knock_timeout=seconds,
        knock_timeout_us=microseconds,
        capacity=slots,
        ring_capacity=records,
        destinations=addresses,
        destination_keys=keys,
        segments=(n4, n6),
        message_lengths=(MESSAGE_LEN_IPV4, MESSAGE_LEN_IPV6),
        pad_bits=(pad4, pad6),
        pad_masks=((1 << pad4) - 1, (1 << pad6) - 1),
        knock_end=layout.base_port + n6 * layout.segment_size,
        by_port=group_by == GROUP_BY_ADDRESS_AND_PORT,
        admission=admitted,
        header_segments=-(-HEADER_BITS // layout.digit_bits),
    )


def filter_expression(
    layout: KnockLayout,
    destinations: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    linktype: int = LINKTYPE_ETHERNET,
    knock_mode: bool = True,
    spa_mode: bool = True,
) -> str:
    """BPF source for the kernel filter of live handles (docs/capture.md, Live capture).

    The engine re-checks everything; the filter only keeps the kernel from copying
    packets that can never matter: a mode that is off leaves its ports out.
    """
    n4, n6 = segment_counts(layout)
    last = layout.base_port + n6 * layout.segment_size - 1
    knock_range = f"dst portrange {layout.base_port}-{last}"
    # libpcap's tcpflags accessor is IPv4-only; for IPv6 read the flags at the fixed offset.
    syn = "(tcp[tcpflags] & (tcp-syn|tcp-ack)) == tcp-syn"
    syn6 = f"(ip6[6] == {IPPROTO_TCP} and (ip6[53] & {TCP_SYN | TCP_ACK:#04x}) == {TCP_SYN:#04x})"
    # Extension headers first: the engine walks them itself.
    ext6 = " or ".join(f"ip6[6] == {header}" for header in IPV6_EXTENSION_HEADERS)
    ext6 = f"(ip6 and ({ext6}))"
    parts = []
    if knock_mode:
        parts.append(f"(ip and tcp and {knock_range} and {syn})")
        parts.append(f"(ip6 and tcp and {knock_range} and {syn6})")
    udp_ports = [knock_range] * knock_mode + [f"dst port {layout.spa_port}"] * spa_mode
    if udp_ports:
        parts.append(f"(udp and ({' or '.join(udp_ports)}))")
    if not parts:
        return "ip and not ip"  # no mode on: nothing to read (the config refuses it)
    body = " or ".join([*parts, ext6])
    hosts = sorted({str(a) for a in destinations})
    if hosts:
        body = f"({' or '.join(f'dst host {h}' for h in hosts)}) and ({body})"
    if linktype != LINKTYPE_ETHERNET:
        return body  # libpcap has no `vlan` for cooked or raw links; Linux strips tags there
    return f"({body}) or (vlan and ({body}))"
