"""The test vectors of docs/protocol.md section 8, checked against the code that uses them.

Every fenced code block whose info string is ``vector`` is one vector of ``key: value``
lines. knock_client.protocol must reproduce each one byte for byte, and a few checks below
follow the spec's text directly (header layout, plaintext layout, port formula) instead of
the module, so that the doc and the code cannot drift apart together.

Every block whose info string is ``negative-vector`` (section 8.1) is input a receiver must
refuse: it is fed to the daemon's own checks, ``knockd_fast.verdict.judge`` for a message
and both capture twins then the judge for a knock, which must refuse it as the block says.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from twins import engine_over_frames

from knock_client.protocol import (
    REJECTION_REASONS,
    Action,
    Knock,
    KnockLayout,
    LayoutError,
    Proto,
    ProtocolError,
    digit_count,
    digits_to_message,
    message_to_digits,
    open_message,
    read_header,
    seal,
    siv_of,
)
from knockd_fast import frames as fr
from knockd_fast.candidates import candidate_messages
from knockd_fast.capture_spec import LINKTYPE_ETHERNET, key_address
from knockd_fast.completions import completion_of
from knockd_fast.config import User
from knockd_fast.verdict import Verdict, judge

PROTOCOL_DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

# Used only while docs/protocol.md does not exist yet; test_doc_exists fails meanwhile.
SAMPLE_VECTOR = """\
name: ipv4-8bit-open-tcp
key: 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f
action: open
proto: tcp
port: 22
timestamp: 1795771200
claimed_ip: 192.0.2.10
user_id: 7
salt: 0x123456
duration: 0
base_port: 20000
digit_bits: 8
message: 1007cdd6ba574611c583bf4d65d660bd6831e63de9342d5a224b68438f37501ab798
ports: 20016 20263 20717 20982 21210 21367 21606 21809 22245 22435 22751 22893 23173 23542 \
23680 24029 24200 24401 24838 24925 25353 25428 25677 25978 26178 26475 26760 26979 27311 \
27479 27760 27962 28375 28600
"""

FIELDS = (
    "name",
    "key",
    "action",
    "proto",
    "port",
    "timestamp",
    "claimed_ip",
    "user_id",
    "salt",
    "duration",
    "base_port",
    "digit_bits",
    "message",
    "ports",
)
# A layout no 16-bit port space holds (section 8): `ports: none`, no base_port, its digits.
PORTLESS_FIELDS = tuple(name for name in FIELDS if name != "base_port") + ("digits",)


def _fence(info: str) -> re.Pattern[str]:
    """A fence of three backticks with info string exactly ``info``, up to the next fence."""
    return re.compile(rf"^```{re.escape(info)}[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def _parse_block(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise AssertionError(f"vector line without 'key: value': {line!r}")
        name = name.strip()
        if name in fields:
            raise AssertionError(f"vector field {name!r} given twice")
        fields[name] = value.strip()
    return fields


def _load_blocks(info: str) -> list[dict[str, str]]:
    if not PROTOCOL_DOC.exists():
        return [_parse_block(SAMPLE_VECTOR)] if info == "vector" else []
    return [_parse_block(body) for body in _fence(info).findall(PROTOCOL_DOC.read_text("utf-8"))]


def _ids(blocks: list[dict[str, str]]) -> list[str]:
    return [block.get("name", f"block-{index}") for index, block in enumerate(blocks)]


BLOCKS = _load_blocks("vector")
PORT_BLOCKS = [block for block in BLOCKS if block.get("ports") != "none"]
PORTLESS_BLOCKS = [block for block in BLOCKS if block.get("ports") == "none"]


class Vector:
    """One parsed vector block, with typed fields."""

    def __init__(self, raw: dict[str, str]) -> None:
        self.name = raw["name"]
        self.key = bytes.fromhex(raw["key"])
        self.action = {"open": Action.OPEN, "close": Action.CLOSE}[raw["action"]]
        self.proto = {"tcp": Proto.TCP, "udp": Proto.UDP}[raw["proto"]]
        self.port = int(raw["port"])
        self.timestamp = int(raw["timestamp"])
        self.claimed_ip = ipaddress.ip_address(raw["claimed_ip"])
        self.user_id = int(raw["user_id"])
        assert raw["salt"].startswith("0x"), "salt is written as 0x hex"
        self.salt = int(raw["salt"], 16)
        self.duration = int(raw["duration"])
        self.base_port = int(raw["base_port"]) if "base_port" in raw else None
        self.digit_bits = int(raw["digit_bits"])
        self.message = bytes.fromhex(raw["message"])
        portless = raw["ports"] == "none"
        self.ports = None if portless else [int(port) for port in raw["ports"].split()]
        self.digits = [int(digit) for digit in raw["digits"].split()] if "digits" in raw else None

    def knock(self, timestamp: int | None = None) -> Knock:
        return Knock(
            action=self.action,
            proto=self.proto,
            port=self.port,
            timestamp=self.timestamp if timestamp is None else timestamp,
            claimed_ip=self.claimed_ip,
            user_id=self.user_id,
            salt=self.salt,
            duration=self.duration,
        )

    def layout(self) -> KnockLayout:
        assert self.base_port is not None, f"{self.name} has no ports"
        return KnockLayout(base_port=self.base_port, digit_bits=self.digit_bits)


def _vector(raw: dict[str, str]) -> Vector:
    fields = set(PORTLESS_FIELDS if raw.get("ports") == "none" else FIELDS)
    assert set(raw) == fields, (
        f"missing {sorted(fields - set(raw))}, unknown {sorted(set(raw) - fields)}"
    )
    return Vector(raw)


@pytest.fixture(params=BLOCKS, ids=_ids(BLOCKS))
def vector(request: pytest.FixtureRequest) -> Vector:
    return _vector(request.param)


@pytest.fixture(params=PORT_BLOCKS, ids=_ids(PORT_BLOCKS))
def port_vector(request: pytest.FixtureRequest) -> Vector:
    return _vector(request.param)


@pytest.fixture(params=PORTLESS_BLOCKS, ids=_ids(PORTLESS_BLOCKS))
def portless_vector(request: pytest.FixtureRequest) -> Vector:
    return _vector(request.param)


# --- the set of vectors ----------------------------------------------------------------


def test_doc_exists() -> None:
    assert PROTOCOL_DOC.is_file(), f"{PROTOCOL_DOC} is missing; its vectors are the spec"


def test_vectors_cover_the_format() -> None:
    vectors = [_vector(raw) for raw in BLOCKS]
    assert len(vectors) >= 6, f"only {len(vectors)} vector blocks in {PROTOCOL_DOC.name}"
    names = [vector.name for vector in vectors]
    assert len(set(names)) == len(names), f"duplicate vector names: {names}"
    lengths = {len(vector.message) for vector in vectors}
    assert {34, 46} <= lengths, f"need IPv4 (34-byte) and IPv6 (46-byte) messages, got {lengths}"
    widths = {vector.digit_bits for vector in vectors}
    assert {4, 6, 8, 10, 11, 12} <= widths, f"need every row of the 6.1 table, got {widths}"
    assert any(vector.digit_bits == 12 and vector.ports is None for vector in vectors), (
        "need a 12-bit vector, given as digits (no port space holds it)"
    )
    assert {len(vector.key) for vector in vectors} == {32, 64}, "need both key sizes"
    assert {vector.action for vector in vectors} == set(Action)
    assert {vector.proto for vector in vectors} == set(Proto)
    assert any(vector.timestamp >= 1 << 32 for vector in vectors), "need a timestamp past 2^32"


# --- each vector ---------------------------------------------------------------------------


def test_seal(vector: Vector) -> None:
    assert seal(vector.knock(), vector.key).hex() == vector.message.hex()


def test_ports_for(port_vector: Vector) -> None:
    assert port_vector.layout().ports_for(port_vector.message) == port_vector.ports


def test_message_from_reversed_ports(port_vector: Vector) -> None:
    ports = list(reversed(port_vector.ports or ()))
    rebuilt = port_vector.layout().message_from_ports(ports, len(port_vector.message))
    assert rebuilt.hex() == port_vector.message.hex()


def test_digits(vector: Vector) -> None:
    """The digit cutting alone, which needs no port range: the only check a portless vector
    allows, and for the others the digits their ports carry."""
    bits = vector.digit_bits
    if vector.ports is None:
        digits = vector.digits
    else:
        assert vector.base_port is not None
        digits = [(port - vector.base_port) % (1 << bits) for port in vector.ports]
    assert message_to_digits(vector.message, bits) == digits
    assert digits_to_message(digits, bits, len(vector.message)).hex() == vector.message.hex()


def test_portless_only_where_no_port_space_holds_the_layout(portless_vector: Vector) -> None:
    bits, length = portless_vector.digit_bits, len(portless_vector.message)
    assert digit_count(length, bits) << bits > 65535
    with pytest.raises(LayoutError, match="past 65535"):
        KnockLayout(base_port=1, digit_bits=bits).port_range(length)


def test_open_message(vector: Vector) -> None:
    opened = open_message(vector.message, vector.key)
    assert opened == vector.knock(timestamp=vector.timestamp % (1 << 32))
    assert opened.timestamp < 1 << 32


def test_read_header(vector: Vector) -> None:
    assert read_header(vector.message) == vector.user_id


def test_vector_follows_the_spec_text(vector: Vector) -> None:
    """Rebuild the vector from docs/protocol.md sections 2-6 alone, without the module."""
    message = vector.message
    family = vector.claimed_ip.version
    assert len(message) == {4: 34, 6: 46}[family]
    # Section 3: version nibble 1, 12-bit user id.
    assert message[:2] == bytes([(1 << 4) | (vector.user_id >> 8), vector.user_id & 0xFF])
    # Section 4/5: AES-SIV over the plaintext layout with the header as the only AD.
    flags = (0x80 if vector.action == Action.CLOSE else 0) | (
        0x40 if vector.proto == Proto.UDP else 0
    )
    plaintext = (
        bytes([flags])
        + vector.port.to_bytes(2, "big")
        + (vector.timestamp % (1 << 32)).to_bytes(4, "big")
        + vector.salt.to_bytes(3, "big")
        + vector.duration.to_bytes(2, "big")
        + vector.claimed_ip.packed
    )
    assert AESSIV(vector.key).decrypt(message[2:], [message[:2]]) == plaintext
    assert siv_of(message) == message[2:18]
    # Section 6.1: MSB-first digits, right zero padding, port = base + i * 2^bits + d.
    bits = vector.digit_bits
    count = -(-8 * len(message) // bits)
    value = int.from_bytes(message, "big") << (count * bits - 8 * len(message))
    digits = [(value >> (bits * (count - 1 - i))) & ((1 << bits) - 1) for i in range(count)]
    if vector.ports is None:
        assert digits == vector.digits
    else:
        base = vector.base_port or 0
        assert vector.ports == [base + i * (1 << bits) + d for i, d in enumerate(digits)]
        assert vector.ports[-1] <= 65535


# --- negative vectors (section 8.1) -----------------------------------------------------------

NEGATIVE_BLOCKS = _load_blocks("negative-vector")
NEGATIVE_COMMON = ("name", "fault", "key", "user_id", "allow", "source", "now", "reject")
# Each fault of section 8.1's table and the form of its input.
FAULTS = {
    "pad_bits": "ports",
    "conflicting_segment": "ports",
    "reserved_flags": "message",
    "port_zero": "message",
    "version": "message",
    "length": "message",
}
FORM_FIELDS = {  # (required, optional) beyond NEGATIVE_COMMON
    "message": ({"message", "plaintext"}, {"or_accept"}),
    "ports": ({"base_port", "digit_bits", "ports"}, {"or_accept"}),
}
# What knockd-fast's judge says about each message fault: malformed for the stated cause.
FAULT_DETAILS = {
    "reserved_flags": "reserved flag bits set",
    "port_zero": "port 0",
    "version": "protocol version 2",
    "length": "bytes; v1 messages have",
}
WINDOW = 30  # section 8.1: the default window
DESTINATIONS = {4: "198.51.100.20", 6: "2001:db8:1::20"}
SOURCE_PORT = 43210


def _never_seen(user_id: int, siv: bytes, sent_at: int) -> bool:
    return False


class NegativeVector:
    """One parsed negative-vector block, with the receiver it describes."""

    def __init__(self, raw: dict[str, str]) -> None:
        self.name = raw["name"]
        self.fault = raw["fault"]
        assert self.fault in FAULTS, f"{self.name}: unknown fault {self.fault!r}"
        self.form = FAULTS[self.fault]
        required, optional = FORM_FIELDS[self.form]
        missing = (set(NEGATIVE_COMMON) | required) - set(raw)
        unknown = set(raw) - set(NEGATIVE_COMMON) - required - optional
        assert not missing and not unknown, f"missing {sorted(missing)}, unknown {sorted(unknown)}"
        self.key = bytes.fromhex(raw["key"])
        self.user_id = int(raw["user_id"])
        port, _, proto = raw["allow"].partition("/")
        self.allow = (int(port), proto)
        self.source = ipaddress.ip_address(raw["source"])
        self.now = int(raw["now"])
        self.reject = raw["reject"]
        assert self.reject == "any" or self.reject in REJECTION_REASONS, self.reject
        self.or_accept = bytes.fromhex(raw["or_accept"]) if "or_accept" in raw else None
        # "any" is meant only where accepting one stated message is the alternative.
        assert (self.reject == "any") == (self.or_accept is not None), self.name
        self.message = bytes.fromhex(raw["message"]) if "message" in raw else b""
        self.plaintext = bytes.fromhex(raw["plaintext"]) if "plaintext" in raw else b""
        self.base_port = int(raw.get("base_port", 0))
        self.digit_bits = int(raw.get("digit_bits", 0))
        self.ports = [int(port) for port in raw.get("ports", "").split()]

    @property
    def message_len(self) -> int:
        return {4: 34, 6: 46}[self.source.version]

    def layout(self) -> KnockLayout:
        return KnockLayout(base_port=self.base_port, digit_bits=self.digit_bits)

    def users(self) -> dict[int, User]:
        exact = {4: 32, 6: 128}
        allow = frozenset({self.allow})
        return {self.user_id: User(self.user_id, "vector", self.key, Path("/k"), allow, exact)}

    def judge(self, candidates: Iterable[bytes]) -> Verdict:
        destination = DESTINATIONS[self.source.version]
        return judge(
            candidates, self.source, destination, self.now, self.users(), WINDOW, _never_seen
        )

    def seal_raw(self, header: bytes, plaintext: bytes) -> bytes:
        return header + AESSIV(self.key).encrypt(plaintext, [header])


def _negatives(form: str) -> list[dict[str, str]]:
    return [raw for raw in NEGATIVE_BLOCKS if FAULTS.get(raw.get("fault", "")) == form]


MESSAGE_NEGATIVES = _negatives("message")
PORT_NEGATIVES = _negatives("ports")


@pytest.fixture(params=MESSAGE_NEGATIVES, ids=_ids(MESSAGE_NEGATIVES))
def bad_message(request: pytest.FixtureRequest) -> NegativeVector:
    return NegativeVector(request.param)


@pytest.fixture(params=PORT_NEGATIVES, ids=_ids(PORT_NEGATIVES))
def bad_knock(request: pytest.FixtureRequest) -> NegativeVector:
    return NegativeVector(request.param)


def _captured(
    engine_module: ModuleType,
    vector: NegativeVector,
    layout: KnockLayout,
    frames: list[bytes],
) -> tuple[str, bytes | None]:
    """What knockd-fast makes of ``frames`` (sent at the vector's ``now``): the judge's
    (reason, accepted message or None), or ("malformed", None) when the engine counted a
    malformed packet and completed no message (section 8.1)."""
    records, stats = engine_over_frames(engine_module, layout, frames, vector.now)
    if not len(records):
        assert stats["malformed"] >= 1, f"nothing completed and nothing malformed: {stats}"
        return "malformed", None
    assert len(records) == 1, f"{len(records)} completions"
    record = records[0]
    assert key_address(bytes(record["source"])) == vector.source
    verdict = vector.judge(candidate_messages(completion_of(record), layout.digit_bits))
    return verdict.reason, verdict.message if verdict.accepted else None


def test_negative_vectors_cover_the_faults() -> None:
    vectors = [NegativeVector(raw) for raw in NEGATIVE_BLOCKS]
    names = [vector.name for vector in vectors] + [raw["name"] for raw in BLOCKS]
    assert len(set(names)) == len(names), f"duplicate vector names: {names}"
    faults = sorted(vector.fault for vector in vectors)
    assert set(faults) == set(FAULTS), f"need one vector per fault of 8.1: {faults}"


def test_negative_message_is_authentic_with_its_fault(bad_message: NegativeVector) -> None:
    """From the spec's text alone: the message opens, and is wrong only as its fault says."""
    message, plaintext = bad_message.message, bad_message.plaintext
    assert AESSIV(bad_message.key).decrypt(message[2:], [message[:2]]) == plaintext
    assert ((message[0] & 0x0F) << 8) | message[1] == bad_message.user_id
    faulty = {
        "reserved_flags": plaintext[0] & 0x3F != 0,
        "port_zero": plaintext[1:3] == b"\0\0",
        "version": message[0] >> 4 != 1,
        "length": len(message) not in (34, 46),
    }
    assert [fault for fault, broken in faulty.items() if broken] == [bad_message.fault]


def test_negative_message_is_one_fault_from_accepted(bad_message: NegativeVector) -> None:
    header, plaintext = bad_message.message[:2], bad_message.plaintext
    fault = bad_message.fault
    if fault == "reserved_flags":
        plaintext = bytes([plaintext[0] & 0xC0]) + plaintext[1:]
    elif fault == "port_zero":
        plaintext = plaintext[:1] + bad_message.allow[0].to_bytes(2, "big") + plaintext[3:]
    elif fault == "version":
        header = bytes([0x10 | header[0] & 0x0F, header[1]])
    elif fault == "length":
        plaintext = plaintext[: bad_message.message_len - 18]
    verdict = bad_message.judge([bad_message.seal_raw(header, plaintext)])
    assert (verdict.accepted, verdict.reason) == (True, "ok"), verdict.detail


def test_negative_message_judged(bad_message: NegativeVector) -> None:
    verdict = bad_message.judge([bad_message.message])
    assert (verdict.accepted, verdict.reason) == (False, bad_message.reject), verdict.detail
    assert FAULT_DETAILS[bad_message.fault] in verdict.detail


def test_negative_message_as_spa(bad_message: NegativeVector, engine_module: ModuleType) -> None:
    layout = KnockLayout()
    source = str(bad_message.source)
    frame = fr.spa_frame(
        layout, bad_message.message, source, DESTINATIONS[bad_message.source.version],
        LINKTYPE_ETHERNET, sport=SOURCE_PORT,
    )  # fmt: skip
    outcome = _captured(engine_module, bad_message, layout, [frame])
    assert outcome == (bad_message.reject, None)


def _syn_frames(vector: NegativeVector, ports: list[int]) -> list[bytes]:
    destination = DESTINATIONS[vector.source.version]
    return [
        fr.frame(
            LINKTYPE_ETHERNET,
            fr.ip(str(vector.source), destination, fr.PROTO_TCP, fr.tcp(SOURCE_PORT, port, "S")),
        )
        for port in ports
    ]


def test_negative_knock_through_the_capture(
    bad_knock: NegativeVector, engine_module: ModuleType
) -> None:
    frames = _syn_frames(bad_knock, bad_knock.ports)
    reason, accepted = _captured(engine_module, bad_knock, bad_knock.layout(), frames)
    if bad_knock.or_accept is not None:
        # knockd-fast keeps alternatives: it finds the genuine combination (section 8.1).
        assert (reason, accepted) == ("ok", bad_knock.or_accept)
    else:
        assert (reason, accepted) == (bad_knock.reject, None)


def _repaired_ports(vector: NegativeVector) -> list[int]:
    """The knock without its fault: a knock the receiver accepts."""
    layout = vector.layout()
    count = digit_count(vector.message_len, vector.digit_bits)
    segment_of = {port: (port - layout.base_port) // layout.segment_size for port in vector.ports}
    if vector.fault == "pad_bits":
        pad_mask = (1 << (count * vector.digit_bits - 8 * vector.message_len)) - 1
        return [
            port - ((port - layout.base_port) & pad_mask) if segment_of[port] == count - 1 else port
            for port in vector.ports
        ]
    assert vector.or_accept is not None
    genuine = layout.ports_for(vector.or_accept)
    extra = [port for port in vector.ports if port not in genuine]
    # The genuine ports, each once, and one forged port for one of the knock's segments.
    assert sorted(vector.ports) == sorted(genuine + extra) and len(extra) == 1
    assert segment_of[extra[0]] < count
    return genuine


def test_negative_knock_is_one_fault_from_accepted(bad_knock: NegativeVector) -> None:
    ports = _repaired_ports(bad_knock)
    assert ports != bad_knock.ports
    message = bad_knock.layout().message_from_ports(ports, bad_knock.message_len)
    verdict = bad_knock.judge([message])
    assert (verdict.accepted, verdict.reason) == (True, "ok"), verdict.detail


def test_negative_knock_without_alternatives(bad_knock: NegativeVector) -> None:
    """A receiver that keeps no alternatives rejects: refusing the conflict, or keeping the
    first digit of each segment, which forms a message that does not authenticate."""
    layout = bad_knock.layout()
    with pytest.raises(ProtocolError) as refused:
        layout.message_from_ports(bad_knock.ports, bad_knock.message_len)
    assert bad_knock.reject in ("any", refused.value.reason)
    if bad_knock.or_accept is None:
        return
    first_per_segment: dict[int, int] = {}
    for port in bad_knock.ports:
        first_per_segment.setdefault((port - layout.base_port) // layout.segment_size, port)
    first = layout.message_from_ports(first_per_segment.values(), bad_knock.message_len)
    assert first != bad_knock.or_accept
    verdict = bad_knock.judge([first])
    assert (verdict.accepted, verdict.reason) == (False, "authentication")
