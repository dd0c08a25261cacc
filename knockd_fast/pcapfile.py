"""A small pure-Python reader and writer of capture files: classic pcap and pcapng.

The reader follows libpcap's savefile code (``sf-pcap.c``, ``sf-pcapng.c``) where it
matters for the capture twins: timestamps are converted to microseconds the way libpcap
converts them, a truncated record is an error (``pcap_next_ex`` returns -1), a pcapng
file's interfaces must share one link type and snapshot length, and a record longer than
the snapshot length is cut (pcap) or refused (pcapng) as libpcap does.

    with CaptureReader("knocks.pcapng") as reader:
        for sec, usec, data in reader:
            ...

    with CaptureWriter("out.pcap", LINKTYPE_ETHERNET) as writer:
        writer.write(sec, usec, frame)
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from types import TracebackType
from typing import BinaryIO

PCAP_MAGIC_USEC = 0xA1B2C3D4
PCAP_MAGIC_NSEC = 0xA1B23C4D
PCAPNG_BLOCK_SHB = 0x0A0D0D0A
PCAPNG_BLOCK_IDB = 0x00000001
PCAPNG_BLOCK_PB = 0x00000002  # obsolete Packet Block; libpcap still reads it
PCAPNG_BLOCK_SPB = 0x00000003
PCAPNG_BLOCK_EPB = 0x00000006
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAPNG_OPT_ENDOFOPT = 0
PCAPNG_OPT_IF_TSRESOL = 9
PCAPNG_OPT_IF_TSOFFSET = 14

# libpcap's MAXIMUM_SNAPLEN: the snapshot length of a file that declares 0 (or a huge one),
# and the largest record libpcap accepts for every link type this project reads.
MAXIMUM_SNAPLEN = 262144
_INT_MAX = 0x7FFFFFFF
_USEC_PER_SEC = 1_000_000


class CaptureFileError(Exception):
    """A capture file that cannot be read: one line, ``path: reason``."""


def adjust_snapshot(snaplen: int) -> int:
    """libpcap's pcap_adjust_snapshot: 0 or more than INT_MAX means the maximum."""
    return MAXIMUM_SNAPLEN if snaplen == 0 or snaplen > _INT_MAX else snaplen


class CaptureReader:
    """Iterate over the packets of a pcap or pcapng file as ``(sec, usec, data)``.

    ``linktype`` is the LINKTYPE_ value the file declares (for pcap, without the FCS
    bits); ``snaplen`` the snapshot length libpcap would use; ``format`` is ``"pcap"`` or
    ``"pcapng"``; ``nanosecond`` says whether a pcap file holds nanoseconds (pcapng
    resolutions are per interface). The file is mapped into memory and read once.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._buffer: mmap.mmap | bytes = b""
        try:
            with open(self.path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size:
                    self._buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise self._error("no such file") from None
        except IsADirectoryError:
            raise self._error("is a directory, not a capture file") from None
        except (OSError, ValueError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise self._error(f"cannot read: {reason}") from None
        self._size = len(self._buffer)
        self._pos = 0
        self.nanosecond = False
        try:
            self._read_file_header()
        except BaseException:
            self.close()
            raise

    # --- common ----------------------------------------------------------------------

    def _error(self, reason: str) -> CaptureFileError:
        return CaptureFileError(f"{self.path}: {reason}")

    def close(self) -> None:
        buffer, self._buffer = self._buffer, b""
        if isinstance(buffer, mmap.mmap):
            buffer.close()

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[int, int, bytes]]:
        if self.format == "pcap":
            return self._iter_pcap()
        return self._iter_pcapng()

    def _read_file_header(self) -> None:
        if self._size < 4:
            raise self._error(
                f"truncated header: tried to read 4 file header bytes, only got {self._size}"
            )
        buffer = self._buffer
        (magic,) = struct.unpack_from("<I", buffer, 0)
        if magic == PCAPNG_BLOCK_SHB:
            self.format = "pcapng"
            self._open_pcapng()
            return
        for order in ("<", ">"):
            (magic,) = struct.unpack_from(order + "I", buffer, 0)
            if magic in (PCAP_MAGIC_USEC, PCAP_MAGIC_NSEC):
                self.format = "pcap"
                self._order = order
                self.nanosecond = magic == PCAP_MAGIC_NSEC
                self._open_pcap()
                return
        raise self._error(f"bad magic number {bytes(buffer[:4]).hex()}: not a pcap or pcapng file")

    # --- classic pcap ----------------------------------------------------------------

    def _open_pcap(self) -> None:
        if self._size < 24:
            raise self._error(
                f"truncated header: tried to read 24 file header bytes, only got {self._size}"
            )
        major, minor, _zone, _sigfigs, snaplen, linktype = struct.unpack_from(
            self._order + "HHiIII", self._buffer, 4
        )
        if major < 2:
            raise self._error("archaic pcap savefile format")
        if not ((major == 2 and minor <= 4) or (major == 543 and minor == 0)):
            raise self._error(f"unsupported pcap savefile version {major}.{minor}")
        self.linktype = linktype & 0x03FFFFFF
        self.snaplen = adjust_snapshot(snaplen)
        # Before 2.3 (and in DG/UX's 543.0) caplen and len were the other way round.
        self._lengths_swapped = (
            "yes" if major == 543 or minor < 3 else "maybe" if minor == 3 else ""
        )
        self._pos = 24

    def _iter_pcap(self) -> Iterator[tuple[int, int, bytes]]:
        record = struct.Struct(self._order + "iIII")
        buffer, size, pos = self._buffer, self._size, self._pos
        snaplen, nanosecond, swapped = self.snaplen, self.nanosecond, self._lengths_swapped
        while True:
            if pos == size:
                return
            if size - pos < 16:
                raise self._error(
                    f"truncated record: tried to read 16 header bytes, only got {size - pos}"
                )
            sec, frac, caplen, length = record.unpack_from(buffer, pos)
            pos += 16
            if swapped == "yes" or (swapped == "maybe" and caplen > length):
                caplen, length = length, caplen
            if caplen > MAXIMUM_SNAPLEN:
                raise self._error(f"invalid packet capture length {caplen}, bigger than maximum")
            keep = min(caplen, snaplen)  # libpcap reads snaplen bytes and discards the rest
            if size - pos < caplen:
                raise self._error(
                    f"truncated record: tried to read {caplen} captured bytes, "
                    f"only got {size - pos}"
                )
            data = buffer[pos : pos + keep]
            pos += caplen
            self._pos = pos
            yield sec, frac // 1000 if nanosecond else frac, data

    # --- pcapng ----------------------------------------------------------------------

    def _open_pcapng(self) -> None:
        buffer = self._buffer
        if self._size < 12:
            raise self._error("truncated header: the Section Header Block is cut short")
        (bom,) = struct.unpack_from("<I", buffer, 8)
        if bom == PCAPNG_BYTE_ORDER_MAGIC:
            self._order = "<"
        elif bom == 0x4D3C2B1A:
            self._order = ">"
        else:
            raise self._error("bad byte-order magic in the Section Header Block")
        (length,) = struct.unpack_from(self._order + "I", buffer, 4)
        if length < 28 or length > 1024 * 1024:
            raise self._error(f"Section Header Block has an invalid length {length}")
        if self._size < length:
            raise self._error(
                f"truncated header: the Section Header Block has {length} bytes, "
                f"the file {self._size}"
            )
        self._check_shb(length)
        self._pos = length
        self._interfaces: list[tuple[int, int, int]] = []  # (tsresol, tsoffset, snaplen)
        self.linktype = -1
        self.snaplen = 0
        while True:
            block = self._next_block()
            if block is None:
                raise self._error("the capture file has no Interface Description Blocks")
            kind, start, end = block
            if kind == PCAPNG_BLOCK_IDB:
                self._add_interface(start, end, first=True)
                return
            if kind in (PCAPNG_BLOCK_EPB, PCAPNG_BLOCK_SPB, PCAPNG_BLOCK_PB):
                raise self._error(
                    "the capture file has a packet block before any Interface Description Blocks"
                )

    def _check_shb(self, length: int) -> None:
        (trailer,) = struct.unpack_from(self._order + "I", self._buffer, length - 4)
        if trailer != length:
            raise self._error(f"block total length in header {length} and trailer {trailer}")
        major, minor = struct.unpack_from(self._order + "HH", self._buffer, 12)
        if not (major == 1 and minor in (0, 2)):
            raise self._error(f"unsupported pcapng savefile version {major}.{minor}")

    def _next_block(self) -> tuple[int, int, int] | None:
        """(block type, start of the body, end of the body), or None at the end of file."""
        buffer, pos, size = self._buffer, self._pos, self._size
        if pos == size:
            return None
        if size - pos < 8:
            raise self._error(f"truncated block: tried to read 8 bytes, only got {size - pos}")
        kind, length = struct.unpack_from(self._order + "II", buffer, pos)
        if length < 12 or length % 4:
            raise self._error(f"block of type {kind} has an invalid length {length}")
        if size - pos < length:
            raise self._error(
                f"truncated block: tried to read {length} bytes, only got {size - pos}"
            )
        (trailer,) = struct.unpack_from(self._order + "I", buffer, pos + length - 4)
        if trailer != length:
            raise self._error(
                f"block total length in header {length} and trailer {trailer} don't match"
            )
        self._pos = pos + length
        return kind, pos + 8, pos + length - 4

    def _add_interface(self, start: int, end: int, first: bool) -> None:
        order, buffer = self._order, self._buffer
        if end - start < 8:
            raise self._error("Interface Description Block is too short")
        linktype, _reserved, snaplen = struct.unpack_from(order + "HHI", buffer, start)
        snaplen = adjust_snapshot(snaplen)
        if first:
            self.linktype, self.snaplen = linktype, snaplen
        elif linktype != self.linktype:
            raise self._error(
                f"an interface has link type {linktype}, different from the type "
                f"{self.linktype} of the first interface"
            )
        elif snaplen != self.snaplen:
            raise self._error(
                f"an interface has snapshot length {snaplen}, different from the "
                f"snapshot length {self.snaplen} of the first interface"
            )
        tsresol, tsoffset = _USEC_PER_SEC, 0
        seen: set[int] = set()
        pos = start + 8
        while pos < end:
            if end - pos < 4:
                raise self._error("Interface Description Block option is cut short")
            code, length = struct.unpack_from(order + "HH", buffer, pos)
            pos += 4
            padded = (length + 3) & ~3
            if end - pos < padded:
                raise self._error("Interface Description Block option is cut short")
            value = buffer[pos : pos + length]
            pos += padded
            if code == PCAPNG_OPT_ENDOFOPT:
                if length:
                    raise self._error("Interface Description Block opt_endofopt has a length")
                break
            if code in (PCAPNG_OPT_IF_TSRESOL, PCAPNG_OPT_IF_TSOFFSET):
                if code in seen:
                    raise self._error(f"Interface Description Block repeats option {code}")
                seen.add(code)
            if code == PCAPNG_OPT_IF_TSRESOL:
                if length != 1:
                    raise self._error("if_tsresol option does not have length 1")
                exponent = value[0] & 0x7F
                if value[0] & 0x80:
                    if exponent > 63:
                        raise self._error(f"if_tsresol 2^-{exponent} is too high")
                    tsresol = 1 << exponent
                else:
                    if exponent > 19:
                        raise self._error(f"if_tsresol 10^-{exponent} is too high")
                    tsresol = 10**exponent
            elif code == PCAPNG_OPT_IF_TSOFFSET:
                if length != 8:
                    raise self._error("if_tsoffset option does not have length 8")
                (tsoffset,) = struct.unpack_from(order + "q", value, 0)
        self._interfaces.append((tsresol, tsoffset, snaplen))

    def _iter_pcapng(self) -> Iterator[tuple[int, int, bytes]]:
        order, buffer = self._order, self._buffer
        epb = struct.Struct(order + "IIIII")
        pb = struct.Struct(order + "HHIIII")
        while True:
            block = self._next_block()
            if block is None:
                return
            kind, start, end = block
            if kind == PCAPNG_BLOCK_EPB:
                if end - start < 20:
                    raise self._error("Enhanced Packet Block is too short")
                interface, high, low, caplen, _length = epb.unpack_from(buffer, start)
                start += 20
            elif kind == PCAPNG_BLOCK_SPB:
                if end - start < 4:
                    raise self._error("Simple Packet Block is too short")
                (length,) = struct.unpack_from(order + "I", buffer, start)
                interface, high, low, caplen = 0, 0, 0, min(length, self.snaplen)
                start += 4
            elif kind == PCAPNG_BLOCK_PB:
                if end - start < 20:
                    raise self._error("Packet Block is too short")
                interface, _drops, high, low, caplen, _length = pb.unpack_from(buffer, start)
                start += 20
            elif kind == PCAPNG_BLOCK_IDB:
                self._add_interface(start, end, first=False)
                continue
            elif kind == PCAPNG_BLOCK_SHB:
                self._new_section(start, end)
                continue
            else:
                continue
            if interface >= len(self._interfaces):
                raise self._error(
                    f"a packet arrived on interface {interface}, which has no "
                    "Interface Description Block"
                )
            if caplen > self.snaplen:
                raise self._error(
                    f"invalid packet capture length {caplen}, bigger than snaplen {self.snaplen}"
                )
            if end - start < caplen:
                raise self._error(f"packet block of type {kind} is too short for its data")
            tsresol, tsoffset, _snaplen = self._interfaces[interface]
            timestamp = (high << 32) | low
            sec, frac = divmod(timestamp, tsresol)
            yield sec + tsoffset, frac * _USEC_PER_SEC // tsresol, buffer[start : start + caplen]

    def _new_section(self, start: int, end: int) -> None:
        if end - start < 16:
            raise self._error("Section Header Block is too short")
        bom, major = struct.unpack_from(self._order + "IH", self._buffer, start)
        if bom != PCAPNG_BYTE_ORDER_MAGIC:
            if bom == 0x4D3C2B1A:
                raise self._error("the file has sections with different byte orders")
            raise self._error("a section has a bad byte-order magic")
        if major != 1:
            raise self._error(f"unknown pcapng savefile major version {major}")
        self._interfaces = []


class CaptureWriter:
    """Write packets to a pcap or pcapng file.

    ``format="pcap"`` writes a classic file (microsecond magic, or the nanosecond one when
    ``nanosecond``); ``"pcapng"`` writes one Section Header Block, one Interface
    Description Block (if_tsresol 6, or 9 when ``nanosecond``) and Enhanced Packet Blocks.
    ``byte_order`` (``"little"`` or ``"big"``) exists to test readers. Data longer than
    ``snaplen`` is cut to it; ``orig_len`` defaults to the length of ``data``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        linktype: int,
        snaplen: int = 65535,
        format: str = "pcap",
        nanosecond: bool = False,
        byte_order: str = "little",
    ) -> None:
        if format not in ("pcap", "pcapng"):
            raise ValueError(f"format {format!r} is neither 'pcap' nor 'pcapng'")
        if byte_order not in ("little", "big"):
            raise ValueError(f"byte_order {byte_order!r} is neither 'little' nor 'big'")
        if not 0 <= linktype <= (0xFFFF if format == "pcapng" else 0xFFFFFFFF):
            raise ValueError(f"link type {linktype} does not fit the {format} header")
        if not 1 <= snaplen <= 0xFFFFFFFF:
            raise ValueError(f"snaplen {snaplen} is outside 1..4294967295")
        self.path = os.fspath(path)
        self.linktype = linktype
        self.snaplen = snaplen
        self.format = format
        self.nanosecond = nanosecond
        self._order = "<" if byte_order == "little" else ">"
        self._handle: BinaryIO | None = open(self.path, "wb")
        o = self._order
        if format == "pcap":
            magic = PCAP_MAGIC_NSEC if nanosecond else PCAP_MAGIC_USEC
            self._handle.write(struct.pack(o + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))
        else:
            shb = struct.pack(
                o + "IIIHHqI", PCAPNG_BLOCK_SHB, 28, PCAPNG_BYTE_ORDER_MAGIC, 1, 0, -1, 28
            )
            option = struct.pack(o + "HHB3x", PCAPNG_OPT_IF_TSRESOL, 1, 9 if nanosecond else 6)
            end = struct.pack(o + "HH", PCAPNG_OPT_ENDOFOPT, 0)
            length = 16 + len(option) + len(end) + 4
            idb = (
                struct.pack(o + "IIHHI", PCAPNG_BLOCK_IDB, length, linktype, 0, snaplen)
                + option
                + end
                + struct.pack(o + "I", length)
            )
            self._handle.write(shb + idb)

    def write(
        self, sec: int, usec: int, data: bytes, orig_len: int | None = None, nsec: int | None = None
    ) -> None:
        """Append one packet. In a nanosecond file ``nsec`` (if given) replaces ``usec``."""
        if self._handle is None:
            raise ValueError(f"{self.path}: the writer is closed")
        caplen = min(len(data), self.snaplen)
        length = len(data) if orig_len is None else orig_len
        frac = (usec * 1000 if nsec is None else nsec) if self.nanosecond else usec
        o = self._order
        if self.format == "pcap":
            header = struct.pack(o + "iIII", sec, frac, caplen, length)
            self._handle.write(header + bytes(data[:caplen]))
            return
        units = 1_000_000_000 if self.nanosecond else _USEC_PER_SEC
        timestamp = sec * units + frac
        padding = -caplen % 4
        total = 28 + caplen + padding + 4
        self._handle.write(
            struct.pack(
                o + "IIIIIII",
                PCAPNG_BLOCK_EPB,
                total,
                0,
                timestamp >> 32,
                timestamp & 0xFFFFFFFF,
                caplen,
                length,
            )
            + bytes(data[:caplen])
            + b"\0" * padding
            + struct.pack(o + "I", total)
        )

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
