"""Knock protocol v1: the wire format, in one place.

docs/protocol.md is the specification; this module is its only implementation.
The daemon imports it, so client and server can never disagree on a byte.

A message is ``header || SIV || ciphertext``::

    header      2 bytes  version (4 bits) | user id (12 bits), sent in clear,
                         authenticated as AES-SIV associated data
    SIV         16 bytes AES-SIV synthetic IV (the authentication tag)
    ciphertext  16 bytes (IPv4) or 28 bytes (IPv6) sealed plaintext

The message travels either as digits spread over a port range (one knock packet
per digit, in any order) or whole, as the payload of one UDP datagram (SPA).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

VERSION = 1
HEADER_LEN = 2
SIV_LEN = 16
SALT_BITS = 24
USER_ID_BITS = 12
MAX_USER_ID = (1 << USER_ID_BITS) - 1
KEY_LENGTHS = (32, 64)  # AES-SIV with AES-128 or AES-256: 256- or 512-bit keys

# flags, port, timestamp, salt, duration; the claimed address follows.
_FIXED_PLAINTEXT = struct.Struct(">BHIHBH")  # the salt is split 16+8 bits
_FLAG_CLOSE = 0x80
_FLAG_UDP = 0x40
_FLAGS_RESERVED = 0x3F
FIXED_PLAINTEXT_LEN = _FIXED_PLAINTEXT.size  # 12

MESSAGE_LEN_IPV4 = HEADER_LEN + SIV_LEN + FIXED_PLAINTEXT_LEN + 4  # 34
MESSAGE_LEN_IPV6 = HEADER_LEN + SIV_LEN + FIXED_PLAINTEXT_LEN + 16  # 46
MESSAGE_LENGTHS = {4: MESSAGE_LEN_IPV4, 6: MESSAGE_LEN_IPV6}
_FAMILY_OF_LENGTH = {length: family for family, length in MESSAGE_LENGTHS.items()}

MIN_DIGIT_BITS = 4
MAX_DIGIT_BITS = 12
DEFAULT_DIGIT_BITS = 8
DEFAULT_BASE_PORT = 20000
DEFAULT_SPA_PORT = 62201
MAX_DURATION = 0xFFFF

# Reason names a receiver reports, in the order it checks them (docs/protocol.md §7).
REJECTION_REASONS = (
    "malformed",
    "unknown_user",
    "authentication",
    "expired",
    "from_future",
    "source_mismatch",
    "replay",
    "not_allowed",
    "limit",  # a receiver's own caps on what one user may hold and send (§7, check 9)
    "fleet_unavailable",  # a fleet receiver set to refuse while its shared claims are down
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ProtocolError(ValueError):
    """A message, digit list or port list that cannot be decoded.

    ``reason`` is the rejection name a receiver logs for it.
    """

    reason = "malformed"


class MessageLengthError(ProtocolError):
    """The message is neither 34 (IPv4) nor 46 (IPv6) bytes long."""


class HeaderError(ProtocolError):
    """The clear header names a protocol version this implementation does not speak."""


class DigitRangeError(ProtocolError):
    """A digit does not fit in digit_bits, or the digit count is wrong."""


class PaddingError(ProtocolError):
    """The pad bits of the last digit are not zero."""


class PortRangeError(ProtocolError):
    """A port lies outside the knock range of the layout."""


class MissingSegmentError(ProtocolError):
    """No port was seen for some segment of the range."""


class ConflictingSegmentError(ProtocolError):
    """Two different ports were seen for the same segment."""


class AuthenticationError(ProtocolError):
    """AES-SIV rejected the message: wrong key, or altered in transit."""

    reason = "authentication"


class PlaintextError(ProtocolError):
    """An authentic message whose plaintext breaks the format (reserved bits, port 0)."""


class FieldError(ValueError):
    """A field given to ``seal`` is outside what the format can carry."""


class LayoutError(ValueError):
    """Knock settings that cannot work: bad digit width, range past 65535 or over the SPA port."""


class Action(enum.IntEnum):
    OPEN = 0
    CLOSE = 1

    def __str__(self) -> str:
        return _ACTION_NAMES[self]


class Proto(enum.IntEnum):
    TCP = 0
    UDP = 1

    def __str__(self) -> str:
        return _PROTO_NAMES[self]


# Looked up, not self.name.lower() (an enum property): the daemon says every knock's
# action and protocol in its log and its grants. One table per enum: OPEN == TCP == 0.
_ACTION_NAMES = {member: member.name.lower() for member in Action}
_PROTO_NAMES = {member: member.name.lower() for member in Proto}


@dataclass(frozen=True)
class Knock:
    """The fields of one message.

    ``timestamp`` is Unix time in seconds; the wire keeps it modulo 2**32, and
    ``open_message`` returns that 32-bit value (see ``seconds_since``).
    ``duration`` is the requested open time in seconds; 0 asks for the server's default.
    """

    action: Action
    proto: Proto
    port: int
    timestamp: int
    claimed_ip: IPAddress
    user_id: int
    salt: int
    duration: int = 0

    @property
    def family(self) -> int:
        return self.claimed_ip.version

    def as_json(self) -> dict[str, object]:
        return {
            "action": str(self.action),
            "proto": str(self.proto),
            "port": self.port,
            "timestamp": self.timestamp,
            "claimed_ip": str(self.claimed_ip),
            "user_id": self.user_id,
            "salt": self.salt,
            "duration": self.duration,
        }


def check_key(key: bytes) -> bytes:
    if len(key) not in KEY_LENGTHS:
        raise FieldError(f"a key has 32 or 64 bytes (256 or 512 bits), not {len(key)}")
    return key


@functools.lru_cache(maxsize=4096)
def _cipher(key: bytes) -> AESSIV:
    # Building an AESSIV costs twice a decryption; a daemon opens every knock with one of
    # its users' keys (at most 4096 users).
    return AESSIV(check_key(key))


def encode_header(user_id: int, version: int = VERSION) -> bytes:
    if not 0 <= user_id <= MAX_USER_ID:
        raise FieldError(f"user id {user_id} is outside 0..{MAX_USER_ID}")
    return bytes(((version << 4) | (user_id >> 8), user_id & 0xFF))


def read_header(message: bytes) -> int:
    """Check length and version; return the user id the header names."""
    family_of(message)
    version = message[0] >> 4
    if version != VERSION:
        raise HeaderError(f"protocol version {version}, this receiver speaks {VERSION}")
    return ((message[0] & 0x0F) << 8) | message[1]


def family_of(message: bytes) -> int:
    """The claimed address family (4 or 6) a message's length implies."""
    try:
        return _FAMILY_OF_LENGTH[len(message)]
    except KeyError:
        raise MessageLengthError(
            f"message of {len(message)} bytes; v1 messages have "
            f"{MESSAGE_LEN_IPV4} (IPv4) or {MESSAGE_LEN_IPV6} (IPv6)"
        ) from None


def seal(knock: Knock, key: bytes) -> bytes:
    """Encode and seal ``knock`` under ``key``; deterministic for given fields and salt."""
    _check_fields(knock)
    header = encode_header(knock.user_id)
    flags = (_FLAG_CLOSE if knock.action == Action.CLOSE else 0) | (
        _FLAG_UDP if knock.proto == Proto.UDP else 0
    )
    plaintext = (
        _FIXED_PLAINTEXT.pack(
            flags,
            knock.port,
            knock.timestamp & 0xFFFFFFFF,
            knock.salt >> 8,
            knock.salt & 0xFF,
            knock.duration,
        )
        + knock.claimed_ip.packed
    )
    return header + _cipher(bytes(key)).encrypt(plaintext, [header])


def open_message(message: bytes, key: bytes) -> Knock:
    """Authenticate and decode a message; raises a ``ProtocolError`` subclass on any fault."""
    knock = unseal(message, key)
    if knock is None:
        user_id = read_header(bytes(message))
        raise AuthenticationError(f"message does not authenticate for user {user_id}")
    return knock


def unseal(message: bytes, key: bytes, user_id: int | None = None) -> Knock | None:
    """``open_message``, but None for a message that does not authenticate: what a daemon
    under attack sees most, and raising would cost it more than the decryption.
    ``user_id``: what ``read_header(message)`` returned, when the caller has called it
    already (to find the key); it is not read again."""
    if type(message) is not bytes:
        message = bytes(message)
    if user_id is None:
        user_id = read_header(message)
    try:
        plaintext = _cipher(bytes(key)).decrypt(message[HEADER_LEN:], [message[:HEADER_LEN]])
    except InvalidTag:
        return None
    flags, port, timestamp, salt_high, salt_low, duration = _FIXED_PLAINTEXT.unpack_from(plaintext)
    if flags & _FLAGS_RESERVED:
        raise PlaintextError(f"reserved flag bits set: {flags & _FLAGS_RESERVED:#04x}")
    if port == 0:
        raise PlaintextError("port 0")
    return Knock(  # positionally: the daemon opens every knock, keywords cost 0.5 µs
        Action.CLOSE if flags & _FLAG_CLOSE else Action.OPEN,
        Proto.UDP if flags & _FLAG_UDP else Proto.TCP,
        port,
        timestamp,
        ipaddress.ip_address(plaintext[FIXED_PLAINTEXT_LEN:]),
        user_id,
        (salt_high << 8) | salt_low,
        duration,
    )


def siv_of(message: bytes) -> bytes:
    """The 16-byte SIV: unique per (key, header, plaintext), so it names a message for replays."""
    family_of(message)
    return bytes(message[HEADER_LEN : HEADER_LEN + SIV_LEN])


def seconds_since(timestamp32: int, now: float) -> int:
    """Age in seconds of a wire timestamp at ``now`` (negative: from the future).

    The wire keeps Unix time modulo 2**32; the age is taken as the nearest
    signed value, so the format outlives 2106 without a flag day.
    """
    age = (int(now) - timestamp32) & 0xFFFFFFFF
    return age - (1 << 32) if age >= 1 << 31 else age


def _check_fields(knock: Knock) -> None:
    if not 1 <= knock.port <= 0xFFFF:
        raise FieldError(f"port {knock.port} is outside 1..65535")
    if knock.timestamp < 0:
        raise FieldError(f"timestamp {knock.timestamp} is negative")
    if not 0 <= knock.salt < 1 << SALT_BITS:
        raise FieldError(f"salt {knock.salt} does not fit in {SALT_BITS} bits")
    if not 0 <= knock.duration <= MAX_DURATION:
        raise FieldError(f"duration {knock.duration} is outside 0..{MAX_DURATION} seconds")
    if isinstance(knock.claimed_ip, ipaddress.IPv6Address) and knock.claimed_ip.ipv4_mapped:
        raise FieldError(f"claimed address {knock.claimed_ip} is IPv4-mapped; claim the IPv4 form")
    if knock.action not in Action.__members__.values():
        raise FieldError(f"action {knock.action!r} is neither open nor close")
    if knock.proto not in Proto.__members__.values():
        raise FieldError(f"protocol {knock.proto!r} is neither tcp nor udp")


# --- digits ---------------------------------------------------------------------------


def digit_count(message_len: int, digit_bits: int) -> int:
    _check_digit_bits(digit_bits)
    return -(-message_len * 8 // digit_bits)


def message_to_digits(message: bytes, digit_bits: int) -> list[int]:
    """Split the message bits MSB-first into digits; the last digit is zero-padded on the right."""
    count = digit_count(len(message), digit_bits)
    pad = count * digit_bits - len(message) * 8
    value = int.from_bytes(message, "big") << pad
    mask = (1 << digit_bits) - 1
    return [(value >> (digit_bits * (count - 1 - i))) & mask for i in range(count)]


def digits_to_message(digits: Sequence[int], digit_bits: int, message_len: int) -> bytes:
    count = digit_count(message_len, digit_bits)
    if len(digits) != count:
        raise DigitRangeError(
            f"{len(digits)} digits; a {message_len}-byte message at {digit_bits} bits has {count}"
        )
    value = 0
    for index, digit in enumerate(digits):
        if not 0 <= digit < 1 << digit_bits:
            raise DigitRangeError(
                f"digit {digit} at index {index} does not fit in {digit_bits} bits"
            )
        value = (value << digit_bits) | digit
    pad = count * digit_bits - message_len * 8
    if value & ((1 << pad) - 1):
        raise PaddingError(f"the last digit's {pad} pad bits are not zero")
    return (value >> pad).to_bytes(message_len, "big")


def _check_digit_bits(digit_bits: int) -> None:
    if not MIN_DIGIT_BITS <= digit_bits <= MAX_DIGIT_BITS:
        raise LayoutError(f"digit_bits {digit_bits} is outside {MIN_DIGIT_BITS}..{MAX_DIGIT_BITS}")


@dataclass(frozen=True)
class KnockLayout:
    """Where digits land: port = base_port + segment * 2**digit_bits + digit.

    Construction checks what is independent of message length; ``port_range``
    checks that a message of a given length fits (client and daemon call it).
    """

    base_port: int = DEFAULT_BASE_PORT
    digit_bits: int = DEFAULT_DIGIT_BITS
    spa_port: int = DEFAULT_SPA_PORT

    def __post_init__(self) -> None:
        _check_digit_bits(self.digit_bits)
        if not 1 <= self.base_port <= 0xFFFF:
            raise LayoutError(f"base_port {self.base_port} is outside 1..65535")
        if not 1 <= self.spa_port <= 0xFFFF:
            raise LayoutError(f"spa_port {self.spa_port} is outside 1..65535")

    @property
    def segment_size(self) -> int:
        return 1 << self.digit_bits

    def port_range(self, message_len: int) -> range:
        """All ports a message of this length may use; raises LayoutError if they cannot work."""
        segments = digit_count(message_len, self.digit_bits)
        ports = range(self.base_port, self.base_port + segments * self.segment_size)
        family = _FAMILY_OF_LENGTH.get(message_len)
        what = f"IPv{family}" if family else f"{message_len}-byte"
        if ports.stop - 1 > 0xFFFF:
            highest_base = 0x10000 - segments * self.segment_size
            hint = (
                f"lower base_port to at most {highest_base}"
                if highest_base >= 1
                else "use fewer digit_bits"
            )
            raise LayoutError(
                f"knock range for {what} messages ({segments} segments of {self.segment_size} "
                f"ports from {self.base_port}) ends at {ports.stop - 1}, past 65535: {hint}"
            )
        if self.spa_port in ports:
            raise LayoutError(
                f"spa_port {self.spa_port} lies inside the knock range "
                f"{ports.start}-{ports.stop - 1} for {what} messages: move spa_port outside "
                "it, or change base_port"
            )
        return ports

    def ports_for(self, message: bytes) -> list[int]:
        """The knock ports of a message, in segment order."""
        self.port_range(len(message))
        return [
            self.base_port + index * self.segment_size + digit
            for index, digit in enumerate(message_to_digits(message, self.digit_bits))
        ]

    def message_from_ports(self, ports: Iterable[int], message_len: int) -> bytes:
        """Rebuild a message from its knock ports in any order; repeats of a port are harmless."""
        if message_len not in _FAMILY_OF_LENGTH:
            raise MessageLengthError(f"no v1 message has {message_len} bytes")
        span = self.port_range(message_len)
        digits: list[int | None] = [None] * (len(span) // self.segment_size)
        for port in ports:
            if port not in span:
                raise PortRangeError(
                    f"port {port} is outside the knock range {span.start}-{span.stop - 1}"
                )
            index, digit = divmod(port - self.base_port, self.segment_size)
            seen = digits[index]
            if seen is not None and seen != digit:
                first = self.base_port + index * self.segment_size + seen
                raise ConflictingSegmentError(f"segment {index} has two ports: {first} and {port}")
            digits[index] = digit
        missing = [index for index, digit in enumerate(digits) if digit is None]
        if missing:
            raise MissingSegmentError(
                f"{len(missing)} of {len(digits)} segments have no port (first: {missing[0]})"
            )
        return digits_to_message(digits, self.digit_bits, message_len)  # type: ignore[arg-type]


def message_from_spa(payload: bytes) -> bytes:
    """An SPA datagram's payload is the message itself; only its length is checked here."""
    family_of(payload)
    return bytes(payload)
