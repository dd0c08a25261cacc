"""knockd_fast.pcapfile against libpcap itself: files we write, libpcap reads the same
packets (via ctypes and via tcpdump); files tcpdump writes, we read the same packets."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from knockd_fast import frames
from knockd_fast.capture_spec import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL2, LINKTYPE_RAW
from knockd_fast.pcapfile import CaptureFileError, CaptureReader, CaptureWriter

T0 = 1_700_000_000


class _PktHdr(ctypes.Structure):
    _fields_ = [
        ("sec", ctypes.c_long),
        ("usec", ctypes.c_long),
        ("caplen", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
    ]


def _libpcap() -> ctypes.CDLL:
    name = ctypes.util.find_library("pcap")
    if name is None:
        pytest.skip("libpcap is not installed")
    lib = ctypes.CDLL(name)
    lib.pcap_open_offline.restype = ctypes.c_void_p
    lib.pcap_open_offline.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lib.pcap_next_ex.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.POINTER(_PktHdr)),
        ctypes.POINTER(ctypes.POINTER(ctypes.c_ubyte)),
    ]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_datalink.argtypes = [ctypes.c_void_p]
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    return lib


def libpcap_read(path: Path) -> tuple[list[tuple[int, int, bytes]], str | None]:
    """What libpcap reads: the packets, and its error (None at a clean end of file)."""
    lib = _libpcap()
    errbuf = ctypes.create_string_buffer(512)
    handle = lib.pcap_open_offline(str(path).encode(), errbuf)
    if not handle:
        return [], "open: " + errbuf.value.decode()
    packets = []
    header = ctypes.POINTER(_PktHdr)()
    data = ctypes.POINTER(ctypes.c_ubyte)()
    try:
        while True:
            status = lib.pcap_next_ex(handle, ctypes.byref(header), ctypes.byref(data))
            if status == -2:
                return packets, None
            if status != 1:
                return packets, lib.pcap_geterr(handle).decode()
            h = header.contents
            packets.append((h.sec, h.usec, ctypes.string_at(data, h.caplen)))
    finally:
        lib.pcap_close(handle)


def ours_read(path: Path) -> tuple[list[tuple[int, int, bytes]], str | None]:
    packets: list[tuple[int, int, bytes]] = []
    try:
        with CaptureReader(path) as reader:
            for record in reader:
                packets.append(record)
    except CaptureFileError as error:
        return packets, ("open: " if not packets else "") + str(error)
    return packets, None


def assert_same_as_libpcap(path: Path) -> list[tuple[int, int, bytes]]:
    theirs, their_error = libpcap_read(path)
    ours, our_error = ours_read(path)
    assert ours == theirs
    assert (our_error is None) == (their_error is None), (our_error, their_error)
    return ours


def sample_frames() -> list[bytes]:
    out = []
    for i in range(5):
        packet = frames.ipv4("192.0.2.1", "198.51.100.2", 6, frames.tcp(1000 + i, 20000 + i))
        out.append(frames.ethernet(packet))
    out.append(frames.ethernet(frames.ipv6("2001:db8::1", "2001:db8::2", 17, frames.udp(1, 2))))
    return out


TIMES = [(T0, 0), (T0, 999_999), (T0 + 1, 1), (T0 + 2, 500_000), (0, 0), (T0 + 86400, 123_456)]


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
@pytest.mark.parametrize("nanosecond", [False, True])
@pytest.mark.parametrize("byte_order", ["little", "big"])
def test_written_files_read_the_same_by_libpcap(
    tmp_path: Path, fmt: str, nanosecond: bool, byte_order: str
) -> None:
    path = tmp_path / f"x.{fmt}"
    data = sample_frames()
    with CaptureWriter(
        path, LINKTYPE_ETHERNET, format=fmt, nanosecond=nanosecond, byte_order=byte_order
    ) as writer:
        for (sec, usec), frame in zip(TIMES, data, strict=True):
            writer.write(sec, usec, frame, nsec=usec * 1000 + 999 if nanosecond else None)
    ours = assert_same_as_libpcap(path)
    assert ours == [(s, u, f) for (s, u), f in zip(TIMES, data, strict=True)]
    with CaptureReader(path) as reader:
        assert reader.linktype == LINKTYPE_ETHERNET
        assert reader.format == fmt


def test_snaplen_cuts_and_orig_len_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "short.pcap"
    with CaptureWriter(path, LINKTYPE_RAW, snaplen=30) as writer:
        writer.write(T0, 0, bytes(range(100)))
        writer.write(T0, 1, bytes(10), orig_len=1500)
    assert assert_same_as_libpcap(path) == [(T0, 0, bytes(range(30))), (T0, 1, bytes(10))]


def test_pcap_record_longer_than_the_snaplen_is_cut_like_libpcap(tmp_path: Path) -> None:
    path = tmp_path / "long.pcap"
    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 40, LINKTYPE_RAW)
    record = struct.pack("<iIII", T0, 5, 60, 60) + bytes(range(60))
    path.write_bytes(header + record + record)
    assert assert_same_as_libpcap(path) == [(T0, 5, bytes(range(40)))] * 2


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
@pytest.mark.parametrize("cut", [1, 4, 15, 17, 30, 70])
def test_truncated_final_record_is_an_error_after_the_good_ones(
    tmp_path: Path, fmt: str, cut: int
) -> None:
    path = tmp_path / f"t.{fmt}"
    with CaptureWriter(path, LINKTYPE_ETHERNET, format=fmt) as writer:
        for frame in sample_frames():
            writer.write(T0, 0, frame)
    path.write_bytes(path.read_bytes()[:-cut])
    ours = assert_same_as_libpcap(path)
    assert len(ours) == len(sample_frames()) - 1
    with pytest.raises(CaptureFileError, match=r"truncated"):
        list(CaptureReader(path))


def test_header_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pcap"
    with pytest.raises(CaptureFileError, match=rf"^{missing}: no such file"):
        CaptureReader(missing)
    for name, content, reason in [
        ("empty.pcap", b"", "truncated header"),
        ("short.pcap", struct.pack("<I", 0xA1B2C3D4) + b"\0" * 10, "truncated header"),
        ("text.pcap", b"hello world, not a capture file", "bad magic"),
        ("ng.pcapng", struct.pack("<III", 0x0A0D0D0A, 28, 0x1A2B3C4D), "truncated header"),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CaptureFileError, match=rf"^{path}: {reason}"):
            CaptureReader(path)
        assert libpcap_read(path)[1] is not None  # libpcap refuses them too


# --- hand-made pcapng files: what our writer never produces ---------------------------------


def _block(kind: int, body: bytes, order: str = "<") -> bytes:
    body += b"\0" * (-len(body) % 4)
    length = 12 + len(body)
    return struct.pack(order + "II", kind, length) + body + struct.pack(order + "I", length)


def _shb(order: str = "<") -> bytes:
    return _block(0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1), order)


def _idb(linktype: int, options: bytes = b"", snaplen: int = 65535, order: str = "<") -> bytes:
    return _block(1, struct.pack(order + "HHI", linktype, 0, snaplen) + options, order)


def _option(code: int, value: bytes, order: str = "<") -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def _epb(interface: int, timestamp: int, data: bytes, order: str = "<") -> bytes:
    fixed = struct.pack(
        order + "IIIII", interface, timestamp >> 32, timestamp & 0xFFFFFFFF, len(data), len(data)
    )
    return _block(6, fixed + data, order)


def _spb(data: bytes, orig_len: int | None = None, order: str = "<") -> bytes:
    length = len(data) if orig_len is None else orig_len
    return _block(3, struct.pack(order + "I", length) + data, order)


@pytest.mark.parametrize("order", ["<", ">"])
def test_pcapng_resolutions_offsets_and_block_kinds(tmp_path: Path, order: str) -> None:
    frame = sample_frames()[0]
    content = (
        _shb(order)
        + _block(4, b"\x00\x00\x00\x00", order)  # a name resolution block: skipped
        + _idb(LINKTYPE_ETHERNET, _option(9, b"\x8a", order) + _option(0, b"", order), 64, order)
        + _idb(LINKTYPE_ETHERNET, _option(9, b"\x03", order), 64, order)
        + _idb(LINKTYPE_ETHERNET, _option(14, struct.pack(order + "q", 100), order), 64, order)
        + _idb(LINKTYPE_ETHERNET, _option(9, b"\x09", order), 64, order)
        + _epb(0, (T0 << 10) + 1023, frame, order)  # 2^-10 s units
        + _epb(1, T0 * 1000 + 999, frame, order)  # milliseconds
        + _epb(2, T0 * 1_000_000 + 7, frame, order)  # default microseconds, offset 100 s
        + _epb(3, T0 * 1_000_000_000 + 123_456_789, frame, order)
        + _block(0x0BAD, b"custom", order)
        + _spb(frame, order=order)
        + _spb(bytes(range(70)), order=order)  # cut to the snaplen, 64
    )
    path = tmp_path / "hand.pcapng"
    path.write_bytes(content)
    ours = assert_same_as_libpcap(path)
    assert [(s, u) for s, u, _ in ours] == [
        (T0, 1023 * 1_000_000 // 1024),
        (T0, 999_000),
        (T0 + 100, 7),
        (T0, 123_456),
        (0, 0),
        (0, 0),
    ]
    assert ours[-2][2] == frame and ours[-1][2] == bytes(range(64))


@pytest.mark.parametrize(
    "blocks, message",
    [
        ([_idb(1), _idb(113), _epb(0, 0, b"x")], "link type 113"),
        ([_idb(1), _epb(1, 0, b"x")], "interface 1"),
        ([_idb(1, snaplen=10), _epb(0, 0, b"x" * 11)], "bigger than snaplen"),
        ([_epb(0, 0, b"x"), _idb(1)], "packet block before"),
        ([_block(4, b"")], "no Interface Description"),
    ],
)
def test_pcapng_errors_like_libpcap(tmp_path: Path, blocks: list[bytes], message: str) -> None:
    path = tmp_path / "bad.pcapng"
    path.write_bytes(_shb() + b"".join(blocks))
    theirs, their_error = libpcap_read(path)
    assert their_error is not None
    ours, our_error = ours_read(path)
    assert ours == theirs  # the same packets up to the error, none after it
    assert our_error is not None and re.search(message, our_error), our_error


# --- tcpdump ------------------------------------------------------------------------------


def _tcpdump() -> str:
    path = shutil.which("tcpdump")
    if path is None:
        pytest.skip("tcpdump is not installed")
    return path


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
@pytest.mark.parametrize("linktype", [LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL2])
def test_tcpdump_reads_our_files(tmp_path: Path, fmt: str, linktype: int) -> None:
    path = tmp_path / f"ours.{fmt}"
    packet = frames.ipv4("192.0.2.1", "198.51.100.2", 6, frames.tcp(1234, 20001, "S"))
    with CaptureWriter(path, linktype, format=fmt, nanosecond=fmt == "pcapng") as writer:
        writer.write(T0, 250_000, frames.frame(linktype, packet))
        spa = frames.ipv6("2001:db8::1", "2001:db8::2", 17, frames.udp(999, 62201, bytes(46)))
        writer.write(T0 + 1, 0, frames.frame(linktype, spa))
    result = subprocess.run(
        [_tcpdump(), "-nn", "-tt", "-v", "-r", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{T0}.250000")
    assert "192.0.2.1.1234 > 198.51.100.2.20001: Flags [S]" in result.stdout
    assert "bad cksum" not in result.stdout  # the IPv4 header checksum is right
    assert "2001:db8::1.999 > 2001:db8::2.62201: " in result.stdout  # UDP checksum 0: flagged
    assert "UDP, length 46" in result.stdout


@pytest.mark.parametrize("precision", ["micro", "nano"])
def test_we_read_what_tcpdump_writes(tmp_path: Path, precision: str) -> None:
    source = tmp_path / "source.pcapng"
    data = sample_frames()
    with CaptureWriter(source, LINKTYPE_ETHERNET, format="pcapng", nanosecond=True) as writer:
        for (sec, usec), frame in zip(TIMES, data, strict=True):
            writer.write(sec, usec, frame, nsec=usec * 1000 + 321)
    written = tmp_path / "tcpdump.pcap"
    subprocess.run(
        [_tcpdump(), f"--time-stamp-precision={precision}", "-r", str(source), "-w", str(written)],
        capture_output=True,
        check=True,
    )
    with CaptureReader(written) as reader:
        assert reader.format == "pcap"
        assert reader.nanosecond == (precision == "nano")
        assert list(reader) == [(s, u, f) for (s, u), f in zip(TIMES, data, strict=True)]
    assert_same_as_libpcap(written)
