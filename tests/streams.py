"""Random packet streams for tests/test_capture_differential.py (the capture twins).

Hypothesis draws the structure of a stream (layout, engine settings, link type, file format,
the list of events, the timing profile, the batch schedule); each event then builds its
frames from a ``random.Random`` seeded by a drawn integer, so a stream of a thousand packets
costs hypothesis a few dozen choices. Failing streams are minimised frame by frame by the
test module itself (``minimize``), which is what gives a readable reproducer.

Events (``KIND_*``):

- knock: a message sealed with ``knock_client.protocol.seal`` under a random key, from an
  IPv4 or IPv6 source, in syn or udp mode, complete or a random subset of its ports,
  shuffled or in order, with duplicates, conflicting digits before and after the genuine
  ones (beyond the alternative bounds), a last digit with nonzero pad bits, carried plain or
  in IPv4 options / fragments and IPv6 extension headers, TCP with odd flags;
- spa: an SPA datagram of the right or a wrong length (or a lying UDP length);
- background: ARP, LLDP, TCP to other ports, TCP to knock ports without SYN or with ACK,
  ICMP/ICMPv6, UDP elsewhere, ESP / no-next-header, IPv4-mapped IPv6 sources, other
  destinations, IPv4 digits in IPv6-only segments;
- garbage: random bytes, zero-length frames, valid frames cut at a random length, frames
  with flipped bytes;
- flood: single digits from many spoofed sources, to churn the table and its index.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import struct
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

from knock_client.protocol import (
    MESSAGE_LEN_IPV4,
    MESSAGE_LEN_IPV6,
    Action,
    Knock,
    KnockLayout,
    Proto,
    digit_count,
    seal,
)
from knockd_fast import frames as fr
from knockd_fast.capture_spec import (
    GROUP_BY,
    GROUP_BY_ADDRESS_AND_PORT,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    LINKTYPE_RAW_DLT12,
    LINKTYPE_RAW_DLT14,
    address_key,
    segment_counts,
)
from knockd_fast.pcapfile import CaptureWriter

T0 = 1_700_000_000  # packet times are microseconds after T0 seconds
MESSAGE_LENGTHS = {4: MESSAGE_LEN_IPV4, 6: MESSAGE_LEN_IPV6}
LINK_HEADER_TYPES = (LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2)
ALL_LINKTYPES = LINK_HEADER_TYPES + (
    LINKTYPE_RAW,
    LINKTYPE_RAW_DLT12,
    LINKTYPE_RAW_DLT14,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
)
TPIDS = (0x8100, 0x88A8, 0x9100)
CAPACITIES = (1, 2, 3, 8, 64, 65536)
RING_CAPACITIES = (1, 3, 4096)
KNOCK_TIMEOUTS = (0.001, 0.5, 10.0)
BATCH_SIZES = (-1, 1, 2, 3, 5, 17, 64)
KNOCK_DST = {4: "198.51.100.20", 6: "2001:db8:1::20"}
OTHER_DST = {4: "203.0.113.99", 6: "2001:db8:2::99"}
DESTINATION_SETS = {
    "any": (),
    "knock": (KNOCK_DST[4], KNOCK_DST[6], "198.51.100.21"),
    "knock4": (KNOCK_DST[4],),
    "knock6": (KNOCK_DST[6], "2001:db8:1::21"),
    "other": (OTHER_DST[4], "2001:db8:3::1"),
}
SOURCES_PER_FAMILY = 5  # a small pool, so that events share sources and collide

KIND_KNOCK = "knock"
KIND_SPA = "spa"
KIND_BACKGROUND = "background"
KIND_GARBAGE = "garbage"
KIND_FLOOD = "flood"

# TCP flag bytes: with SYN and without ACK (a digit), and the rest (ignored).
DIGIT_FLAGS = (0x02, 0x02 | 0x08, 0x02 | 0x01, 0x02 | 0x20, 0x02 | 0x40 | 0x80, 0x02 | 0x04)
NON_DIGIT_FLAGS = (0x12, 0x04, 0x00, 0x10, 0x01, 0x14, 0xFF, 0xED)


def families(linktype: int) -> tuple[int, ...]:
    """The IP families a link type can carry (228 is IPv4 only, 229 IPv6 only)."""
    return {LINKTYPE_IPV4: (4,), LINKTYPE_IPV6: (6,)}.get(linktype, (4, 6))


def source_address(family: int, number: int) -> str:
    if family == 4:
        return f"192.0.2.{10 + number}"
    return f"2001:db8::{0x10 + number:x}"


def mapped_address(number: int) -> str:
    return f"::ffff:192.0.2.{10 + number}"


# --- frames -----------------------------------------------------------------------------------


def wrap(linktype: int, packet: bytes, tags: Sequence[tuple[int, int]] = ()) -> bytes:
    """The IP packet behind ``linktype``'s header, with VLAN tags where the link has them."""
    if linktype in LINK_HEADER_TYPES:
        return fr.frame(linktype, packet, vlan_tags=list(tags))
    return fr.frame(linktype, packet)


def random_tags(rng: random.Random, most: int) -> list[tuple[int, int]]:
    return [(rng.choice(TPIDS), rng.randrange(4096)) for _ in range(rng.randint(0, most))]


def _ext_header(rng: random.Random, kind: str) -> fr.ExtensionHeader:
    if kind == "hop":
        return fr.hop_by_hop(rng.randbytes(rng.choice((0, 4, 6, 14, 30))))
    if kind == "dst":
        return fr.dstopts(rng.randbytes(rng.choice((0, 4, 6, 22))))
    if kind == "routing":
        hops = [f"2001:db8:9::{n + 1:x}" for n in range(rng.randint(0, 2))]
        return fr.routing(hops, routing_type=rng.choice((0, 2, 3, 4)), segments_left=0)
    if kind == "ah":
        return fr.ah(icv=rng.randbytes(rng.choice((4, 12, 20))), spi=rng.randrange(1, 1 << 32))
    return fr.fragment(0, more=rng.random() < 0.5, identification=rng.randrange(1 << 32))


EXT_KINDS = ("hop", "dst", "routing", "ah", "frag")

# Carriers of a transport segment. The "valid" ones keep a digit a digit; the hostile ones
# make it ignored or malformed (or leave it valid, when the lie does not matter).
VALID_CARRIERS = ("plain", "v4_options", "v4_first_fragment", "v6_extensions")
HOSTILE_CARRIERS = (
    "v4_nonfirst_fragment",
    "v4_short_total",
    "v4_long_total",
    "v4_bad_ihl",
    "v6_nonfirst_fragment",
    "v6_too_many",
    "v6_exactly_eight",
    "v6_terminal",
    "v6_short_payload",
    "v6_long_payload",
    "v6_truncated_extension",
)


def ip_packet(
    rng: random.Random,
    family: int,
    src: str,
    dst: str,
    proto: int,
    transport: bytes,
    carrier: str = "plain",
) -> bytes:
    """An IPv4 or IPv6 packet carrying ``transport``, built as ``carrier`` says."""
    if family == 4:
        options = b""
        offset, more = 0, False
        if carrier == "v4_options" or (carrier == "v4_first_fragment" and rng.random() < 0.3):
            options = bytes(rng.choice((1, 7, 68, 148, 0x94)) for _ in range(rng.randint(1, 40)))
        if carrier == "v4_first_fragment":
            more = True
        elif carrier == "v4_nonfirst_fragment":
            offset, more = rng.randrange(1, 1 << 13), rng.random() < 0.5
        packet = fr.ipv4(
            src,
            dst,
            proto,
            transport,
            ttl=rng.randrange(1, 256),
            ihl_options=options,
            frag_offset=offset,
            more_fragments=more,
            identification=rng.randrange(1 << 16),
        )
        if carrier == "v4_short_total":
            total = rng.randrange(0, len(packet))
            packet = packet[:2] + struct.pack("!H", total) + packet[4:]
        elif carrier == "v4_long_total":
            total = rng.randrange(len(packet), 1 << 16)
            packet = packet[:2] + struct.pack("!H", total) + packet[4:]
        elif carrier == "v4_bad_ihl":
            packet = bytes((0x40 | rng.randrange(5),)) + packet[1:]
        return packet
    headers: list[fr.ExtensionHeader] = []
    if carrier == "v6_extensions":
        headers = [_ext_header(rng, rng.choice(EXT_KINDS)) for _ in range(rng.randint(1, 8))]
    elif carrier == "v6_exactly_eight":
        headers = [_ext_header(rng, rng.choice(EXT_KINDS)) for _ in range(8)]
    elif carrier == "v6_too_many":
        headers = [_ext_header(rng, rng.choice(EXT_KINDS)) for _ in range(rng.randint(9, 12))]
    elif carrier == "v6_nonfirst_fragment":
        headers = [_ext_header(rng, rng.choice(EXT_KINDS)) for _ in range(rng.randint(0, 3))]
        position = rng.randint(0, len(headers))
        fragment = fr.fragment(rng.randrange(1, 1 << 13), more=rng.random() < 0.5)
        headers.insert(position, fragment)
    elif carrier == "v6_truncated_extension":
        headers = [_ext_header(rng, rng.choice(EXT_KINDS)) for _ in range(rng.randint(1, 3))]
    if carrier == "v6_terminal":
        proto = rng.choice((fr.PROTO_ESP, fr.PROTO_NONE, 58, 135, 253))
        headers = [_ext_header(rng, rng.choice(EXT_KINDS)) for _ in range(rng.randint(0, 2))]
    packet = fr.ipv6(src, dst, proto, transport, headers, hop_limit=rng.randrange(256))
    if carrier == "v6_truncated_extension":
        # Claim a payload that ends inside the extension headers.
        chain = sum(len(h.data) for h in headers)
        packet = packet[:4] + struct.pack("!H", rng.randrange(chain)) + packet[6:]
    elif carrier == "v6_short_payload":
        length = len(packet) - 40  # 0 when a cut transport left nothing: claim 0 too
        packet = packet[:4] + struct.pack("!H", rng.randrange(max(length, 1))) + packet[6:]
    elif carrier == "v6_long_payload":
        packet = packet[:4] + struct.pack("!H", rng.randrange(len(packet), 1 << 16)) + packet[6:]
    return packet


def pick_carrier(rng: random.Random, profile: str) -> str:
    """``plain``: always plain; ``valid``: any digit-keeping carrier; ``hostile``: any."""
    if profile == "plain" or rng.random() < 0.5:
        return "plain"
    if profile == "valid" or rng.random() < 0.5:
        return rng.choice(VALID_CARRIERS)
    return rng.choice(HOSTILE_CARRIERS)


def transport_segment(
    rng: random.Random,
    mode: str,
    dport: int,
    flags: int = 0x02,
    payload: bytes = b"",
    sport: int | None = None,
) -> tuple[int, bytes]:
    """A TCP or UDP header to ``dport`` from ``sport`` (a random port if None)."""
    if sport is None:
        sport = rng.randrange(1, 1 << 16)
    if mode == "syn":
        return fr.PROTO_TCP, fr.tcp(sport, dport, flags, payload, seq=rng.randrange(1 << 32))
    return fr.PROTO_UDP, fr.udp(sport, dport, payload)


@dataclasses.dataclass
class Context:
    """What every event needs to build its frames."""

    layout: KnockLayout
    linktype: int
    tags: list[tuple[int, int]]  # the stream's usual VLAN tags
    hostile: bool  # may frames break the rules (more tags, odd carriers)?

    @property
    def families(self) -> tuple[int, ...]:
        return families(self.linktype)

    def link_tags(self, rng: random.Random, hostile: bool) -> list[tuple[int, int]]:
        """The stream's tags; for a hostile packet now and then others (up to 5: malformed)."""
        if hostile and self.hostile and rng.random() < 0.3:
            return random_tags(rng, 5)
        return self.tags

    def frame(self, rng: random.Random, packet: bytes, hostile: bool = False) -> bytes:
        return wrap(self.linktype, packet, self.link_tags(rng, hostile))

    def port(self, segment: int, digit: int) -> int:
        return self.layout.base_port + segment * self.layout.segment_size + digit

    def pad_mask(self, family: int) -> int:
        segments = digit_count(MESSAGE_LENGTHS[family], self.layout.digit_bits)
        return (1 << (segments * self.layout.digit_bits - 8 * MESSAGE_LENGTHS[family])) - 1


def random_knock(rng: random.Random, family: int) -> tuple[bytes, Knock]:
    """(key, fields) of a random sealable knock claiming an address of ``family``."""
    key = rng.randbytes(rng.choice((32, 64)))
    claimed = (
        ipaddress.IPv4Address(rng.randrange(1 << 32))
        if family == 4
        else ipaddress.IPv6Address((0x2001_0DB8 << 96) | rng.randrange(1 << 96))
    )
    knock = Knock(
        action=rng.choice((Action.OPEN, Action.CLOSE)),
        proto=rng.choice((Proto.TCP, Proto.UDP)),
        port=rng.randrange(1, 1 << 16),
        timestamp=rng.randrange(1 << 32),
        claimed_ip=claimed,
        user_id=rng.randrange(1 << 12),
        salt=rng.randrange(1 << 24),
        duration=rng.randrange(1 << 16),
    )
    return key, knock


# A frame with what the honest-stream checks need to know about it: (kind, owner, segment).
Meta = tuple[str, int, int] | None
Lane = list[tuple[bytes, Meta]]


def digit_frame(
    rng: random.Random,
    ctx: Context,
    family: int,
    src: str,
    dst: str,
    segment: int,
    digit: int,
    mode: str,
    profile: str,
    sport: int | None = None,
) -> bytes:
    flags = 0x02 if profile == "plain" or rng.random() < 0.7 else rng.choice(DIGIT_FLAGS)
    if profile == "hostile" and rng.random() < 0.1:
        flags = rng.choice(NON_DIGIT_FLAGS)
    proto, transport = transport_segment(rng, mode, ctx.port(segment, digit), flags, sport=sport)
    carrier = pick_carrier(rng, profile)
    packet = ip_packet(rng, family, src, dst, proto, transport, carrier)
    return ctx.frame(rng, packet, hostile=profile == "hostile")


def knock_lane(
    rng: random.Random,
    ctx: Context,
    family: int,
    src: str,
    dst: str,
    mode: str,
    message: bytes,
    *,
    complete: bool,
    shuffle: bool,
    duplicates: int,
    conflicts: int,
    pad_violation: bool,
    profile: str,
    owner: int = -1,
    tail_unique: bool = False,
    sport: int | None = None,
) -> Lane:
    """The frames of one knock from ``src``: (segment, digit) entries, then frames.

    Every packet of the knock comes from one source port (``sport``, else a random one),
    as the client sends them; a conflicting digit comes from it too (an attacker who
    guessed it, or a retransmission), now and then from another port (a blind spoofer)."""
    if sport is None:
        sport = rng.randrange(1, 1 << 16)
    size = ctx.layout.segment_size
    digits = [(p - ctx.layout.base_port) % size for p in ctx.layout.ports_for(message)]
    segments = list(range(len(digits)))
    if not complete:
        segments = rng.sample(segments, rng.randrange(len(segments)))
    if shuffle:
        rng.shuffle(segments)
    # (segment, digit, genuine, source port: None for a random one)
    entries: list[tuple[int, int, bool, int | None]] = [
        (s, digits[s], True, sport) for s in segments
    ]
    for _ in range(duplicates):
        if tail_unique and len(entries) > 1:
            # Nothing after the completing digit: a digit after it starts a new knock.
            seg, digit, _, _ = rng.choice(entries[:-1])
            entries.insert(rng.randint(0, len(entries) - 1), (seg, digit, False, sport))
        elif entries and not tail_unique:
            seg, digit, _, _ = rng.choice(entries)
            entries.insert(rng.randint(0, len(entries)), (seg, digit, False, sport))
    pad = ctx.pad_mask(family)
    if conflicts:
        # A few segments take all the conflicts, so per-segment bounds are exceeded too.
        targets = rng.sample(range(len(digits)), min(len(digits), rng.randint(1, 6)))
        for _ in range(conflicts):
            seg = rng.choice(targets)
            bogus = rng.randrange(size)
            if seg == len(digits) - 1:
                bogus &= ~pad
            where = [i for i, e in enumerate(entries) if e[0] == seg and e[2]]
            if where and rng.random() < 0.5:
                position = rng.randint(where[0] + 1, len(entries))  # after the genuine digit
            else:
                position = rng.randint(0, where[0] if where else len(entries))
            entries.insert(position, (seg, bogus, False, sport if rng.random() < 0.8 else None))
    if pad_violation and pad:
        last = len(digits) - 1
        bad = (digits[last] & ~pad) | rng.randint(1, pad)
        entries.insert(rng.randint(0, len(entries)), (last, bad, False, sport))
    return [
        (
            digit_frame(rng, ctx, family, src, dst, seg, digit, mode, profile, port),
            ("digit", owner, seg),
        )
        for seg, digit, _genuine, port in entries
    ]


def spa_frame(
    rng: random.Random, ctx: Context, family: int, src: str, dst: str, variant: str
) -> bytes:
    key, knock = random_knock(rng, rng.choice((4, 6)))
    message = seal(knock, key)
    payload = message
    if variant == "wrong_length":
        payload = rng.choice(
            (b"", message[:-1], message + b"\0", rng.randbytes(rng.randrange(0, 100)))
        )
    udp = fr.udp(rng.randrange(1, 1 << 16), ctx.layout.spa_port, payload)
    if variant == "lying_length":
        claimed = rng.choice((0, 7, len(udp) + 1, rng.randrange(1 << 16), 8 + 34, 8 + 46))
        udp = udp[:4] + struct.pack("!H", claimed) + udp[6:]
    elif variant == "short_capture":
        udp = udp[: rng.randrange(len(udp))]
    carrier = pick_carrier(rng, "hostile" if ctx.hostile else "valid")
    packet = ip_packet(rng, family, src, dst, fr.PROTO_UDP, udp, carrier)
    return ctx.frame(rng, packet, hostile=True)


def arp_payload(rng: random.Random) -> bytes:
    return struct.pack("!HHBBH", 1, 0x0800, 6, 4, rng.choice((1, 2))) + rng.randbytes(20)


def outside_port(rng: random.Random, layout: KnockLayout) -> int:
    """A port outside the knock range (of either family) and other than the SPA port."""
    knock_end = layout.base_port + (segment_counts(layout)[1] << layout.digit_bits)
    while True:
        port = rng.choice((22, 53, 80, 443, rng.randrange(1, 1 << 16)))
        if not layout.base_port <= port < knock_end and port != layout.spa_port:
            return port


def background_frame(rng: random.Random, ctx: Context, family: int, src: str, dst: str) -> bytes:
    """One packet that is never a knock digit (ignored or malformed)."""
    layout = ctx.layout
    knock_end = layout.base_port + (segment_counts(layout)[1] << layout.digit_bits)
    kind = rng.choice(
        ("arp", "lldp", "tcp_other", "tcp_knock_flags", "udp_other", "icmp", "terminal")
    )
    if kind in ("arp", "lldp"):
        ethertype = 0x0806 if kind == "arp" else 0x88CC
        body = arp_payload(rng)
        if ctx.linktype == LINKTYPE_ETHERNET:
            return fr.ethernet(body, ctx.tags, ethertype=ethertype)
        if ctx.linktype == LINKTYPE_LINUX_SLL:
            return fr.linux_sll(body, ctx.tags, protocol=ethertype)
        if ctx.linktype == LINKTYPE_LINUX_SLL2:
            return fr.linux_sll2(body, ctx.tags, protocol=ethertype)
        kind = "icmp"  # no link header to say ARP
    if kind == "tcp_other":
        # TCP to the SPA port is no SPA (that is UDP only).
        port = rng.choice((outside_port(rng, layout), layout.spa_port))
        proto, transport = transport_segment(rng, "syn", port, rng.choice(DIGIT_FLAGS))
    elif kind == "tcp_knock_flags":
        port = rng.randrange(layout.base_port, knock_end)
        proto, transport = transport_segment(rng, "syn", port, rng.choice(NON_DIGIT_FLAGS))
    elif kind == "udp_other":
        port = outside_port(rng, layout)
        proto, transport = transport_segment(rng, "udp", port, payload=rng.randbytes(20))
    elif kind == "icmp":
        proto = 1 if family == 4 else 58
        transport = bytes((8 if family == 4 else 128, 0, 0, 0)) + rng.randbytes(12)
    else:
        proto = rng.choice((fr.PROTO_ESP, 47, 132, 255))
        transport = rng.randbytes(rng.randrange(0, 40))
    packet = ip_packet(rng, family, src, dst, proto, transport, "plain")
    return ctx.frame(rng, packet, hostile=True)


def cut_or_mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    if data and rng.random() < 0.5:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    if rng.random() < 0.7:
        data = data[: rng.randrange(len(data) + 1)]
    return bytes(data)


def garbage_frame(rng: random.Random, ctx: Context) -> bytes:
    kind = rng.choice(("random", "zero", "cut", "cut", "mutate"))
    if kind == "random":
        return rng.randbytes(rng.randrange(1, 120))
    if kind == "zero":
        return b""
    family = rng.choice(ctx.families)
    src = source_address(family, rng.randrange(SOURCES_PER_FAMILY))
    segment = rng.randrange(segment_counts(ctx.layout)[0])
    proto, transport = transport_segment(
        rng, rng.choice(("syn", "udp")), ctx.port(segment, rng.randrange(16))
    )
    carrier = pick_carrier(rng, "valid")
    packet = ip_packet(rng, family, src, KNOCK_DST[family], proto, transport, carrier)
    valid = ctx.frame(rng, packet, hostile=True)
    if kind == "cut":
        return valid[: rng.randrange(len(valid))]
    return cut_or_mutate(rng, valid)


def other_knock_frame(
    rng: random.Random, ctx: Context, family: int, number: int, to_other_destination: bool = True
) -> bytes:
    """Digits that must not reach the table: IPv4-mapped IPv6 sources, IPv4 digits in
    segments only IPv6 has, and (when ``destinations`` filters) other destinations."""
    n4, n6 = segment_counts(ctx.layout)
    kinds = ["v4_past_segments"] if 4 in ctx.families else []
    kinds += ["mapped"] if 6 in ctx.families else []
    kinds += ["other_dst"] if to_other_destination else []
    kind = rng.choice(kinds)
    mode = rng.choice(("syn", "udp"))
    digit = rng.randrange(ctx.layout.segment_size)
    if kind == "mapped":
        proto, transport = transport_segment(rng, mode, ctx.port(rng.randrange(n4), digit))
        packet = fr.ipv6(mapped_address(number), KNOCK_DST[6], proto, transport)
    elif kind == "v4_past_segments":
        proto, transport = transport_segment(rng, mode, ctx.port(rng.randrange(n4, n6), digit))
        packet = fr.ipv4(source_address(4, number), KNOCK_DST[4], proto, transport)
    else:
        proto, transport = transport_segment(rng, mode, ctx.port(rng.randrange(n4), digit))
        src = source_address(family, number)
        packet = ip_packet(rng, family, src, OTHER_DST[family], proto, transport)
    return ctx.frame(rng, packet, hostile=True)


# --- streams ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Stream:
    """One capture file's worth of packets and the engine settings to read it with."""

    layout: KnockLayout
    linktype: int
    fmt: str
    nanosecond: bool
    byte_order: str
    capacity: int
    ring_capacity: int
    knock_timeout: float
    destinations: tuple[str, ...]
    packets: list[tuple[int, bytes]]  # (microseconds after T0, frame)
    batches: tuple[int, ...] = (-1,)
    group_by: str = GROUP_BY_ADDRESS_AND_PORT
    forgets: tuple[tuple[int, str], ...] = ()  # (after batch number, address)
    expected: list[Any] = dataclasses.field(default_factory=list)  # honest streams only

    def __repr__(self) -> str:
        layout = self.layout
        return (
            f"<Stream of {len(self.packets)} packets, linktype {self.linktype}, {self.fmt}"
            f"{' ns' if self.nanosecond else ''} {self.byte_order}, layout "
            f"{layout.base_port}/{layout.digit_bits}/{layout.spa_port}, capacity "
            f"{self.capacity}, ring {self.ring_capacity}, timeout {self.knock_timeout}, "
            f"destinations {self.destinations}, group_by {self.group_by}, batches "
            f"{self.batches}, forgets {self.forgets}>"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # hypothesis prints this, not every frame

    def engine_kwargs(self) -> dict[str, Any]:
        return {
            "knock_timeout": self.knock_timeout,
            "capacity": self.capacity,
            "ring_capacity": self.ring_capacity,
            "destinations": tuple(ipaddress.ip_address(a) for a in self.destinations),
            "group_by": self.group_by,
        }

    def write(self, path: str) -> None:
        with CaptureWriter(
            path,
            self.linktype,
            format=self.fmt,
            nanosecond=self.nanosecond,
            byte_order=self.byte_order,
        ) as writer:
            for number, (offset, data) in enumerate(self.packets):
                sec, usec = divmod(T0 * 1_000_000 + offset, 1_000_000)
                nsec = usec * 1000 + (number * 7919) % 1000 if self.nanosecond else None
                writer.write(sec, usec, data, nsec=nsec)

    def replace(self, **changes: Any) -> Stream:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """Settings and frames as a Python literal a regression test can paste."""
        layout = self.layout
        lines = [
            "Stream(",
            f"    layout=KnockLayout(base_port={layout.base_port}, "
            f"digit_bits={layout.digit_bits}, spa_port={layout.spa_port}),",
            f"    linktype={self.linktype}, fmt={self.fmt!r}, nanosecond={self.nanosecond}, "
            f"byte_order={self.byte_order!r},",
            f"    capacity={self.capacity}, ring_capacity={self.ring_capacity}, "
            f"knock_timeout={self.knock_timeout}, destinations={self.destinations!r},",
            f"    batches={self.batches!r}, forgets={self.forgets!r}, group_by={self.group_by!r},",
            "    packets=[",
        ]
        lines += [
            f"        ({offset}, bytes.fromhex({data.hex()!r}))," for offset, data in self.packets
        ]
        lines += ["    ],", ")"]
        return "\n".join(lines)


@st.composite
def layouts(draw: st.DrawFn) -> KnockLayout:
    """A KnockLayout whose IPv6 range (the longer one) fits below 65536, and an SPA port
    outside it."""
    bits = draw(st.sampled_from((8, 4, 6, 10)))
    span = digit_count(MESSAGE_LEN_IPV6, bits) << bits
    if draw(st.booleans()):
        base = draw(st.sampled_from((20000, 1, 65535 - span)))
    else:
        base = draw(st.integers(1, 65535 - span))
    below = st.integers(1, base - 1) if base > 1 else st.nothing()
    above = st.integers(base + span, 65535) if base + span <= 65535 else st.nothing()
    spa = draw(st.one_of(above, below))
    layout = KnockLayout(base_port=base, digit_bits=bits, spa_port=spa)
    segment_counts(layout)  # raises if the ranges do not fit
    return layout


file_formats = st.sampled_from(
    [
        ("pcap", False, "little"),
        ("pcap", True, "little"),
        ("pcapng", False, "little"),
        ("pcap", False, "big"),
        ("pcapng", True, "big"),
        ("pcapng", True, "little"),
    ]
)


def interleave(rng: random.Random, lanes: list[Lane], mix: str) -> Lane:
    """All lanes' frames: one after another, randomly merged (each lane's order kept),
    or fully shuffled."""
    if mix == "sequential":
        return [item for lane in lanes for item in lane]
    if mix == "shuffle":
        merged = [item for lane in lanes for item in lane]
        rng.shuffle(merged)
        return merged
    queues = [list(reversed(lane)) for lane in lanes if lane]
    merged = []
    while queues:
        index = rng.randrange(len(queues))
        merged.append(queues[index].pop())
        if not queues[index]:
            queues.pop(index)
    return merged


@dataclasses.dataclass(frozen=True)
class Timing:
    """How packet times advance: gaps of up to ``gap`` knock timeouts, sometimes a jump of
    about ``jump`` timeouts (exactly, one microsecond either side, or up to three times),
    sometimes the same time again, sometimes backwards."""

    gap: float
    p_jump: float
    jump: float
    p_equal: float
    p_back: float

    def times(self, rng: random.Random, count: int, timeout_us: int) -> list[int]:
        now = rng.randrange(0, 1_000_000)
        times = []
        for _ in range(count):
            roll = rng.random()
            if roll < self.p_equal:
                pass
            elif roll < self.p_equal + self.p_back:
                now -= rng.randint(1, max(1, min(timeout_us, 3_000_000)))
            elif roll < self.p_equal + self.p_back + self.p_jump:
                exact = round(self.jump * timeout_us)
                now += rng.choice((exact, exact + 1, exact - 1, rng.randint(1, 3 * exact + 1)))
            else:
                now += rng.randint(0, round(self.gap * timeout_us))
            times.append(now)
        return times


timings = st.builds(
    Timing,
    # Mostly gaps that let knocks complete, sometimes ones that expire them.
    gap=st.sampled_from((0.0001, 0.0, 0.0001, 0.001, 0.001, 0.003, 0.01, 0.05, 0.3)),
    p_jump=st.sampled_from((0.0, 0.0, 0.005, 0.02, 0.2)),
    jump=st.sampled_from((1.0, 0.5, 2.0)),
    p_equal=st.sampled_from((0.0, 0.1, 0.5)),
    p_back=st.sampled_from((0.0, 0.0, 0.01, 0.2)),
)


def knock_events(linktype: int) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(
        st.just(KIND_KNOCK),
        st.sampled_from(families(linktype)),
        st.integers(0, SOURCES_PER_FAMILY - 1),  # source
        st.sampled_from(("syn", "udp")),
        st.sampled_from((True, True, False)),  # complete
        st.booleans(),  # shuffle
        st.sampled_from((0, 0, 1, 5)),  # duplicates
        st.sampled_from((0, 0, 0, 1, 3, 12)),  # conflicts
        st.sampled_from((False, False, True)),  # pad violation
        st.sampled_from(("plain", "valid", "plain", "valid", "hostile")),  # carriers
        st.integers(0, 2**32 - 1),  # seed for the rest
    )


def other_events(linktype: int) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(
        st.sampled_from((KIND_SPA, KIND_BACKGROUND, KIND_GARBAGE, KIND_FLOOD)),
        st.sampled_from(families(linktype)),
        st.integers(0, SOURCES_PER_FAMILY - 1),
        st.sampled_from(("good", "wrong_length", "lying_length", "short_capture")),
        st.integers(1, 12),  # packets
        st.integers(0, 2**32 - 1),
    )


def event_lane(rng: random.Random, ctx: Context, event: tuple[Any, ...]) -> Lane:
    kind = event[0]
    if kind == KIND_KNOCK:
        (_k, family, number, mode, complete, shuffle, dups, conflicts, pad, profile, seed) = event
        rng = random.Random(seed)
        # The message claims the source's family, now and then the other (it cannot complete).
        key, knock = random_knock(rng, family if rng.random() < 0.9 else 10 - family)
        dst = KNOCK_DST[family] if rng.random() < 0.9 else OTHER_DST[family]
        return knock_lane(
            rng,
            ctx,
            family,
            source_address(family, number),
            dst,
            mode,
            seal(knock, key),
            complete=complete,
            shuffle=shuffle,
            duplicates=dups,
            conflicts=conflicts,
            pad_violation=pad,
            profile=profile,
        )
    _kind, family, number, variant, count, seed = event
    rng = random.Random(seed)
    src = source_address(family, number)
    dst = KNOCK_DST[family]
    if kind == KIND_SPA:
        return [(spa_frame(rng, ctx, family, src, dst, variant), None) for _ in range(count)]
    if kind == KIND_BACKGROUND:
        lane: Lane = []
        for _ in range(count):
            if rng.random() < 0.3:
                lane.append((other_knock_frame(rng, ctx, family, number), None))
            else:
                lane.append((background_frame(rng, ctx, family, src, dst), None))
        return lane
    if kind == KIND_FLOOD:
        return [(frame, None) for frame in flood_frames(rng, ctx, count * 25)]
    return [(garbage_frame(rng, ctx), None) for _ in range(count)]


def flood_frames(rng: random.Random, ctx: Context, count: int) -> list[bytes]:
    """Digits from ``count`` spoofed sources, some repeated: they churn the table and its
    index (evictions, expiry, deletions) while knocks are in progress."""
    n4, _n6 = segment_counts(ctx.layout)
    frames = []
    for _ in range(count):
        family = rng.choice(ctx.families)
        number = rng.randrange(count * 2)
        if family == 4:
            src = str(ipaddress.IPv4Address("198.18.0.0") + number)
        else:
            src = str(ipaddress.IPv6Address("2001:db8:f::") + (number << rng.choice((0, 64))))
        for _ in range(rng.choice((1, 1, 1, 2))):
            segment, digit = rng.randrange(n4 - 1), rng.randrange(ctx.layout.segment_size)
            proto, transport = transport_segment(
                rng, rng.choice(("syn", "udp")), ctx.port(segment, digit)
            )
            packet = ip_packet(rng, family, src, KNOCK_DST[family], proto, transport)
            frames.append(ctx.frame(rng, packet))
    return frames


@st.composite
def streams(draw: st.DrawFn, max_events: int = 10) -> Stream:
    """A stream for the differential test: anything goes."""
    layout = draw(layouts())
    linktype = draw(st.sampled_from(ALL_LINKTYPES))
    fmt, nanosecond, byte_order = draw(file_formats)
    # Every value, with the roomy tables (where knocks complete) twice as likely.
    capacity = draw(st.sampled_from(CAPACITIES + (64, 65536)))
    ring_capacity = draw(st.sampled_from(RING_CAPACITIES))
    knock_timeout = draw(st.sampled_from(KNOCK_TIMEOUTS))
    destination_sets = ("any", "knock", "any", "knock", "any", "knock4", "knock6", "other")
    destinations = DESTINATION_SETS[draw(st.sampled_from(destination_sets))]
    events = draw(
        st.lists(
            st.one_of(knock_events(linktype), other_events(linktype)),
            min_size=1,
            max_size=max_events,
        )
    )
    mix = draw(st.sampled_from(("interleave", "sequential", "shuffle")))
    timing = draw(timings)
    batches = tuple(draw(st.lists(st.sampled_from(BATCH_SIZES), min_size=1, max_size=4)))
    forget_sources = st.builds(source_address, st.sampled_from((4, 6)), st.integers(0, 4))
    forgets = tuple(draw(st.lists(st.tuples(st.integers(0, 30), forget_sources), max_size=2)))
    group_by = draw(st.sampled_from(GROUP_BY))
    seed = draw(st.integers(0, 2**32 - 1))

    return build_stream(
        layout,
        linktype,
        (fmt, nanosecond, byte_order),
        (capacity, ring_capacity, knock_timeout, destinations),
        events,
        mix,
        timing,
        batches,
        forgets,
        seed,
        group_by,
    )


def build_stream(
    layout: KnockLayout,
    linktype: int,
    file_format: tuple[str, bool, str],
    engine_settings: tuple[int, int, float, tuple[str, ...]],
    events: Sequence[tuple[Any, ...]],
    mix: str,
    timing: Timing,
    batches: tuple[int, ...],
    forgets: tuple[tuple[int, str], ...],
    seed: int,
    group_by: str = GROUP_BY_ADDRESS_AND_PORT,
) -> Stream:
    fmt, nanosecond, byte_order = file_format
    capacity, ring_capacity, knock_timeout, destinations = engine_settings
    rng = random.Random(seed)
    ctx = Context(layout, linktype, random_tags(rng, rng.choice((0, 0, 1, 2, 4))), hostile=True)
    lanes = [event_lane(rng, ctx, event) for event in events]
    frames = [frame for frame, _meta in interleave(rng, lanes, mix)]
    times = timing.times(rng, len(frames), round(knock_timeout * 1e6))
    return Stream(
        layout=layout,
        linktype=linktype,
        fmt=fmt,
        nanosecond=nanosecond,
        byte_order=byte_order,
        capacity=capacity,
        ring_capacity=ring_capacity,
        knock_timeout=knock_timeout,
        destinations=destinations,
        packets=list(zip(times, frames, strict=True)),
        batches=batches,
        forgets=forgets,
        group_by=group_by,
    )


def seeded_stream(linktype: int, seed: int, count: int = 16) -> Stream:
    """A fixed stream, no hypothesis: every kind of event, for a deterministic check."""
    rng = random.Random(seed * 1000 + linktype)
    fams = families(linktype)
    events: list[tuple[Any, ...]] = []
    for number in range(count):
        family, source = rng.choice(fams), rng.randrange(SOURCES_PER_FAMILY)
        if number % 2 == 0:
            events.append(
                (
                    KIND_KNOCK,
                    family,
                    source,
                    rng.choice(("syn", "udp")),
                    number % 6 != 4,  # complete
                    rng.random() < 0.7,  # shuffle
                    rng.choice((0, 1, 5)),  # duplicates
                    rng.choice((0, 0, 3, 12)),  # conflicts
                    number % 8 == 6,  # pad violation
                    rng.choice(("plain", "valid", "hostile")),
                    rng.randrange(2**32),
                )
            )
        else:
            kind = (KIND_SPA, KIND_BACKGROUND, KIND_GARBAGE, KIND_FLOOD)[number // 2 % 4]
            variant = rng.choice(("good", "wrong_length", "lying_length", "short_capture"))
            events.append((kind, family, source, variant, rng.randint(1, 12), rng.randrange(2**32)))
    layout = KnockLayout(base_port=20000, digit_bits=(4, 6, 8, 10)[seed % 4], spa_port=62201)
    return build_stream(
        layout,
        linktype,
        (("pcap", False, "little"), ("pcapng", True, "big"))[seed % 2],
        ((8, 64, 3, 65536)[seed % 4], 3, 0.5, DESTINATION_SETS["knock"]),
        events,
        "interleave",
        Timing(gap=0.001, p_jump=0.02, jump=1.0, p_equal=0.1, p_back=0.02),
        (5, -1, 1),
        ((3, source_address(fams[0], 0)),),
        seed,
        GROUP_BY[seed % 3 % 2],  # seeds 0-3: port, address, port, port
    )


# --- honest streams ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Expected:
    """A completion an honest stream must produce: the record fields, and how to open it."""

    kind: int  # 1 knock, 2 SPA
    family: int
    source: bytes  # 16-byte key
    destination: bytes
    message: bytes
    offset: int  # packet time, microseconds after T0
    key: bytes
    knock: Knock


@st.composite
def honest_streams(draw: st.DrawFn) -> Stream:
    """Complete, unpoisoned knocks from distinct sources, all within the timeout, in a table
    that cannot evict (capacity >= every source that sends a digit); around them partial
    knocks from other sources, SPA datagrams and traffic that is never a digit."""
    layout = draw(layouts())
    linktype = draw(st.sampled_from(ALL_LINKTYPES))
    fmt, nanosecond, byte_order = draw(file_formats)
    ring_capacity = draw(st.sampled_from(RING_CAPACITIES))
    knock_timeout = draw(st.sampled_from((0.5, 10.0)))
    destinations = DESTINATION_SETS[draw(st.sampled_from(("any", "knock")))]
    fams = families(linktype)
    knocks = draw(
        st.lists(
            st.tuples(
                st.sampled_from(fams),
                st.sampled_from(("syn", "udp")),
                st.booleans(),  # shuffle
                st.sampled_from((0, 0, 3)),  # duplicates
            ),
            min_size=1,
            max_size=5,
        )
    )
    partials = draw(st.lists(st.sampled_from(fams), max_size=3))
    spas = draw(st.lists(st.sampled_from(fams), max_size=3))
    background = draw(st.integers(0, 20))
    # No "shuffle" of the merged stream: a duplicate could then follow the completing digit
    # and start a new knock (each lane is shuffled on its own).
    mix = draw(st.sampled_from(("interleave", "sequential")))
    gap = draw(st.sampled_from((0, 1, 50)))
    digit_sources = len(knocks) + len(partials)
    capacity = draw(st.sampled_from((digit_sources, digit_sources + 1, 64, 65536)))
    group_by = draw(st.sampled_from(GROUP_BY))
    batches = tuple(draw(st.lists(st.sampled_from(BATCH_SIZES), min_size=1, max_size=3)))
    seed = draw(st.integers(0, 2**32 - 1))

    rng = random.Random(seed)
    ctx = Context(layout, linktype, random_tags(rng, rng.choice((0, 1, 4))), hostile=False)
    lanes: list[Lane] = []
    sealed: list[tuple[int, str, bytes, Knock, bytes]] = []  # family, source, key, knock, msg
    counter = {4: 0, 6: 0}

    def next_source(family: int) -> str:
        counter[family] += 1
        return source_address(family, counter[family])

    for owner, (family, mode, shuffle, duplicates) in enumerate(knocks):
        src = next_source(family)
        key, knock = random_knock(rng, family)
        message = seal(knock, key)
        sealed.append((family, src, key, knock, message))
        lane = knock_lane(
            rng,
            ctx,
            family,
            src,
            KNOCK_DST[family],
            mode,
            message,
            complete=True,
            shuffle=shuffle,
            duplicates=duplicates,
            conflicts=0,
            pad_violation=False,
            profile="valid",
            owner=owner,
            tail_unique=True,
        )
        # Traffic from the knocking source that is never a digit.
        for _ in range(rng.randint(0, 3)):
            lane.insert(
                rng.randint(0, len(lane)),
                (background_frame(rng, ctx, family, src, KNOCK_DST[family]), None),
            )
        lanes.append(lane)
    for family in partials:
        partial_key, knock = random_knock(rng, family)
        lane = knock_lane(
            rng,
            ctx,
            family,
            next_source(family),
            KNOCK_DST[family],
            rng.choice(("syn", "udp")),
            seal(knock, partial_key),
            complete=False,
            shuffle=True,
            duplicates=1,
            conflicts=0,  # a bogus digit could fill a missing segment and complete it
            pad_violation=False,
            profile="valid",
        )
        lanes.append(lane)
    for number, family in enumerate(spas):
        src = source_address(family, 200 + number % 40)
        key, knock = random_knock(rng, rng.choice((4, 6)))
        message = seal(knock, key)
        sealed.append((family, src, key, knock, message))
        udp = fr.udp(rng.randrange(1, 1 << 16), layout.spa_port, message)
        packet = ip_packet(rng, family, src, KNOCK_DST[family], fr.PROTO_UDP, udp, "plain")
        lanes.append([(ctx.frame(rng, packet), ("spa", len(sealed) - 1, 0))])
    for _ in range(background):
        family = rng.choice(fams)
        src = source_address(family, 100 + rng.randrange(50))
        kind = rng.random()
        if kind < 0.5:
            frame = background_frame(rng, ctx, family, src, KNOCK_DST[family])
        elif kind < 0.7:
            frame = rng.randbytes(rng.randrange(0, 20))  # always shorter than any IP header
        else:
            # To other destinations only when the engine filters them: else they are digits
            # from yet more sources, which could evict.
            number = 100 + rng.randrange(50)
            frame = other_knock_frame(rng, ctx, family, number, bool(destinations))
        lanes.append([(frame, None)])

    merged = interleave(rng, lanes, mix)
    now = rng.randrange(0, 1_000_000)
    packets: list[tuple[int, bytes]] = []
    expected: list[Expected] = []
    seen: dict[int, set[int]] = {}
    done: set[int] = set()
    for frame, meta in merged:
        now += rng.randint(0, gap)
        packets.append((now, frame))
        if meta is None:
            continue
        what, owner, segment = meta
        if what == "spa":
            family, src, key, knock, message = sealed[owner]
            expected.append(
                Expected(2, family, _key(src), _key(KNOCK_DST[family]), message, now, key, knock)
            )
            continue
        if owner < 0 or owner in done:
            continue  # a partial knock, or a duplicate after the completion
        family, src, key, knock, message = sealed[owner]
        filled = seen.setdefault(owner, set())
        filled.add(segment)
        if len(filled) == digit_count(len(message), layout.digit_bits):
            done.add(owner)
            expected.append(
                Expected(1, family, _key(src), _key(KNOCK_DST[family]), message, now, key, knock)
            )
    assert packets[-1][0] - packets[0][0] < knock_timeout * 1e6
    return Stream(
        layout=layout,
        linktype=linktype,
        fmt=fmt,
        nanosecond=nanosecond,
        byte_order=byte_order,
        capacity=capacity,
        ring_capacity=ring_capacity,
        knock_timeout=knock_timeout,
        destinations=destinations,
        packets=packets,
        batches=batches,
        expected=expected,
        group_by=group_by,
    )


def _key(address: str) -> bytes:
    return address_key(ipaddress.ip_address(address))


# --- hostile frames ---------------------------------------------------------------------------


def valid_templates(linktype: int, layout: KnockLayout) -> list[bytes]:
    """Valid frames of every shape for ``linktype``: seeds for mutation."""
    rng = random.Random(linktype * 65536 + layout.base_port)
    ctx = Context(layout, linktype, [], hostile=False)
    templates = []
    n4, _n6 = segment_counts(layout)
    for family in ctx.families:
        src, dst = source_address(family, 1), KNOCK_DST[family]
        for mode in ("syn", "udp"):
            for carrier in VALID_CARRIERS + HOSTILE_CARRIERS:
                proto, transport = transport_segment(rng, mode, ctx.port(rng.randrange(n4), 3))
                packet = ip_packet(rng, family, src, dst, proto, transport, carrier)
                templates.append(wrap(linktype, packet, random_tags(rng, 4)))
        key, knock = random_knock(rng, family)
        udp = fr.udp(1234, layout.spa_port, seal(knock, key))
        templates.append(wrap(linktype, ip_packet(rng, family, src, dst, fr.PROTO_UDP, udp)))
    return templates


def mutate(template: bytes, flips: Sequence[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(template)
    for position, value in flips:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    return bytes(data)


def hostile_frames(
    linktype: int, layout: KnockLayout, max_size: int = 80
) -> st.SearchStrategy[list[bytes]]:
    templates = valid_templates(linktype, layout)
    mutated = st.builds(
        mutate,
        st.sampled_from(templates),
        st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
        st.one_of(st.none(), st.integers(0, 200)),
    )
    frame = st.one_of(st.binary(max_size=120), mutated, mutated)
    return st.lists(frame, min_size=1, max_size=max_size)
