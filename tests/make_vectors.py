"""Print the 12-bit vector and the negative vectors of docs/protocol.md section 8.

A helper, not a test: ``python tests/make_vectors.py`` writes the blocks that were pasted
into the doc. The doc stays the source of truth; tests/test_protocol_vectors.py checks it.
Positive vectors come from ``knock_client.protocol``; the negative ones seal plaintexts the
module refuses to build (reserved bits, port 0, a wrong version or length), so they call
``cryptography``'s AES-SIV directly, the way section 5 spells the seal.
"""

from __future__ import annotations

import ipaddress
import struct

from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from knock_client.protocol import Action, Knock, KnockLayout, Proto, message_to_digits, seal

KEY_32 = bytes(range(0x00, 0x20))
KEY_64_LOW = bytes(range(0x00, 0x40))
KEY_64_HIGH = bytes(range(0x40, 0x80))


def block(kind: str, fields: dict[str, object]) -> str:
    lines = [f"{name}: {value}" for name, value in fields.items()]
    return "\n".join([f"```{kind}", *lines, "```"])


def words(numbers: list[int]) -> str:
    return " ".join(str(number) for number in numbers)


def raw_seal(key: bytes, header: bytes, plaintext: bytes) -> bytes:
    return header + AESSIV(key).encrypt(plaintext, [header])


def plaintext(flags: int, port: int, timestamp: int, salt: int, duration: int, claim: str) -> bytes:
    fixed = struct.pack(">BHI", flags, port, timestamp) + salt.to_bytes(3, "big")
    return fixed + struct.pack(">H", duration) + ipaddress.ip_address(claim).packed


def twelve_bit() -> str:
    claim = ipaddress.ip_address("203.0.113.7")
    knock = Knock(Action.OPEN, Proto.TCP, 993, 1795771620, claim, 77, 0x5EED12, 300)
    message = seal(knock, KEY_64_HIGH)
    return block("vector", {
        "name": "ipv4-12bit-open-tcp",
        "key": KEY_64_HIGH.hex(),
        "action": knock.action,
        "proto": knock.proto,
        "port": knock.port,
        "timestamp": knock.timestamp,
        "claimed_ip": claim,
        "user_id": knock.user_id,
        "salt": f"0x{knock.salt:06x}",
        "duration": knock.duration,
        "digit_bits": 12,
        "message": message.hex(),
        "digits": words(message_to_digits(message, 12)),
        "ports": "none",  # 23 segments of 4096 ports: no base_port fits them below 65536
    })  # fmt: skip


def receiver(key: bytes, user_id: int, allow: str, source: str, now: int) -> dict[str, object]:
    return {"key": key.hex(), "user_id": user_id, "allow": allow, "source": source, "now": now}


def pad_bits() -> str:
    # The ipv4-6bit-open-udp vector's knock, its last digit's 4 pad bits set to 0101.
    knock = Knock(Action.OPEN, Proto.UDP, 53, 1795771260, ipaddress.ip_address("198.51.100.77"),
                  321, 0xABCDEF, 600)  # fmt: skip
    layout = KnockLayout(base_port=30000, digit_bits=6)
    ports = layout.ports_for(seal(knock, KEY_64_LOW))
    ports[-1] |= 0b0101
    return block("negative-vector", {
        "name": "ipv4-6bit-pad-bits",
        "fault": "pad_bits",
        **receiver(KEY_64_LOW, 321, "53/udp", "198.51.100.77", 1795771260),
        "base_port": 30000,
        "digit_bits": 6,
        "ports": words(ports),
        "reject": "malformed",
    })  # fmt: skip


def conflicting_segment() -> str:
    # The ipv4-8bit-open-tcp vector's knock, after a forged digit for segment 5 came first.
    knock = Knock(Action.OPEN, Proto.TCP, 22, 1795771200, ipaddress.ip_address("192.0.2.10"),
                  7, 0x123456, 0)  # fmt: skip
    layout = KnockLayout(base_port=20000, digit_bits=8)
    message = seal(knock, KEY_32)
    ports = layout.ports_for(message)
    segment = 5
    digit = ports[segment] - layout.base_port - segment * layout.segment_size
    forged = layout.base_port + segment * layout.segment_size + (digit ^ 0x80)
    return block("negative-vector", {
        "name": "ipv4-8bit-conflicting-segment",
        "fault": "conflicting_segment",
        **receiver(KEY_32, 7, "22/tcp", "192.0.2.10", 1795771200),
        "base_port": 20000,
        "digit_bits": 8,
        "ports": words([forged, *ports]),
        "reject": "any",
        "or_accept": message.hex(),
    })  # fmt: skip


def sealed_fault(name: str, fault: str, key: bytes, header: bytes, sealed: bytes,
                 context: dict[str, object]) -> str:  # fmt: skip
    return block("negative-vector", {
        "name": name,
        "fault": fault,
        **context,
        "plaintext": sealed.hex(),
        "message": raw_seal(key, header, sealed).hex(),
        "reject": "malformed",
    })  # fmt: skip


def message_faults() -> list[str]:
    v1_user7 = bytes([0x10, 0x07])
    user7 = receiver(KEY_32, 7, "22/tcp", "192.0.2.10", 1795771200)
    genuine = plaintext(0x00, 22, 1795771200, 0x123456, 0, "192.0.2.10")  # ipv4-8bit-open-tcp
    return [
        sealed_fault("ipv4-reserved-flag-bits", "reserved_flags", KEY_32, v1_user7,
                     bytes([0x01]) + genuine[1:], user7),
        sealed_fault("ipv6-port-zero", "port_zero", KEY_64_HIGH, bytes([0x10, 0x00]),
                     plaintext(0x00, 0, 1795771320, 0xFFFFFF, 65535, "2001:db8::1"),
                     receiver(KEY_64_HIGH, 0, "443/tcp", "2001:db8::1", 1795771320)),
        sealed_fault("ipv4-version-2", "version", KEY_32, bytes([0x20, 0x07]), genuine, user7),
        sealed_fault("ipv4-38-byte-message", "length", KEY_32, v1_user7, genuine + bytes(4),
                     user7),
    ]  # fmt: skip


if __name__ == "__main__":
    print("\n\n".join([twelve_bit(), pad_bits(), conflicting_segment(), *message_faults()]))
