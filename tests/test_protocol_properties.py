"""Property tests of knock_client.protocol: round trips, transport, tampering, hostile input.

The expected outcomes are worked out from docs/protocol.md (sections 2-7), not read back
from the module. Set KNOCK_PROTOCOL_PROFILE=protocol-thorough for a longer run.
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import os
import re

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from knock_client import protocol
from knock_client.protocol import (
    Action,
    AuthenticationError,
    ConflictingSegmentError,
    DigitRangeError,
    FieldError,
    HeaderError,
    Knock,
    KnockLayout,
    LayoutError,
    MessageLengthError,
    MissingSegmentError,
    PaddingError,
    PlaintextError,
    PortRangeError,
    Proto,
    ProtocolError,
    digit_count,
    digits_to_message,
    message_from_spa,
    message_to_digits,
    open_message,
    read_header,
    seal,
    seconds_since,
)

settings.register_profile(
    "protocol-fast",
    max_examples=60,
    deadline=None,  # AES-SIV key setup makes single examples slow now and then
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "protocol-thorough", parent=settings.get_profile("protocol-fast"), max_examples=2000
)
PROFILE = settings.get_profile(os.environ.get("KNOCK_PROTOCOL_PROFILE", "protocol-fast"))

WRAP = 1 << 32
LENGTHS = {4: 34, 6: 46}
DIGIT_WIDTHS = range(4, 13)


def expected_reason(error: Exception) -> str:
    return "authentication" if isinstance(error, AuthenticationError) else "malformed"


def check_reason(error: ProtocolError) -> None:
    assert error.reason == expected_reason(error)
    assert error.reason in protocol.REJECTION_REASONS


def spec_count(message_len: int, digit_bits: int) -> int:
    """Digits per message: ceil(8 * len / digit_bits) (docs/protocol.md 6.1)."""
    return -(-8 * message_len // digit_bits)


def spec_span(message_len: int, digit_bits: int) -> int:
    return spec_count(message_len, digit_bits) << digit_bits


def spec_pad(message_len: int, digit_bits: int) -> int:
    return spec_count(message_len, digit_bits) * digit_bits - 8 * message_len


# (digit_bits, message_len) pairs whose knock range fits under 65535 from some base >= 1
FITTING = [(bits, n) for bits in DIGIT_WIDTHS for n in (34, 46) if spec_span(n, bits) <= 65535]
NOT_FITTING = [(bits, n) for bits in DIGIT_WIDTHS for n in (34, 46) if (bits, n) not in FITTING]

# --- strategies ----------------------------------------------------------------------------

keys = st.sampled_from((32, 64)).flatmap(lambda n: st.binary(min_size=n, max_size=n))
ipv4s = st.ip_addresses(v=4)
ipv6s = st.ip_addresses(v=6).filter(lambda address: address.ipv4_mapped is None)
timestamps = st.one_of(
    st.integers(0, WRAP - 1),
    st.integers(WRAP, 1 << 64),
    st.sampled_from([0, 1, WRAP - 1, WRAP, WRAP + 1, 2 * WRAP - 1, 1795771200]),
)


any_ips = st.one_of(ipv4s, ipv6s)


def knocks(claimed_ips: st.SearchStrategy = any_ips) -> st.SearchStrategy:
    return st.builds(
        Knock,
        action=st.sampled_from(Action),
        proto=st.sampled_from(Proto),
        port=st.integers(1, 65535),
        timestamp=timestamps,
        claimed_ip=claimed_ips,
        user_id=st.integers(0, 4095),
        salt=st.integers(0, (1 << 24) - 1),
        duration=st.integers(0, 65535),
    )


messages = st.sampled_from((34, 46)).flatmap(lambda n: st.binary(min_size=n, max_size=n))


@st.composite
def fitting_layouts(draw: st.DrawFn, digit_bits: int, message_len: int) -> KnockLayout:
    """A layout whose range for message_len fits below 65536 and avoids its spa_port."""
    span = spec_span(message_len, digit_bits)
    base = draw(st.integers(1, 65536 - span))
    outside = [
        port
        for port in (base - 1, base + span, 1, 65535)
        if 1 <= port <= 65535 and not base <= port < base + span
    ]
    spa = draw(st.sampled_from(outside))
    return KnockLayout(base_port=base, digit_bits=digit_bits, spa_port=spa)


def flip(message: bytes, bit: int) -> bytes:
    """Flip bit ``bit`` counted MSB-first from byte 0 (bit 0 is the top bit of byte 0)."""
    data = bytearray(message)
    data[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(data)


# --- seal / open ---------------------------------------------------------------------------


@PROFILE
@given(knock=knocks(), key=keys)
def test_seal_open_round_trip(knock: Knock, key: bytes) -> None:
    message = seal(knock, key)
    assert open_message(message, key) == dataclasses.replace(
        knock, timestamp=knock.timestamp % WRAP
    )
    assert seal(knock, key) == message  # deterministic for given fields and salt


@PROFILE
@given(knock=knocks(ipv4s), key=keys)
def test_ipv4_message_is_34_bytes(knock: Knock, key: bytes) -> None:
    message = seal(knock, key)
    assert len(message) == 34
    assert read_header(message) == knock.user_id
    assert message[:2] == bytes([0x10 | knock.user_id >> 8, knock.user_id & 0xFF])


@PROFILE
@given(knock=knocks(ipv6s), key=keys)
def test_ipv6_message_is_46_bytes(knock: Knock, key: bytes) -> None:
    message = seal(knock, key)
    assert len(message) == 46
    assert read_header(message) == knock.user_id
    assert message[:2] == bytes([0x10 | knock.user_id >> 8, knock.user_id & 0xFF])


@PROFILE
@given(knock=knocks(), key=keys, other=keys)
def test_other_key_never_opens(knock: Knock, key: bytes, other: bytes) -> None:
    assume(other != key)
    with pytest.raises(AuthenticationError) as caught:
        open_message(seal(knock, key), other)
    check_reason(caught.value)


def test_key_prefix_does_not_open() -> None:
    """A 512-bit key whose first half is the 256-bit key is still a different key."""
    short = bytes(range(32))
    knock = Knock(Action.OPEN, Proto.TCP, 22, 1795771200, ipaddress.ip_address("192.0.2.1"), 1, 5)
    with pytest.raises(AuthenticationError):
        open_message(seal(knock, short), short + short)
    with pytest.raises(AuthenticationError):
        open_message(seal(knock, short + short), short)


def expected_flip_error(bit: int) -> type[ProtocolError]:
    if bit < 4:
        return HeaderError  # version nibble: the header check comes before decryption
    return AuthenticationError  # user id bits (associated data), SIV, ciphertext


@PROFILE
@given(knock=knocks(), key=keys, data=st.data())
def test_any_single_bit_flip_is_rejected(knock: Knock, key: bytes, data: st.DataObject) -> None:
    message = seal(knock, key)
    bit = data.draw(st.integers(0, 8 * len(message) - 1), label="bit")
    with pytest.raises(ProtocolError) as caught:
        open_message(flip(message, bit), key)
    assert type(caught.value) is expected_flip_error(bit)
    check_reason(caught.value)


@pytest.mark.parametrize("family", [4, 6])
def test_every_bit_flip_of_one_message(family: int) -> None:
    key = bytes(range(64))
    claimed = ipaddress.ip_address("192.0.2.7" if family == 4 else "2001:db8::7")
    message = seal(Knock(Action.CLOSE, Proto.UDP, 443, WRAP + 9, claimed, 0x5A5, 0xABCDEF, 60), key)
    for bit in range(8 * len(message)):
        with pytest.raises(ProtocolError) as caught:
            open_message(flip(message, bit), key)
        assert type(caught.value) is expected_flip_error(bit), f"bit {bit}"


def _sealed_raw(plaintext: bytes, key: bytes, user_id: int = 3) -> bytes:
    header = bytes([0x10 | user_id >> 8, user_id & 0xFF])
    return header + AESSIV(key).encrypt(plaintext, [header])


@pytest.mark.parametrize("reserved", [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x3F])
def test_authentic_message_with_reserved_flags_is_malformed(reserved: int) -> None:
    key = bytes(32)
    plaintext = bytes([reserved]) + bytes.fromhex("00166b094b401234560000c000020a")
    with pytest.raises(PlaintextError) as caught:
        open_message(_sealed_raw(plaintext, key), key)
    check_reason(caught.value)


def test_authentic_message_for_port_zero_is_malformed() -> None:
    key = bytes(64)
    plaintext = bytes.fromhex("4000006b094b401234560000") + bytes(16)
    with pytest.raises(PlaintextError) as caught:
        open_message(_sealed_raw(plaintext, key), key)
    check_reason(caught.value)


# --- digits and ports ----------------------------------------------------------------------


@PROFILE
@given(message=messages, digit_bits=st.integers(4, 12))
def test_digits_round_trip(message: bytes, digit_bits: int) -> None:
    digits = message_to_digits(message, digit_bits)
    assert (
        len(digits) == spec_count(len(message), digit_bits) == digit_count(len(message), digit_bits)
    )
    assert all(0 <= digit < 1 << digit_bits for digit in digits)
    # the pad bits on the right of the last digit are zero
    assert digits[-1] & ((1 << spec_pad(len(message), digit_bits)) - 1) == 0
    assert digits_to_message(digits, digit_bits, len(message)) == message


@pytest.mark.parametrize(("digit_bits", "message_len"), FITTING)
@PROFILE
@given(data=st.data())
def test_any_order_and_repeats_decode_the_same(
    digit_bits: int, message_len: int, data: st.DataObject
) -> None:
    layout = data.draw(fitting_layouts(digit_bits, message_len), label="layout")
    message = data.draw(st.binary(min_size=message_len, max_size=message_len), label="message")
    ports = layout.ports_for(message)
    size = 1 << digit_bits
    assert len(ports) == spec_count(message_len, digit_bits)
    for index, port in enumerate(ports):
        assert layout.base_port + index * size <= port < layout.base_port + (index + 1) * size
    repeats = data.draw(st.lists(st.sampled_from(ports), max_size=20), label="repeats")
    received = data.draw(st.permutations(ports + repeats), label="received")
    assert layout.message_from_ports(received, message_len) == message
    assert layout.message_from_ports(iter(received), message_len) == message


def test_fitting_table_matches_the_spec() -> None:
    """docs/protocol.md 6.1: 10 bits serves both families, 11 bits IPv4 only, 12 none."""
    assert (10, 46) in FITTING and (11, 34) in FITTING
    assert NOT_FITTING == [(11, 46), (12, 34), (12, 46)]


@pytest.mark.parametrize(("digit_bits", "message_len"), NOT_FITTING)
@pytest.mark.parametrize("base_port", [1, 1024, 20000, 65535])
def test_range_that_never_fits_is_refused(digit_bits: int, message_len: int, base_port: int):
    layout = KnockLayout(base_port=base_port, digit_bits=digit_bits, spa_port=1 + base_port % 2)
    with pytest.raises(LayoutError, match="use fewer digit_bits"):
        layout.port_range(message_len)
    with pytest.raises(LayoutError):
        layout.ports_for(bytes(message_len))
    with pytest.raises(LayoutError):
        layout.message_from_ports([], message_len)


@pytest.mark.parametrize(("digit_bits", "message_len"), FITTING)
def test_range_past_65535_names_the_highest_base(digit_bits: int, message_len: int) -> None:
    highest = 65536 - spec_span(message_len, digit_bits)
    spa = 1 if highest > 1 else 65535
    assert KnockLayout(highest, digit_bits, spa).port_range(message_len)[-1] == 65535
    with pytest.raises(LayoutError) as caught:
        KnockLayout(highest + 1, digit_bits, spa).port_range(message_len)
    text = str(caught.value)
    assert f"lower base_port to at most {highest}" in text
    assert "65535" in text and "\n" not in text


# --- hostile input: only ProtocolError subclasses, and the right one -------------------------

hostile_bytes = st.one_of(
    st.binary(max_size=100),
    st.sampled_from([33, 34, 35, 45, 46, 47]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    # version 1 headers, so decryption is reached
    st.tuples(st.integers(0, 15), st.sampled_from([34, 46])).flatmap(
        lambda t: st.binary(min_size=t[1] - 1, max_size=t[1] - 1).map(
            lambda rest, t=t: bytes([0x10 | t[0]]) + rest
        )
    ),
)


def spec_bytes_error(data: bytes) -> type[ProtocolError] | None:
    if len(data) not in (34, 46):
        return MessageLengthError
    if data[0] >> 4 != 1:
        return HeaderError
    return None


@PROFILE
@given(data=hostile_bytes)
def test_read_header_on_arbitrary_bytes(data: bytes) -> None:
    expected = spec_bytes_error(data)
    if expected is None:
        assert read_header(data) == ((data[0] & 0x0F) << 8) | data[1]
        return
    with pytest.raises(ProtocolError) as caught:
        read_header(data)
    assert type(caught.value) is expected
    check_reason(caught.value)


@PROFILE
@given(data=hostile_bytes, key=keys)
def test_open_message_on_arbitrary_bytes(data: bytes, key: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        open_message(data, key)
    assert type(caught.value) is (spec_bytes_error(data) or AuthenticationError)
    check_reason(caught.value)


@PROFILE
@given(data=hostile_bytes)
def test_message_from_spa_on_arbitrary_bytes(data: bytes) -> None:
    if len(data) in (34, 46):
        assert message_from_spa(data) == data
        return
    with pytest.raises(MessageLengthError) as caught:
        message_from_spa(data)
    check_reason(caught.value)


def spec_digits_error(digits: list[int], digit_bits: int, message_len: int):
    if len(digits) != spec_count(message_len, digit_bits):
        return DigitRangeError
    if any(not 0 <= digit < 1 << digit_bits for digit in digits):
        return DigitRangeError
    if digits[-1] & ((1 << spec_pad(message_len, digit_bits)) - 1):
        return PaddingError
    return None


@st.composite
def digit_lists(draw: st.DrawFn) -> tuple[list[int], int, int]:
    digit_bits = draw(st.integers(4, 12), label="digit_bits")
    message_len = draw(st.sampled_from((34, 46)), label="message_len")
    count = spec_count(message_len, digit_bits)
    values = st.one_of(st.integers(0, (1 << digit_bits) - 1), st.integers(-(1 << 20), 1 << 20))
    sizes = st.one_of(st.just(count), st.integers(0, 100))
    size = draw(sizes, label="size")
    return draw(st.lists(values, min_size=size, max_size=size)), digit_bits, message_len


@PROFILE
@given(case=digit_lists())
def test_digits_to_message_on_arbitrary_ints(case: tuple[list[int], int, int]) -> None:
    digits, digit_bits, message_len = case
    expected = spec_digits_error(digits, digit_bits, message_len)
    if expected is None:
        message = digits_to_message(digits, digit_bits, message_len)
        assert len(message) == message_len
        assert message_to_digits(message, digit_bits) == digits
        return
    with pytest.raises(ProtocolError) as caught:
        digits_to_message(digits, digit_bits, message_len)
    assert type(caught.value) is expected
    check_reason(caught.value)


def spec_ports_error(layout: KnockLayout, ports: list[int], message_len: int):
    """The first fault in arrival order, as docs/protocol.md 6.1 describes a receiver."""
    if message_len not in (34, 46):
        return MessageLengthError
    size = 1 << layout.digit_bits
    count = spec_count(message_len, layout.digit_bits)
    seen: dict[int, int] = {}
    for port in ports:
        if not layout.base_port <= port < layout.base_port + count * size:
            return PortRangeError
        index, digit = divmod(port - layout.base_port, size)
        if seen.setdefault(index, digit) != digit:
            return ConflictingSegmentError
    if len(seen) != count:
        return MissingSegmentError
    return spec_digits_error([seen[i] for i in range(count)], layout.digit_bits, message_len)


@PROFILE
@given(data=st.data())
def test_message_from_ports_on_arbitrary_ints(data: st.DataObject) -> None:
    digit_bits, message_len = data.draw(st.sampled_from(FITTING), label="width")
    layout = data.draw(fitting_layouts(digit_bits, message_len), label="layout")
    other_len = st.integers(-1, 100).filter(lambda n: n not in (34, 46))
    claimed_len = data.draw(st.one_of(st.just(message_len), other_len), label="len")
    span = layout.port_range(message_len)
    in_range = st.integers(span.start, span.stop - 1)
    anywhere = st.integers(-(1 << 20), 1 << 20)
    start = data.draw(st.sampled_from([[], layout.ports_for(bytes(message_len))]), label="start")
    extra = data.draw(st.lists(st.one_of(in_range, anywhere), max_size=60), label="extra")
    ports = data.draw(st.permutations(start + extra), label="ports")
    expected = spec_ports_error(layout, ports, claimed_len)
    if expected is None:
        message = layout.message_from_ports(ports, claimed_len)
        assert layout.ports_for(message) == sorted(set(ports))
        return
    with pytest.raises(ProtocolError) as caught:
        layout.message_from_ports(ports, claimed_len)
    assert type(caught.value) is expected
    check_reason(caught.value)


# --- each fault by itself ------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 2, 33, 35, 45, 47, 64, 1500])
def test_wrong_length_is_message_length_error(length: int) -> None:
    data = bytes([0x10]) * length
    for decode in (read_header, message_from_spa, lambda m: open_message(m, bytes(32))):
        with pytest.raises(MessageLengthError):
            decode(data)
    with pytest.raises(MessageLengthError):
        KnockLayout().message_from_ports(KnockLayout().ports_for(bytes(34)), length)


@pytest.mark.parametrize("version", [0, 2, 15])
def test_other_version_is_header_error(version: int) -> None:
    with pytest.raises(HeaderError):
        read_header(bytes([version << 4]) + bytes(33))


@pytest.mark.parametrize(("digit_bits", "message_len"), FITTING)
@PROFILE
@given(data=st.data())
def test_each_port_fault(digit_bits: int, message_len: int, data: st.DataObject) -> None:
    layout = data.draw(fitting_layouts(digit_bits, message_len), label="layout")
    message = data.draw(st.binary(min_size=message_len, max_size=message_len), label="message")
    ports = layout.ports_for(message)
    span = layout.port_range(message_len)
    size = 1 << digit_bits
    position = data.draw(st.integers(0, len(ports)), label="position")

    def fed(*extra: int, without: int | None = None) -> list[int]:
        kept = [port for index, port in enumerate(ports) if index != without]
        return kept[:position] + list(extra) + kept[position:]

    outside = data.draw(
        st.one_of(st.integers(-(1 << 20), span.start - 1), st.integers(span.stop, 1 << 20)),
        label="outside",
    )
    with pytest.raises(PortRangeError):
        layout.message_from_ports(fed(outside), message_len)

    segment = data.draw(st.integers(0, len(ports) - 1), label="segment")
    with pytest.raises(MissingSegmentError):
        layout.message_from_ports(fed(without=segment), message_len)

    low = layout.base_port + segment * size
    rival = data.draw(st.integers(low, low + size - 1).filter(lambda p: p != ports[segment]))
    with pytest.raises(ConflictingSegmentError):
        layout.message_from_ports(fed(rival), message_len)


@pytest.mark.parametrize(
    ("digit_bits", "message_len"), [pair for pair in FITTING if spec_pad(pair[1], pair[0])]
)
@PROFILE
@given(data=st.data())
def test_nonzero_pad_bits(digit_bits: int, message_len: int, data: st.DataObject) -> None:
    message = data.draw(st.binary(min_size=message_len, max_size=message_len), label="message")
    pad = spec_pad(message_len, digit_bits)
    garbage = data.draw(st.integers(1, (1 << pad) - 1), label="pad bits")
    digits = message_to_digits(message, digit_bits)
    digits[-1] |= garbage
    with pytest.raises(PaddingError):
        digits_to_message(digits, digit_bits, message_len)
    layout = data.draw(fitting_layouts(digit_bits, message_len), label="layout")
    ports = layout.ports_for(message)
    ports[-1] = layout.base_port + ((len(ports) - 1) << digit_bits) + digits[-1]
    with pytest.raises(PaddingError):
        layout.message_from_ports(ports, message_len)


@pytest.mark.parametrize(
    ("digits", "message_len"),
    [
        ([0] * 33, 34),  # one digit short
        ([0] * 35, 34),  # one digit too many
        ([0] * 33 + [256], 34),  # digit does not fit in 8 bits
        ([0] * 33 + [-1], 34),
        ([1 << 20] + [0] * 45, 46),
    ],
)
def test_digit_range_errors(digits: list[int], message_len: int) -> None:
    with pytest.raises(DigitRangeError):
        digits_to_message(digits, 8, message_len)


# --- seal's field checks and layout checks -------------------------------------------------

GOOD = Knock(Action.OPEN, Proto.TCP, 22, 1795771200, ipaddress.ip_address("192.0.2.10"), 7, 1)


@pytest.mark.parametrize(
    "change",
    [
        {"port": 0},
        {"port": 65536},
        {"port": -1},
        {"salt": 1 << 24},
        {"salt": -1},
        {"user_id": 4096},
        {"user_id": -1},
        {"timestamp": -1},
        {"duration": 65536},
        {"duration": -1},
        {"claimed_ip": ipaddress.ip_address("::ffff:192.0.2.10")},
        {"claimed_ip": ipaddress.ip_address("::ffff:0:0")},
        {"action": 2},
        {"proto": "icmp"},
    ],
    ids=repr,
)
def test_seal_rejects_out_of_range_fields(change: dict[str, object]) -> None:
    seal(GOOD, bytes(32))  # the unchanged knock seals
    with pytest.raises(FieldError):
        seal(dataclasses.replace(GOOD, **change), bytes(32))


@pytest.mark.parametrize("length", [0, 16, 24, 31, 33, 48, 63, 65])
def test_seal_and_open_reject_bad_key_sizes(length: int) -> None:
    with pytest.raises(FieldError):
        seal(GOOD, bytes(length))
    with pytest.raises(FieldError):
        open_message(seal(GOOD, bytes(32)), bytes(length))


@pytest.mark.parametrize("digit_bits", [-1, 0, 3, 13, 16])
def test_layout_rejects_digit_widths(digit_bits: int) -> None:
    with pytest.raises(LayoutError, match="digit_bits"):
        KnockLayout(digit_bits=digit_bits)


@pytest.mark.parametrize("field", ["base_port", "spa_port"])
@pytest.mark.parametrize("value", [0, 65536])
def test_layout_rejects_ports(field: str, value: int) -> None:
    with pytest.raises(LayoutError, match=field):
        KnockLayout(**{field: value})


def test_ipv6_at_11_bits_from_20000_is_refused_with_the_fix() -> None:
    KnockLayout(base_port=10000, digit_bits=11).port_range(34)  # IPv4 fits from 10000
    with pytest.raises(LayoutError) as caught:
        KnockLayout(base_port=20000, digit_bits=11).port_range(46)
    assert "IPv6" in str(caught.value) and "use fewer digit_bits" in str(caught.value)


def test_range_containing_spa_port_is_refused() -> None:
    layout = KnockLayout(base_port=60000, digit_bits=4, spa_port=60010)
    for message_len in (34, 46):
        with pytest.raises(LayoutError, match="spa_port 60010"):
            layout.port_range(message_len)
    for edge in (60000, 60000 + 1088 - 1):  # the first and last port of the IPv4 range
        with pytest.raises(LayoutError):
            KnockLayout(base_port=60000, digit_bits=4, spa_port=edge).port_range(34)
    KnockLayout(base_port=60000, digit_bits=4, spa_port=60000 + 1088).port_range(34)
    KnockLayout(base_port=60000, digit_bits=4, spa_port=59999).port_range(34)


def test_spa_collision_message_names_the_fix() -> None:
    """Like the range-overflow error, the spa_port error must say what to change."""
    with pytest.raises(LayoutError) as caught:
        KnockLayout(base_port=60000, digit_bits=4, spa_port=60010).port_range(34)
    text = str(caught.value)
    fix = re.search(r"\b(move|choose|change|lower|raise|set)\b.*\b(spa_port|base_port)\b", text)
    assert fix, f"the error names no fix: {text!r}"


# --- time ----------------------------------------------------------------------------------


def test_seconds_since_examples() -> None:
    assert seconds_since(WRAP - 5, WRAP + 3) == 8  # sent before the wrap, received after
    assert seconds_since(3, WRAP - 2) == -5  # from the future, across the wrap
    assert seconds_since(1000, 990) == -10
    assert seconds_since(1000, 1030.9) == 30
    assert seconds_since(1795771200, 1795771200) == 0
    assert seconds_since((2 * WRAP + 7) % WRAP, 2 * WRAP + 17) == 10
    # the nearest signed value: ages up to 2^31 - 1 are past, 2^31 is read as the future
    assert seconds_since(0, (1 << 31) - 1) == (1 << 31) - 1
    assert seconds_since(0, 1 << 31) == -(1 << 31)
    assert seconds_since(5, WRAP + 5 + (1 << 31)) == -(1 << 31)


@PROFILE
@given(
    sent=st.integers(0, 1 << 40),
    age=st.integers(-(1 << 31) + 1, (1 << 31) - 1),
    fraction=st.floats(0, 0.999),
)
@example(sent=WRAP - 1, age=1, fraction=0.0)
@example(sent=WRAP, age=-1, fraction=0.0)
def test_seconds_since_is_the_signed_age(sent: int, age: int, fraction: float) -> None:
    now = sent + age
    assume(now >= 0)
    assert seconds_since(sent % WRAP, now) == age
    if now + fraction < 1 << 52:  # floats hold whole seconds exactly up to here
        assert seconds_since(sent % WRAP, now + fraction) == age


# --- reasons -------------------------------------------------------------------------------


def test_every_protocol_error_has_its_reason() -> None:
    classes = [
        value
        for value in vars(protocol).values()
        if inspect.isclass(value) and issubclass(value, ProtocolError)
    ]
    assert len(classes) >= 10
    for cls in classes:
        assert cls("x").reason == ("authentication" if cls is AuthenticationError else "malformed")
    assert not issubclass(FieldError, ProtocolError)
    assert not issubclass(LayoutError, ProtocolError)
