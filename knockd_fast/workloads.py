"""Deterministic capture files of synthetic workloads: what `knockd-fast bench` and the
harnesses in bench/ (bench/README.md) feed the engine and the judge.

Two kinds, both classic pcap with Ethernet frames:

``knocks``
    ``sources`` concurrent knockers ("lanes"). Each knock is a real message, sealed with
    ``knock_client.protocol.seal`` (by default under a fixed key, ``BENCH_KEY``, for user
    ``USER_ID``; ``Sealing`` names another key, user and port, e.g. from a configuration)
    with the ``KnockLayout`` given, sent in syn mode with its ports shuffled; the lanes are
    interleaved at random, so up to ``sources`` knocks are in progress at once. A
    ``garbage_share`` of the knocks carry a valid header and random bytes instead of a
    sealed message: whole knocks that only the judge can refuse. Background takes
    ``background_share`` of the packets: TCP ACKs and data to port 443, UDP to 53, ARP
    (``background="traffic"``), or a spoofed flood of SYNs into the knock range
    (``"flood"``). Without ``packets`` every lane sends one whole knock. With ``packets``
    the file has that many packets: if the knock share holds at least one whole knock per
    lane, each lane sends knocks back to back, every knock from a fresh source address (so
    at most ``sources`` are in progress at any time); if it does not, each of the
    ``sources`` knockers sends only the first ``packets * (1 - background_share) //
    sources`` ports of its shuffled knock (at least one), and the file ends with that many
    partial knocks in the engine's table: what the sweep over concurrent sources measures
    at large K.

``flood``
    ``packets`` TCP SYNs into the IPv4 knock range (random segment and digit) from
    ``sources`` random addresses, no background.

Packets are 1 microsecond apart (from ``START_SEC``), so nothing expires under a 10 s
knock timeout. Frames longer than ``snaplen`` (default: the engine's live SNAPLEN)
are cut as a live capture would cut them. Addresses are arbitrary: nothing is ever sent.
A file's name encodes every parameter; an existing file is reused (``force`` rewrites).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from knock_client.protocol import Action, Knock, KnockLayout, Proto, encode_header, seal
from knockd_fast import frames
from knockd_fast.capture_spec import LINKTYPE_ETHERNET, SNAPLEN, segment_counts
from knockd_fast.pcapfile import CaptureWriter

GENERATOR_VERSION = 1  # part of every file name: bump when the output for given options changes
HERE = Path(".")  # where files go unless told: the bench harnesses and `bench` say where
BENCH_KEY = hashlib.sha512(b"knockd-fast benchmark key").digest()  # 64 bytes: AES-256-SIV
START_SEC = 1_700_000_000
USER_ID = 1
OPEN_PORT = 22

SERVER_V4 = ipaddress.IPv4Address("192.0.2.1")
SERVER_V6 = ipaddress.IPv6Address("2001:db8::1")
KNOCKER_V4 = int(ipaddress.IPv4Address("198.18.0.0"))  # 198.18.0.0/15 and on upwards
KNOCKER_V6 = int(ipaddress.IPv6Address("2001:db8:1::"))
CLIENT_V4 = int(ipaddress.IPv4Address("100.64.0.0"))  # background clients
CLIENT_V6 = int(ipaddress.IPv6Address("2001:db8:2::"))
BACKGROUND_CLIENTS = 4096
FLOOD_SOURCES = 130_000  # spoofed addresses of a flood background
DATA_PAYLOAD = 1200  # bytes of a TCP data segment (cut to snaplen in the file)

# Background packet kinds and their shares of the background.
BG_TCP_ACK, BG_TCP_DATA, BG_DNS, BG_ARP = range(4)
BACKGROUND_MIX = {BG_TCP_ACK: 0.30, BG_TCP_DATA: 0.30, BG_DNS: 0.25, BG_ARP: 0.15}

TCP_SYN, TCP_ACK, TCP_PSH = 0x02, 0x10, 0x08
ETHERTYPE_ARP = 0x0806
_ETH_IPV4 = 14 + 20  # Ethernet + IPv4 header: the per-source prefix of a knock frame
_ETH_IPV6 = 14 + 40


BACKGROUNDS = ("traffic", "flood")  # what the background packets of a knocks file are


@dataclass(frozen=True)
class Sealing:
    """Whose knocks a knocks file carries: the key they are sealed with, the user id in
    their header, the port and protocol they open."""

    key: bytes = BENCH_KEY
    user_id: int = USER_ID
    port: int = OPEN_PORT
    proto: Proto = Proto.TCP


@dataclass
class CaptureFile:
    """A generated capture file and its shape (what an engine should count in it)."""

    path: Path
    kind: str
    params: dict[str, object]
    packets: int
    knock_packets: int
    background_packets: int
    knocks: int  # knocks started (distinct knocking sources)
    complete_knocks: int  # knocks whose every port is in the file
    lanes: int  # knocks in progress at once, at most
    extra: dict[str, object] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["bytes"] = self.path.stat().st_size if self.path.exists() else None
        return data


def _rngs(seed: int, kind: str, count: int) -> list[np.random.Generator]:
    tag = int.from_bytes(kind.encode(), "big")
    return [np.random.default_rng(s) for s in np.random.SeedSequence([seed, tag]).spawn(count)]


def _digits(messages: list[bytes], digit_bits: int) -> np.ndarray:
    """(n, N) digits of equal-length messages, as knock_client.protocol.message_to_digits."""
    length = len(messages[0])
    count = -(-length * 8 // digit_bits)
    bits = np.unpackbits(np.frombuffer(b"".join(messages), np.uint8).reshape(-1, length), axis=1)
    bits = np.pad(bits, ((0, 0), (0, count * digit_bits - length * 8)))
    weights = (1 << np.arange(digit_bits - 1, -1, -1)).astype(np.int64)
    return bits.reshape(len(messages), count, digit_bits).astype(np.int64) @ weights


def _address(base: int, index: int, v6: bool) -> bytes:
    # frames accepts packed addresses (ipaddress.ip_address(bytes)): faster than str or objects.
    return (base + index).to_bytes(16 if v6 else 4, "big")


# --- knocks ---------------------------------------------------------------------------------


@dataclass
class _KnockPlan:
    shape: CaptureFile
    v6: np.ndarray  # per knock: IPv6 source?
    kept: np.ndarray  # per knock: ports sent (whole knock or a prefix of the shuffled one)
    knock_at: np.ndarray  # per knock packet, in file order: its knock
    slot_at: np.ndarray  # ... and which of that knock's shuffled ports
    is_background: np.ndarray  # per file packet
    garbage: np.ndarray  # per knock: random bytes behind a valid header?


def plan_knocks(
    sources: int,
    packets: int | None = None,
    background_share: float = 0.5,
    ipv6_share: float = 0.0,
    seed: int = 1,
    layout: KnockLayout | None = None,
    out_dir: Path = HERE,
    garbage_share: float = 0.0,
    background: str = "traffic",
) -> _KnockPlan:
    """The cheap part of a knocks file: who sends which port when (no sealing, no I/O)."""
    layout = layout or KnockLayout()
    if not 0 <= garbage_share <= 1:
        raise ValueError("garbage_share must be in [0, 1]")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}")
    if sources < 1:
        raise ValueError("sources must be at least 1")
    if not 0 <= background_share < 1:
        raise ValueError("background_share must be in [0, 1)")
    if not 0 <= ipv6_share <= 1:
        raise ValueError("ipv6_share must be in [0, 1]")
    n4, n6 = segment_counts(layout)
    rng_family, rng_order, rng_background = _rngs(seed, "knocks", 3)
    if packets is None:
        v6 = rng_family.random(sources) < ipv6_share
        lengths = np.where(v6, n6, n4)
        kept = lengths
    else:
        budget = round(packets * (1 - background_share))
        v6 = rng_family.random(max(sources, budget // n4 + 1)) < ipv6_share
        lengths = np.where(v6, n6, n4)
        whole = int(np.searchsorted(np.cumsum(lengths), budget, side="right"))
        if whole >= sources:  # lanes send whole knocks back to back
            v6, lengths = v6[:whole], lengths[:whole]
            kept = lengths
        else:  # one partial knock per lane
            v6, lengths = v6[:sources], lengths[:sources]
            kept = np.minimum(lengths, max(1, budget // sources))
    n_knocks = len(v6)
    knock_packets = int(kept.sum())
    if packets is None:
        total = round(knock_packets / (1 - background_share))
    else:
        total = max(packets, knock_packets)
    n_background = total - knock_packets

    # Lane l sends knocks l, l + sources, l + 2 * sources, ... one after the other.
    lane = np.arange(n_knocks) % sources
    lane_major = np.lexsort((np.arange(n_knocks), lane))
    knock_seq = np.repeat(lane_major, kept[lane_major])
    starts = np.repeat(np.cumsum(kept[lane_major]) - kept[lane_major], kept[lane_major])
    slot_seq = np.arange(knock_packets) - starts
    # A random arrangement of the lanes' packets (a uniform random interleaving): the k-th
    # occurrence of lane l in `order` carries lane l's k-th packet.
    order = rng_order.permutation(lane[knock_seq])
    positions = np.argsort(order, kind="stable")
    knock_at = np.empty(knock_packets, np.int64)
    slot_at = np.empty(knock_packets, np.int64)
    knock_at[positions] = knock_seq
    slot_at[positions] = slot_seq
    is_background = np.zeros(total, bool)
    if n_background:
        is_background[rng_background.choice(total, n_background, replace=False)] = True
    (rng_garbage,) = _rngs(seed, "garbage", 1)
    garbage = rng_garbage.random(n_knocks) < garbage_share

    params = {
        "sources": sources,
        "packets": packets,
        "background_share": background_share,
        "ipv6_share": ipv6_share,
        "seed": seed,
        "layout": asdict(layout),
        "garbage_share": garbage_share,
        "background": background,
    }
    path = knocks_path(
        sources, packets, background_share, ipv6_share, seed, layout, out_dir, garbage_share,
        background,
    )  # fmt: skip
    shape = CaptureFile(
        path=path,
        kind="knocks",
        params=params,
        packets=total,
        knock_packets=knock_packets,
        background_packets=n_background,
        knocks=n_knocks,
        complete_knocks=int((kept == lengths).sum()),
        lanes=min(sources, n_knocks),
        extra={
            "ipv6_knocks": int(v6.sum()),
            "ports_per_knock_max": int(kept.max()),
            "garbage_knocks": int(garbage.sum()),
            "complete_garbage_knocks": int((garbage & (kept == lengths)).sum()),
        },
    )
    return _KnockPlan(shape, v6, kept, knock_at, slot_at, is_background, garbage)


def knocks_path(
    sources: int,
    packets: int | None = None,
    background_share: float = 0.5,
    ipv6_share: float = 0.0,
    seed: int = 1,
    layout: KnockLayout | None = None,
    out_dir: Path = HERE,
    garbage_share: float = 0.0,
    background: str = "traffic",
) -> Path:
    """Where ``make_knocks`` writes (and looks for) the file of these options."""
    extra = ""
    if garbage_share or background != "traffic":  # older files keep their names
        extra = f"-G{garbage_share:g}-B{background}"
    name = (
        f"knocks-k{sources}-p{packets if packets is not None else 'auto'}"
        f"-bg{background_share:g}-v6{ipv6_share:g}-s{seed}{_layout_tag(layout or KnockLayout())}"
        f"-g{GENERATOR_VERSION}{extra}.pcap"
    )
    return Path(out_dir) / name


def _layout_tag(layout: KnockLayout) -> str:
    if layout == KnockLayout():
        return ""
    return f"-L{layout.base_port}.{layout.digit_bits}.{layout.spa_port}"


def knock_ports(
    plan: _KnockPlan,
    layout: KnockLayout,
    seed: int,
    timestamp: int = START_SEC,
    sealing: Sealing = Sealing(),
) -> list[list[int]]:
    """Each knock's ports, shuffled: sealed messages, digits, a per-knock permutation.

    Messages are dated ``timestamp``: a live daemon judges them against its clock, so a
    live benchmark seals with the time of the run (the files of ``make_knocks`` use
    START_SEC, the time of their packets, for ``knockd-fast replay``). The plan's garbage
    knocks carry ``sealing``'s header and random bytes.
    """
    (rng_shuffle,) = _rngs(seed, "shuffle", 1)
    (rng_bytes,) = _rngs(seed, "garbage-bytes", 1)
    header = encode_header(sealing.user_id)
    garbage = plan.garbage.tolist()
    ports: list[list[int]] = [[] for _ in range(len(plan.v6))]
    v4_index = v6_index = 0
    sources: list[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address]] = []
    for knock, is_v6 in enumerate(plan.v6.tolist()):
        if is_v6:
            sources.append((knock, ipaddress.IPv6Address(KNOCKER_V6 + v6_index)))
            v6_index += 1
        else:
            sources.append((knock, ipaddress.IPv4Address(KNOCKER_V4 + v4_index)))
            v4_index += 1
    for family in (4, 6):
        group = [(k, a) for k, a in sources if a.version == family]
        if not group:
            continue
        length = len(seal(Knock(Action.OPEN, sealing.proto, sealing.port, timestamp,
                                group[0][1], sealing.user_id, 0), sealing.key))  # fmt: skip
        messages = [
            header + rng_bytes.bytes(length - len(header))
            if garbage[k]
            else seal(
                Knock(Action.OPEN, sealing.proto, sealing.port, timestamp, a, sealing.user_id,
                      k % (1 << 24)),
                sealing.key,
            )  # fmt: skip
            for k, a in group
        ]
        digits = _digits(messages, layout.digit_bits)
        assert list(
            digits[0] + layout.base_port + np.arange(digits.shape[1]) * (layout.segment_size)
        ) == layout.ports_for(messages[0])  # fmt: skip
        port_table = layout.base_port + np.arange(digits.shape[1]) * layout.segment_size + digits
        shuffle = np.argsort(rng_shuffle.random(port_table.shape), axis=1)
        shuffled = np.take_along_axis(port_table, shuffle, axis=1)
        for (knock, _), row in zip(group, shuffled.tolist(), strict=True):
            ports[knock] = row[: int(plan.kept[knock])]
    return ports


def make_knocks(
    sources: int,
    packets: int | None = None,
    background_share: float = 0.5,
    ipv6_share: float = 0.0,
    seed: int = 1,
    layout: KnockLayout | None = None,
    out_dir: Path = HERE,
    out: Path | None = None,
    snaplen: int = SNAPLEN,
    force: bool = False,
    garbage_share: float = 0.0,
    background: str = "traffic",
    sealing: Sealing | None = None,
) -> CaptureFile:
    """Write (or reuse) a knocks file; returns its path and shape. A ``sealing`` of one's
    own (another key) always writes the file (``out`` then names it)."""
    layout = layout or KnockLayout()
    plan = plan_knocks(
        sources, packets, background_share, ipv6_share, seed, layout, out_dir, garbage_share,
        background,
    )  # fmt: skip
    shape = plan.shape
    if out is not None:
        shape.path = Path(out)
    if shape.path.exists() and not force and sealing is None:
        return shape
    ports = knock_ports(plan, layout, seed, sealing=sealing or Sealing())
    write_knocks(plan, ports, shape.path, snaplen, seed, layout)
    return shape


def write_knocks(
    plan: _KnockPlan,
    ports: list[list[int]],
    path: Path,
    snaplen: int = SNAPLEN,
    seed: int = 1,
    layout: KnockLayout | None = None,
) -> None:
    """Write ``plan`` with knock k sending SYNs to ``ports[k]`` (in that order).

    The live benchmark gives knockd's port sequences the same plan: same sources, same
    interleaving. A port None leaves that packet out (knockd's sequences are shorter).
    """
    prefixes: list[bytes | None] = [None] * len(plan.v6)
    v6_flags = plan.v6.tolist()
    # The knocker's address of knock k: sequential per family, in knock order.
    v4_rank = np.cumsum(~plan.v6) - 1
    v6_rank = np.cumsum(plan.v6) - 1
    ranks = np.where(plan.v6, v6_rank, v4_rank).tolist()
    background: _Background | _FloodBackground
    if plan.shape.params.get("background", "traffic") == "flood":
        background = _FloodBackground(seed, layout or KnockLayout())
    else:
        background = _Background(seed, float(plan.shape.params["ipv6_share"]))
    knock_at, slot_at = plan.knock_at.tolist(), plan.slot_at.tolist()
    tcp = frames.tcp
    with _Output(path, snaplen) as write:
        k = 0
        for i, is_bg in enumerate(plan.is_background.tolist()):
            if is_bg:
                write(i, background.next())
                continue
            knock, slot = knock_at[k], slot_at[k]
            k += 1
            port = ports[knock][slot]
            if port is None:
                continue
            prefix = prefixes[knock]
            if prefix is None:
                prefix = prefixes[knock] = _syn_prefix(ranks[knock], v6_flags[knock])
            sport = 32768 + knock % 28232
            write(i, prefix + tcp(sport, port, TCP_SYN))


def _syn_prefix(rank: int, v6: bool) -> bytes:
    """Ethernet + IP header of a bare TCP segment from knocker ``rank`` to the server.

    The IP header (and its checksum) does not depend on the TCP header's bytes, so one
    prefix serves all of a knock's SYNs; ``frames`` builds it.
    """
    if v6:
        src = _address(KNOCKER_V6, rank, True)
        packet = frames.ipv6(src, SERVER_V6.packed, frames.PROTO_TCP, frames.tcp(1, 1))
        return frames.ethernet(packet)[:_ETH_IPV6]
    src = _address(KNOCKER_V4, rank, False)
    packet = frames.ipv4(src, SERVER_V4.packed, frames.PROTO_TCP, frames.tcp(1, 1))
    return frames.ethernet(packet)[:_ETH_IPV4]


class _Background:
    """Background frames from a pool of clients: TCP to 443, DNS to 53, ARP."""

    def __init__(self, seed: int, ipv6_share: float, batch: int = 65536) -> None:
        (self._rng,) = _rngs(seed, "background", 1)
        self._ipv6_share = ipv6_share
        self._batch = batch
        self._queue: list[tuple[int, int, bool]] = []
        # A client's frame of a kind never changes (same ports, sequence number): build once.
        self._cache: dict[tuple[int, int, bool], bytes] = {}
        self._kinds = np.array(list(BACKGROUND_MIX), np.int64)
        self._p = np.array(list(BACKGROUND_MIX.values()))
        self._p = self._p / self._p.sum()
        data = bytes(range(256)) * (DATA_PAYLOAD // 256 + 1)
        self._data = data[:DATA_PAYLOAD]
        # A standard query: id, flags RD, one question "example.com" type A class IN.
        self._dns = bytes.fromhex("123401000001000000000000") + b"\x07example\x03com\0\0\1\0\1"

    def next(self) -> bytes:
        if not self._queue:
            n = self._batch
            kinds = self._rng.choice(self._kinds, n, p=self._p).tolist()
            clients = self._rng.integers(BACKGROUND_CLIENTS, size=n).tolist()
            v6 = (self._rng.random(n) < self._ipv6_share).tolist()
            self._queue = list(zip(kinds, clients, v6, strict=True))[::-1]
        item = self._queue.pop()
        frame = self._cache.get(item)
        if frame is None:
            frame = self._cache[item] = self._build(*item)
        return frame

    def _build(self, kind: int, client: int, v6: bool) -> bytes:
        sport = 32768 + client
        if kind == BG_ARP:
            return _arp(client)
        if kind == BG_DNS:
            transport, proto = frames.udp(sport, 53, self._dns), frames.PROTO_UDP
        elif kind == BG_TCP_ACK:
            transport, proto = frames.tcp(sport, 443, TCP_ACK, seq=client), frames.PROTO_TCP
        else:
            payload = self._data
            transport = frames.tcp(sport, 443, TCP_ACK | TCP_PSH, payload, seq=client)
            proto = frames.PROTO_TCP
        if v6:
            src = _address(CLIENT_V6, client, True)
            packet = frames.ipv6(src, SERVER_V6.packed, proto, transport)
        else:
            src = _address(CLIENT_V4, client, False)
            packet = frames.ipv4(src, SERVER_V4.packed, proto, transport)
        return frames.ethernet(packet)


class _FloodBackground:
    """A spoofed flood as background: SYNs into the IPv4 knock range from random sources
    (FLOOD_SOURCES of them), as ``make_flood`` writes."""

    def __init__(self, seed: int, layout: KnockLayout, batch: int = 65536) -> None:
        (self._rng,) = _rngs(seed, "flood-background", 1)
        self._ports = segment_counts(layout)[0] * layout.segment_size
        self._base = layout.base_port
        self._batch = batch
        self._queue: list[tuple[int, int]] = []
        self._prefixes: dict[int, bytes] = {}
        self._sequence = 0

    def next(self) -> bytes:
        if not self._queue:
            sources = self._rng.integers(0x01000000, 0xE0000000, size=self._batch)
            sources = (sources % FLOOD_SOURCES + 0x01000000).tolist()
            ports = (self._base + self._rng.integers(self._ports, size=self._batch)).tolist()
            self._queue = list(zip(sources, ports, strict=True))[::-1]
        source, port = self._queue.pop()
        prefix = self._prefixes.get(source)
        if prefix is None:
            packet = frames.ipv4(
                source.to_bytes(4, "big"), SERVER_V4.packed, frames.PROTO_TCP, frames.tcp(1, 1)
            )
            prefix = self._prefixes[source] = frames.ethernet(packet)[:_ETH_IPV4]
        self._sequence += 1
        return prefix + frames.tcp(1024 + source % 64000, port, TCP_SYN, seq=self._sequence)


def _arp(client: int) -> bytes:
    """An ARP request from a client for the server (ignored by the engine: not IP)."""
    body = struct.pack(
        "!HHBBH6s4s6s4s",
        1,
        0x0800,
        6,
        4,
        1,
        frames.SRC_MAC,
        _address(CLIENT_V4, client, False),
        b"\0" * 6,
        SERVER_V4.packed,
    )
    return frames.ethernet(body, ethertype=ETHERTYPE_ARP)


class _Output:
    """CaptureWriter into a temporary file, renamed into place only when complete."""

    def __init__(self, path: Path, snaplen: int) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        self.snaplen = snaplen

    def __enter__(self):  # noqa: ANN204 - returns the write function
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = CaptureWriter(self.tmp, LINKTYPE_ETHERNET, snaplen=self.snaplen)
        writer = self.writer

        def write(index: int, data: bytes) -> None:
            sec, usec = divmod(index, 1_000_000)
            writer.write(START_SEC + sec, usec, data)

        return write

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        self.writer.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


# --- flood ----------------------------------------------------------------------------------


def flood_shape(
    packets: int = 1_000_000,
    sources: int = 130_000,
    seed: int = 1,
    layout: KnockLayout | None = None,
    out_dir: Path = HERE,
) -> CaptureFile:
    layout = layout or KnockLayout()
    if packets < 1 or sources < 1:
        raise ValueError("packets and sources must be at least 1")
    name = f"flood-n{packets}-s{sources}-seed{seed}{_layout_tag(layout)}-g{GENERATOR_VERSION}.pcap"
    return CaptureFile(
        path=Path(out_dir) / name,
        kind="flood",
        params={"packets": packets, "sources": sources, "seed": seed, "layout": asdict(layout)},
        packets=packets,
        knock_packets=packets,
        background_packets=0,
        knocks=sources,
        complete_knocks=0,
        lanes=sources,
    )


def make_flood(
    packets: int = 1_000_000,
    sources: int = 130_000,
    seed: int = 1,
    layout: KnockLayout | None = None,
    out_dir: Path = HERE,
    out: Path | None = None,
    snaplen: int = SNAPLEN,
    force: bool = False,
) -> CaptureFile:
    """Write (or reuse) a flood file: random SYNs into the IPv4 knock range."""
    layout = layout or KnockLayout()
    shape = flood_shape(packets, sources, seed, layout, out_dir)
    if out is not None:
        shape.path = Path(out)
    if shape.path.exists() and not force:
        return shape
    n4, _ = segment_counts(layout)
    rng_sources, rng_packets = _rngs(seed, "flood", 2)
    # Distinct random unicast addresses (1.0.0.0 up to 223.255.255.255).
    pool = np.unique(rng_sources.integers(0x01000000, 0xE0000000, size=sources * 2))
    addresses = rng_sources.permutation(pool)[:sources].tolist()
    source_at = rng_packets.integers(sources, size=packets).tolist()
    port_at = (
        layout.base_port + rng_packets.integers(n4 * layout.segment_size, size=packets)
    ).tolist()
    prefixes: dict[int, bytes] = {}
    tcp = frames.tcp
    with _Output(shape.path, snaplen) as write:
        for i, (s, port) in enumerate(zip(source_at, port_at, strict=True)):
            prefix = prefixes.get(s)
            if prefix is None:
                src = addresses[s].to_bytes(4, "big")
                packet = frames.ipv4(src, SERVER_V4.packed, frames.PROTO_TCP, tcp(1, 1))
                prefix = prefixes[s] = frames.ethernet(packet)[:_ETH_IPV4]
            write(i, prefix + tcp(1024 + s % 64000, port, TCP_SYN, seq=i))
    return shape
