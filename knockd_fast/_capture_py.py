"""Pure-Python twin of the Cython capture engine (``_ext/capture.pyx``).

docs/capture.md is the specification; this module gives the same completions and the same
counters as the Cython engine for the same capture file, only slower. It reads capture
files only (``knockd_fast.pcapfile``); live capture and BPF need the extension.
"""

from __future__ import annotations

import ipaddress
import itertools
import operator
import os
from collections.abc import Iterable, Iterator

import numpy as np

from knock_client.protocol import MESSAGE_LEN_IPV4, MESSAGE_LEN_IPV6, KnockLayout

from . import capture_spec
from .capture_spec import (
    ALTERNATIVES_PER_SEGMENT,
    COMPLETION_DTYPE,
    COUNTER_NAMES,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    GROUP_BY_ADDRESS_AND_PORT,
    HEADER_BITS,
    IPPROTO_AH,
    IPPROTO_FRAGMENT,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4_MAPPED_PREFIX,
    IPV6_EXTENSION_HEADERS,
    KIND_KNOCK,
    KIND_SPA,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    LINKTYPE_RAW_DLT12,
    MAX_ALTERNATIVES,
    MAX_IPV6_EXTENSION_HEADERS,
    MAX_VLAN_TAGS,
    MESSAGE_CAPACITY,
    PCAP_COUNTER_NAMES,
    SUPPORTED_LINKTYPES,
    TCP_ACK,
    TCP_SYN,
    VLAN_TPIDS,
    Admission,
    CaptureError,
    address_key,
    admission,
    engine_settings,
)
from .pcapfile import CaptureFileError, CaptureReader

__all__ = ["COMPLETION_DTYPE", "COUNTER_NAMES", "CaptureEngine", "CaptureError"]

# Counter indexes into the engine's counter list (same order as COUNTER_NAMES).
(
    _PACKETS,
    _KNOCK_PACKETS,
    _SPA_PACKETS,
    _COMPLETIONS,
    _DUPLICATES,
    _CONFLICTS,
    _ALTERNATIVES_DROPPED,
    _EVICTIONS,
    _EXPIRED,
    _MALFORMED,
    _IGNORED,
    _REFUSED_MODE,
    _REFUSED_VERSION,
    _REFUSED_USER,
) = range(len(COUNTER_NAMES))
_REFUSAL_COUNTER = {"refused_version": _REFUSED_VERSION, "refused_user": _REFUSED_USER}
_REFUSAL_REPORT = {
    "refused_version": capture_spec.FAILED_REFUSED_VERSION,
    "refused_user": capture_spec.FAILED_REFUSED_USER,
}

_SPA_LENGTHS = (MESSAGE_LEN_IPV4, MESSAGE_LEN_IPV6)
_USEC_PER_SEC = 1_000_000
_ZERO_SEGMENTS = [0] * MAX_ALTERNATIVES


def _dlt(linktype: int) -> int:
    """The DLT_ value libpcap reports for a file's LINKTYPE_ (pcap_datalink on Linux)."""
    return LINKTYPE_RAW_DLT12 if linktype == LINKTYPE_RAW else linktype


class CaptureEngine:
    """Reads packets, rebuilds knocks per source, and rings completed messages.

    Same API and results as ``knockd_fast._capture_c.CaptureEngine``; see docs/capture.md.
    """

    def __init__(
        self,
        layout: KnockLayout,
        knock_timeout: float = 10.0,
        capacity: int = 65536,
        ring_capacity: int = 4096,
        destinations: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address | str] = (),
        group_by: str = GROUP_BY_ADDRESS_AND_PORT,
        knock_mode: bool = True,
        spa_mode: bool = True,
        user_ids: Iterable[int] | None = None,
    ) -> None:
        settings = engine_settings(
            layout,
            knock_timeout,
            capacity,
            ring_capacity,
            destinations,
            group_by,
            knock_mode,
            spa_mode,
            user_ids,
        )
        self._admission: Admission = settings.admission
        self._header_segments = settings.header_segments
        self._capacity = settings.capacity
        self._ring_capacity = settings.ring_capacity
        self._layout = layout
        self.knock_timeout = settings.knock_timeout
        self.live = False  # the twin never captures live
        self._knock_timeout_us = settings.knock_timeout_us
        self._destinations = settings.destinations
        self._destination_keys = frozenset(settings.destination_keys)
        self.group_by = group_by
        self._by_port = settings.by_port

        self._digit_bits = layout.digit_bits
        self._base_port = layout.base_port
        self._knock_end = settings.knock_end
        self._spa_port = layout.spa_port
        self._segment_mask = layout.segment_size - 1
        # Per family: (segments, message length, pad bits, pad mask).
        self._family = {
            family: (
                settings.segments[i],
                settings.message_lengths[i],
                settings.pad_bits[i],
                settings.pad_masks[i],
            )
            for i, family in enumerate((4, 6))
        }

        # The source table: a ring of slots and an index from knock key (the address key,
        # and the source port's two bytes when grouping by port) to slot.
        capacity = self._capacity
        self._index: dict[bytes, int] = {}
        self._slot_key: list[bytes | None] = [None] * capacity
        self._slot_first: list[int] = [0] * capacity
        self._slot_digits: list[list[int]] = [[] for _ in range(capacity)]
        self._slot_filled: list[int] = [0] * capacity
        self._slot_alternatives: list[list[tuple[int, int]]] = [[] for _ in range(capacity)]
        self._next_slot = 0

        self._ring = np.zeros(self._ring_capacity, dtype=COMPLETION_DTYPE)
        self._ring_count = 0
        self._failed = np.zeros(
            capture_spec.FAILED_RING_CAPACITY, dtype=capture_spec.FAILED_KNOCK_DTYPE
        )
        self._failed_count = 0
        self._sweep_pos = 0
        self._counters = [0] * len(COUNTER_NAMES)

        self._reader: CaptureReader | None = None
        self._packets: Iterator[tuple[int, int, bytes]] | None = None
        self._linktype: int | None = None
        self._filter_linktype = LINKTYPE_ETHERNET  # the last one opened, as in the C engine

    def admit(
        self,
        knock_mode: bool = True,
        spa_mode: bool = True,
        user_ids: Iterable[int] | None = None,
    ) -> None:
        """Change what is refused before judging (a reload: modes and users)."""
        self._admission = admission(knock_mode, spa_mode, user_ids)

    @property
    def admission(self) -> Admission:
        return self._admission

    # --- handles ------------------------------------------------------------------------

    def open_file(self, path: str | os.PathLike[str], bpf: bool = False) -> None:
        """Read packets from a pcap or pcapng file. Closes a capture already open; the
        table, the ring and the counters carry over."""
        if bpf:
            raise CaptureError(
                "the pure-Python engine does not run BPF filters; open the file with bpf=False"
            )
        self.close()
        try:
            reader = CaptureReader(path)
        except CaptureFileError as error:
            raise CaptureError(str(error)) from None
        if reader.linktype not in SUPPORTED_LINKTYPES:
            reader.close()
            supported = ", ".join(str(t) for t in sorted(SUPPORTED_LINKTYPES))
            raise CaptureError(
                f"{reader.path}: unsupported link type {reader.linktype} (supported: {supported})"
            )
        self._reader = reader
        self._packets = iter(reader)
        self._linktype = self._filter_linktype = _dlt(reader.linktype)

    def open_live(
        self,
        interface: str,
        buffer_bytes: int = 32 << 20,
        timeout_ms: int = capture_spec.BLOCK_TIMEOUT_MS,
        snaplen: int = capture_spec.SNAPLEN,
        bpf: bool = True,
        immediate: bool = False,
    ) -> None:
        raise CaptureError(
            "the pure-Python engine reads capture files only; build the extension for live capture"
        )

    def close(self) -> None:
        """Close the capture; the table, the ring and the counters are kept."""
        reader, self._reader = self._reader, None
        self._packets = None
        self._linktype = None
        if reader is not None:
            reader.close()

    @property
    def linktype(self) -> int | None:
        """The open capture's link type as libpcap reports it (DLT_), or None."""
        return self._linktype

    @property
    def filter_expression(self) -> str:
        """The BPF source for the last opened link type (Ethernet if none was opened)."""
        return capture_spec.filter_expression(
            self._layout,
            self._destinations,
            self._filter_linktype,
            self._admission.knock_mode,
            self._admission.spa_mode,
        )

    def fileno(self) -> int:
        """Live handles only: the twin has no descriptor to wait on."""
        self._require_capture()
        raise CaptureError("the pure-Python engine reads files: there is nothing to wait on")

    def set_nonblocking(self, flag: bool = True) -> None:
        """Accepted for the Cython engine's sake; reading a file never blocks."""
        self._require_capture()

    def _require_capture(self) -> Iterator[tuple[int, int, bytes]]:
        if self._packets is None:
            raise CaptureError("no capture is open: call open_file() first")
        return self._packets

    # --- reading ------------------------------------------------------------------------

    def dispatch(self, max_packets: int = -1) -> int:
        """Read one batch: at most ``max_packets`` (if > 0) and at most the free ring
        records. Returns the packets read; 0 at the end of the file."""
        packets = self._require_capture()
        free = self._ring_capacity - self._ring_count
        if free == 0:
            raise CaptureError("the completion ring is full: drain() it before dispatch()")
        limit = free if max_packets <= 0 else min(max_packets, free)
        handle = self._packet
        count = 0
        try:
            for sec, usec, data in packets:
                handle(sec, usec, data)
                count += 1
                if count == limit:
                    break
        except CaptureFileError as error:
            raise CaptureError(str(error)) from None
        return count

    def drain(self) -> np.ndarray:
        """The completed records, oldest first (a copy); empties the ring."""
        records = self._ring[: self._ring_count].copy()
        self._ring_count = 0
        return records

    def stats(self) -> dict[str, int]:
        counters = dict(zip(COUNTER_NAMES, self._counters, strict=True))
        counters.update(dict.fromkeys(PCAP_COUNTER_NAMES, 0))
        return counters

    def sweep(self, now: float) -> int:
        """Free the partial knocks that timed out by ``now`` among the next
        ``SWEEP_SLOTS`` slots; how many (counted in ``expired``); see the C engine."""
        now_us = capture_spec.time_us(now)
        timeout = self._knock_timeout_us
        capacity = self._capacity
        slot_key = self._slot_key
        freed = 0
        for _ in range(min(capture_spec.SWEEP_SLOTS, capacity)):
            slot = self._sweep_pos
            self._sweep_pos = slot + 1 if slot + 1 < capacity else 0
            key = slot_key[slot]
            if key is not None and now_us - self._slot_first[slot] > timeout:
                if self._slot_filled[slot] >= capture_spec.MIN_REPORTED_DIGITS:
                    self._report(slot, capture_spec.FAILED_TIMED_OUT)
                del self._index[key]
                slot_key[slot] = None
                self._counters[_EXPIRED] += 1
                freed += 1
        return freed

    def failed_knocks(self) -> np.ndarray:
        """The failed knocks reported since the last call, oldest first (a copy)."""
        count = self._failed_count
        self._failed_count = 0
        return self._failed[:count].copy()

    def _report(self, slot: int, reason: int) -> None:
        """Keep a failed knock's source and digit counts, while there is room."""
        if self._failed_count >= capture_spec.FAILED_RING_CAPACITY:
            return
        key = self._slot_key[slot]
        assert key is not None
        family = 4 if key[:12] == IPV4_MAPPED_PREFIX else 6
        self._failed[self._failed_count] = (
            reason,
            family,
            self._slot_filled[slot],
            len(self._slot_alternatives[slot]),
            int.from_bytes(key[16:18], "big") if self._by_port else 0,
            self._family[family][0],
            self._slot_first[slot] // _USEC_PER_SEC,
            list(key[:16]),
        )
        self._failed_count += 1

    def forget(
        self, address: ipaddress.IPv4Address | ipaddress.IPv6Address | str, port: int = 0
    ) -> None:
        """Drop the partial knock of ``address`` (from source ``port`` when grouping by
        port), if any (counted nowhere)."""
        key = address_key(ipaddress.ip_address(address))
        if self._by_port:
            key += operator.index(port).to_bytes(2, "big")
        slot = self._index.pop(key, None)
        if slot is not None:
            self._slot_key[slot] = None

    def active_sources(self) -> int:
        """Partial knocks in the table (stale ones too, until reclaimed)."""
        return len(self._index)

    # --- per packet ---------------------------------------------------------------------

    def _packet(self, sec: int, usec: int, data: bytes) -> None:
        counters = self._counters
        counters[_PACKETS] += 1
        size = len(data)
        linktype = self._linktype

        # 1. Link layer.
        if linktype == LINKTYPE_ETHERNET or linktype == LINKTYPE_LINUX_SLL:
            offset = 14 if linktype == LINKTYPE_ETHERNET else 16
            if size < offset:
                counters[_MALFORMED] += 1
                return
            ethertype = data[offset - 2] << 8 | data[offset - 1]
        elif linktype == LINKTYPE_LINUX_SLL2:
            offset = 20
            if size < offset:
                counters[_MALFORMED] += 1
                return
            ethertype = data[0] << 8 | data[1]
        else:
            # No link header. LINKTYPE_IPV4/IPV6 name the version; on raw IP a version
            # nibble of 6 means IPv6 and anything else IPv4 (which then checks the version).
            offset = 0
            if linktype == LINKTYPE_IPV4:
                ethertype = ETHERTYPE_IPV4
            elif linktype == LINKTYPE_IPV6 or (size and data[0] >> 4 == 6):
                ethertype = ETHERTYPE_IPV6
            else:
                ethertype = ETHERTYPE_IPV4
        tags = 0
        while ethertype in VLAN_TPIDS:
            if tags == MAX_VLAN_TAGS or size < offset + 4:
                counters[_MALFORMED] += 1
                return
            ethertype = data[offset + 2] << 8 | data[offset + 3]
            offset += 4
            tags += 1

        # 2. Network layer.
        captured = size - offset
        if ethertype == ETHERTYPE_IPV4:
            if captured < 20 or data[offset] >> 4 != 4:
                counters[_MALFORMED] += 1
                return
            header_len = (data[offset] & 0x0F) * 4
            total_len = data[offset + 2] << 8 | data[offset + 3]
            if header_len < 20 or captured < header_len or total_len < header_len:
                counters[_MALFORMED] += 1
                return
            if (data[offset + 6] & 0x1F) or data[offset + 7]:
                counters[_IGNORED] += 1  # a non-first fragment
                return
            family = 4
            proto = data[offset + 9]
            source = IPV4_MAPPED_PREFIX + data[offset + 12 : offset + 16]
            destination = IPV4_MAPPED_PREFIX + data[offset + 16 : offset + 20]
            transport = offset + header_len
            available = min(captured, total_len) - header_len
        elif ethertype == ETHERTYPE_IPV6:
            if captured < 40 or data[offset] >> 4 != 6:
                counters[_MALFORMED] += 1
                return
            source = data[offset + 8 : offset + 24]
            destination = data[offset + 24 : offset + 40]
            if source[:12] == IPV4_MAPPED_PREFIX or destination[:12] == IPV4_MAPPED_PREFIX:
                counters[_MALFORMED] += 1
                return
            family = 6
            payload_len = data[offset + 4] << 8 | data[offset + 5]
            proto = data[offset + 6]
            transport = offset + 40
            end = transport + min(captured - 40, payload_len)
            walked = 0
            while proto in IPV6_EXTENSION_HEADERS:
                if walked == MAX_IPV6_EXTENSION_HEADERS:
                    counters[_MALFORMED] += 1
                    return
                walked += 1
                if proto == IPPROTO_FRAGMENT:
                    length = 8
                    if transport + length > end:
                        counters[_MALFORMED] += 1
                        return
                    if (data[transport + 2] << 8 | data[transport + 3]) >> 3:
                        counters[_IGNORED] += 1  # a non-first fragment
                        return
                else:
                    if transport + 2 > end:
                        counters[_MALFORMED] += 1
                        return
                    if proto == IPPROTO_AH:
                        length = (data[transport + 1] + 2) * 4
                    else:
                        length = (data[transport + 1] + 1) * 8
                    if transport + length > end:
                        counters[_MALFORMED] += 1
                        return
                proto = data[transport]
                transport += length
            available = end - transport
        else:
            counters[_IGNORED] += 1
            return

        # 3. Destination.
        if self._destination_keys and destination not in self._destination_keys:
            counters[_IGNORED] += 1
            return

        # 4. Transport.
        if proto == IPPROTO_TCP:
            if available < 20:
                counters[_MALFORMED] += 1
                return
            flags = data[transport + 13]
            if not flags & TCP_SYN or flags & TCP_ACK:
                counters[_IGNORED] += 1
                return
        elif proto == IPPROTO_UDP:
            if available < 8:
                counters[_MALFORMED] += 1
                return
        else:
            counters[_IGNORED] += 1
            return
        port = data[transport + 2] << 8 | data[transport + 3]

        if proto == IPPROTO_UDP and port == self._spa_port:
            if not self._admission.spa_mode:
                counters[_REFUSED_MODE] += 1
                return
            udp_len = data[transport + 4] << 8 | data[transport + 5]
            if udp_len < 8 or udp_len > available or udp_len - 8 not in _SPA_LENGTHS:
                counters[_MALFORMED] += 1
                return
            header = data[transport + 8] << 8 | data[transport + 9]
            refusal = self._admission.header_refusal((header,))
            if refusal is not None:
                counters[_REFUSAL_COUNTER[refusal]] += 1
                return
            counters[_SPA_PACKETS] += 1
            message = data[transport + 8 : transport + udp_len]
            self._complete(KIND_SPA, family, message, (), sec, usec, source, destination)
            return

        if not self._base_port <= port < self._knock_end:
            counters[_IGNORED] += 1
            return
        offset_in_range = port - self._base_port
        segment = offset_in_range >> self._digit_bits
        digit = offset_in_range & self._segment_mask
        segments, _length, _pad, pad_mask = self._family[family]
        if segment >= segments:
            counters[_IGNORED] += 1
            return
        if not self._admission.knock_mode:
            counters[_REFUSED_MODE] += 1
            return
        if segment == segments - 1 and digit & pad_mask:
            counters[_MALFORMED] += 1
            return
        counters[_KNOCK_PACKETS] += 1
        key = source + data[transport : transport + 2] if self._by_port else source
        self._digit(key, source, destination, family, segment, digit, sec, usec)

    # --- the source table ---------------------------------------------------------------

    def _digit(
        self,
        key: bytes,
        source: bytes,
        destination: bytes,
        family: int,
        segment: int,
        digit: int,
        sec: int,
        usec: int,
    ) -> None:
        counters = self._counters
        now = sec * _USEC_PER_SEC + usec
        timeout = self._knock_timeout_us
        index = self._index
        slot_key = self._slot_key
        slot_first = self._slot_first
        segments = self._family[family][0]

        # 1. Lookup, with lazy expiry.
        slot = index.get(key)
        if slot is not None and now - slot_first[slot] > timeout:
            del index[key]
            slot_key[slot] = None
            counters[_EXPIRED] += 1
            slot = None

        # 2. A new source takes the next slot of the ring, freeing its previous owner.
        if slot is None:
            slot = self._next_slot
            self._next_slot = (slot + 1) % self._capacity
            previous = slot_key[slot]
            if previous is not None:
                del index[previous]
                if now - slot_first[slot] > timeout:
                    counters[_EXPIRED] += 1
                else:
                    counters[_EVICTIONS] += 1
            slot_key[slot] = key
            index[key] = slot
            slot_first[slot] = now
            self._slot_digits[slot] = [-1] * segments
            self._slot_filled[slot] = 0
            self._slot_alternatives[slot] = []

        # 3. The digit.
        digits = self._slot_digits[slot]
        held = digits[segment]
        if held < 0:
            digits[segment] = digit
            filled = self._slot_filled[slot] + 1
            self._slot_filled[slot] = filled
        else:
            if held == digit:
                counters[_DUPLICATES] += 1
            else:
                counters[_CONFLICTS] += 1
                alternatives = self._slot_alternatives[slot]
                if (segment, digit) not in alternatives:
                    in_segment = sum(1 for s, _ in alternatives if s == segment)
                    if (
                        in_segment >= ALTERNATIVES_PER_SEGMENT
                        or len(alternatives) >= MAX_ALTERNATIVES
                    ):
                        counters[_ALTERNATIVES_DROPPED] += 1
                    else:
                        alternatives.append((segment, digit))
            return

        # 4. Completion.
        if filled == segments:
            _segments, length, pad, _mask = self._family[family]
            value = 0
            bits = self._digit_bits
            for held in digits:
                value = value << bits | held
            message = (value >> pad).to_bytes(length, "big")
            alternatives = self._slot_alternatives[slot]
            if self._admission.user_ids is not None:
                refusal = self._admission.header_refusal(self._headers(digits, alternatives))
                if refusal is not None:
                    counters[_REFUSAL_COUNTER[refusal]] += 1
                    self._report(slot, _REFUSAL_REPORT[refusal])
                    del index[key]
                    slot_key[slot] = None
                    return
            del index[key]
            slot_key[slot] = None
            self._complete(
                KIND_KNOCK, family, message, alternatives, sec, usec, source, destination
            )

    def _headers(self, digits: list[int], alternatives: list[tuple[int, int]]) -> Iterator[int]:
        """The header of every combination of the digits and alternatives in the segments
        that hold the header (docs/capture.md, Admission)."""
        count = self._header_segments
        bits = self._digit_bits
        options = [[digits[s]] for s in range(count)]
        for segment, digit in alternatives:
            if segment < count:
                options[segment].append(digit)
        for choice in itertools.product(*options):
            value = 0
            for digit in choice:
                value = value << bits | digit
            yield value >> (count * bits - HEADER_BITS)

    def _complete(
        self,
        kind: int,
        family: int,
        message: bytes,
        alternatives: list[tuple[int, int]] | tuple[()],
        sec: int,
        usec: int,
        source: bytes,
        destination: bytes,
    ) -> None:
        count = len(alternatives)
        padding = MAX_ALTERNATIVES - count
        self._ring[self._ring_count] = (
            kind,
            family,
            len(message),
            count,
            usec,
            sec,
            list(source),
            list(destination),
            list(message) + [0] * (MESSAGE_CAPACITY - len(message)),
            [s for s, _ in alternatives] + _ZERO_SEGMENTS[:padding],
            [d for _, d in alternatives] + _ZERO_SEGMENTS[:padding],
        )
        self._ring_count += 1
        self._counters[_COMPLETIONS] += 1
