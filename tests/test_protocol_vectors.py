"""The test vectors of docs/protocol.md section 8, checked against knock_client.protocol.

Every fenced code block whose info string is ``vector`` is one vector of ``key: value``
lines. The module must reproduce each one byte for byte, and a few checks below follow the
spec's text directly (header layout, plaintext layout, port formula) instead of the module,
so that the doc and the code cannot drift apart together.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from knock_client.protocol import (
    Action,
    Knock,
    KnockLayout,
    Proto,
    open_message,
    read_header,
    seal,
    siv_of,
)

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

# A fence of three or more backticks with info string exactly "vector", up to the next fence.
_BLOCK = re.compile(r"^```vector[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


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


def _load_blocks() -> list[dict[str, str]]:
    if not PROTOCOL_DOC.exists():
        return [_parse_block(SAMPLE_VECTOR)]
    return [_parse_block(body) for body in _BLOCK.findall(PROTOCOL_DOC.read_text("utf-8"))]


BLOCKS = _load_blocks()
BLOCK_IDS = [block.get("name", f"block-{index}") for index, block in enumerate(BLOCKS)]


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
        self.base_port = int(raw["base_port"])
        self.digit_bits = int(raw["digit_bits"])
        self.message = bytes.fromhex(raw["message"])
        self.ports = [int(port) for port in raw["ports"].split()]

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
        return KnockLayout(base_port=self.base_port, digit_bits=self.digit_bits)


@pytest.fixture(params=BLOCKS, ids=BLOCK_IDS)
def vector(request: pytest.FixtureRequest) -> Vector:
    raw = request.param
    assert set(raw) == set(FIELDS), (
        f"missing {sorted(set(FIELDS) - set(raw))}, unknown {sorted(set(raw) - set(FIELDS))}"
    )
    return Vector(raw)


# --- the set of vectors ----------------------------------------------------------------


def test_doc_exists() -> None:
    assert PROTOCOL_DOC.is_file(), f"{PROTOCOL_DOC} is missing; its vectors are the spec"


def test_vectors_cover_the_format() -> None:
    vectors = [Vector(raw) for raw in BLOCKS]
    assert len(vectors) >= 6, f"only {len(vectors)} vector blocks in {PROTOCOL_DOC.name}"
    names = [vector.name for vector in vectors]
    assert len(set(names)) == len(names), f"duplicate vector names: {names}"
    lengths = {len(vector.message) for vector in vectors}
    assert {34, 46} <= lengths, f"need IPv4 (34-byte) and IPv6 (46-byte) messages, got {lengths}"
    widths = {vector.digit_bits for vector in vectors}
    assert len(widths) >= 2, f"need at least two digit widths, got {widths}"
    assert {len(vector.key) for vector in vectors} == {32, 64}, "need both key sizes"
    assert {vector.action for vector in vectors} == set(Action)
    assert {vector.proto for vector in vectors} == set(Proto)
    assert any(vector.timestamp >= 1 << 32 for vector in vectors), "need a timestamp past 2^32"


# --- each vector ---------------------------------------------------------------------------


def test_seal(vector: Vector) -> None:
    assert seal(vector.knock(), vector.key).hex() == vector.message.hex()


def test_ports_for(vector: Vector) -> None:
    assert vector.layout().ports_for(vector.message) == vector.ports


def test_message_from_reversed_ports(vector: Vector) -> None:
    ports = list(reversed(vector.ports))
    rebuilt = vector.layout().message_from_ports(ports, len(vector.message))
    assert rebuilt.hex() == vector.message.hex()


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
    assert vector.ports == [vector.base_port + i * (1 << bits) + d for i, d in enumerate(digits)]
    assert vector.ports[-1] <= 65535
