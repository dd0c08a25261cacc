"""knockd_fast.verdict: every reason of docs/protocol.md §7, in its order; alternatives."""

from __future__ import annotations

import ipaddress
import secrets
import struct
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from knock_client.protocol import (
    REJECTION_REASONS,
    Action,
    Knock,
    KnockLayout,
    Proto,
    digits_to_message,
    encode_header,
    message_to_digits,
    seal,
    siv_of,
)
from knockd_fast.candidates import candidate_messages
from knockd_fast.capture_spec import COMPLETION_DTYPE, KIND_KNOCK, MAX_CANDIDATES
from knockd_fast.completions import completion_of
from knockd_fast.config import GrantSettings, User
from knockd_fast.verdict import Verdict, grant_duration, judge, replay_expiry

NOW = 1_795_771_200
WINDOW = 30
KEY_A = bytes(range(64))
KEY_B = bytes(range(64, 96))
CLAIM4 = ipaddress.ip_address("192.0.2.10")
CLAIM6 = ipaddress.ip_address("2001:db8::10")


def user(uid: int, key: bytes, source_prefix=None, allow=((22, "tcp"), (53, "udp"))) -> User:
    prefix = {4: 32, 6: 128} if source_prefix is None else source_prefix
    if source_prefix == "any":
        prefix = None
    return User(uid, f"user{uid}", key, Path(f"/k/{uid}"), frozenset(allow), prefix)


USERS = {7: user(7, KEY_A), 4095: user(4095, KEY_B)}


def knock(**fields) -> Knock:
    base = dict(
        action=Action.OPEN,
        proto=Proto.TCP,
        port=22,
        timestamp=NOW,
        claimed_ip=CLAIM4,
        user_id=7,
        salt=0x123456,
        duration=0,
    )
    base.update(fields)
    return Knock(**base)


def never(user_id: int, siv: bytes, sent_at: int) -> bool:
    return False


def run(candidates, source=CLAIM4, now=NOW, users=USERS, seen=never) -> Verdict:
    return judge(candidates, source, "192.0.2.1", now, users, WINDOW, seen)


def sealed(key: bytes = KEY_A, **fields) -> bytes:
    return seal(knock(**fields), key)


def raw_seal(plaintext: bytes, user_id: int = 7, key: bytes = KEY_A) -> bytes:
    header = encode_header(user_id)
    return header + AESSIV(key).encrypt(plaintext, [header])


def plaintext(flags: int = 0, port: int = 22, timestamp: int = NOW) -> bytes:
    return struct.pack(">BHIHBH", flags, port, timestamp, 0x1234, 0x56, 0) + CLAIM4.packed


# --- each reason --------------------------------------------------------------------------


def test_accepted_ipv4() -> None:
    message = sealed()
    verdict = run([message])
    assert verdict.accepted and verdict.reason == "ok"
    assert verdict.user is USERS[7] and verdict.knock == knock()
    assert verdict.message == message and verdict.siv == siv_of(message)
    assert verdict.detail == "open 22/tcp for 192.0.2.10 (user 'user7')"


def test_accepted_ipv6_close_udp() -> None:
    message = sealed(KEY_B, user_id=4095, claimed_ip=CLAIM6, action=Action.CLOSE, port=53,
                     proto=Proto.UDP)  # fmt: skip
    verdict = run([message], source=CLAIM6)
    assert verdict.accepted and verdict.knock.action == Action.CLOSE
    assert verdict.user is USERS[4095]


def test_accepted_from_a_string_source() -> None:
    assert run([sealed()], source="192.0.2.10").accepted


@pytest.mark.parametrize(
    "message",
    [b"", b"\x10\x07" * 16, sealed() + b"\x00", sealed()[:-1], bytes(100)],
    ids=["empty", "32-bytes", "35-bytes", "33-bytes", "100-bytes"],
)
def test_malformed_length(message: bytes) -> None:
    verdict = run([message])
    assert (verdict.accepted, verdict.reason) == (False, "malformed")
    assert "bytes" in verdict.detail
    assert verdict.user is verdict.knock is verdict.message is verdict.siv is None


def test_malformed_version() -> None:
    message = bytearray(sealed())
    message[0] = (2 << 4) | (message[0] & 0x0F)
    verdict = run([bytes(message)])
    assert verdict.reason == "malformed" and "version 2" in verdict.detail


@pytest.mark.parametrize(
    ("text", "words"),
    [(plaintext(flags=0x01), "reserved flag bits"), (plaintext(port=0), "port 0")],
)
def test_malformed_after_authentication(text: bytes, words: str) -> None:
    message = raw_seal(text)
    verdict = run([message])
    assert verdict.reason == "malformed" and words in verdict.detail
    assert verdict.detail.startswith("authentic but")
    assert verdict.user is USERS[7] and verdict.siv == siv_of(message) and verdict.knock is None


def test_unknown_user() -> None:
    verdict = run([sealed(user_id=8)])
    assert verdict.reason == "unknown_user" and verdict.detail == "no user with id 8"
    assert verdict.user is None


@pytest.mark.parametrize("how", ["wrong key", "header", "ciphertext", "siv"])
def test_authentication(how: str) -> None:
    message = bytearray(sealed())
    if how == "wrong key":
        message = bytearray(sealed(KEY_B))
    elif how == "header":  # sealed for user 4095 under 7's key, then relabelled as user 7
        message = bytearray(sealed(user_id=4095))
        message[0], message[1] = 0x10, 0x07
    elif how == "ciphertext":
        message[-1] ^= 0x01
    else:
        message[2] ^= 0x80
    verdict = run([bytes(message)])
    assert verdict.reason == "authentication" and verdict.user is USERS[7]
    assert verdict.knock is None and verdict.siv is None


def test_user_without_a_key_fails_authentication() -> None:
    users = {7: user(7, b"")}
    verdict = run([sealed()], users=users)
    assert verdict.reason == "authentication" and "32 or 64 bytes" in verdict.detail


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (WINDOW, "ok"),
        (WINDOW + 0.999, "ok"),
        (WINDOW + 1, "expired"),
        (10**6, "expired"),
        (-WINDOW, "ok"),
        (-WINDOW + 0.5, "ok"),
        (-WINDOW - 0.5, "from_future"),  # whole seconds of now: 31 s ahead
        (-WINDOW - 1, "from_future"),
        (-(10**6), "from_future"),
    ],
)
def test_window_edges(offset: float, reason: str) -> None:
    verdict = run([sealed()], now=NOW + offset)
    assert verdict.reason == reason, verdict.detail


def test_expired_and_future_details() -> None:
    assert run([sealed()], now=NOW + 95).detail == "sent 95 s ago, window 30 s"
    assert run([sealed()], now=NOW - 95).detail == "timestamp 95 s ahead, window 30 s"


def test_window_across_2106() -> None:
    wire = sealed(timestamp=2**32 + 5)
    assert run([wire], now=2**32 + 5 + WINDOW).accepted
    assert run([wire], now=2**32 + 5 + WINDOW + 1).reason == "expired"
    assert run([wire], now=2**32 + 5 - WINDOW).accepted
    assert run([wire], now=2**32 + 5 - WINDOW - 1).reason == "from_future"


def test_source_mismatch() -> None:
    verdict = run([sealed()], source="192.0.2.9")
    assert verdict.reason == "source_mismatch"
    assert verdict.detail == "claimed 192.0.2.10, packet from 192.0.2.9"
    assert verdict.knock == knock() and verdict.user is USERS[7]


def test_source_mismatch_across_families() -> None:
    assert run([sealed()], source="2001:db8::10").reason == "source_mismatch"


def test_source_policies() -> None:
    prefix_users = {7: user(7, KEY_A, {4: 24, 6: 56})}
    assert run([sealed()], source="192.0.2.200", users=prefix_users).accepted
    assert run([sealed()], source="192.0.3.10", users=prefix_users).reason == "source_mismatch"
    any_users = {7: user(7, KEY_A, "any")}
    assert run([sealed()], source="203.0.113.5", users=any_users).accepted
    assert run([sealed()], source="2001:db8::5", users=any_users).accepted


def test_replay() -> None:
    message = sealed()
    asked = []

    def seen(user_id: int, siv: bytes, sent_at: int) -> bool:
        asked.append((user_id, siv, sent_at))
        return True

    verdict = run([message], seen=seen)
    assert verdict.reason == "replay" and verdict.siv == siv_of(message)
    assert asked == [(7, siv_of(message), NOW)]  # the message's own (unwrapped) time


def test_not_allowed() -> None:
    verdict = run([sealed(port=23)])
    assert verdict.reason == "not_allowed" and verdict.detail == "23/tcp is not allowed for 'user7'"
    assert run([sealed(port=22, proto=Proto.UDP)]).reason == "not_allowed"
    assert run([sealed(port=53, proto=Proto.UDP)]).accepted


def test_every_reason_is_reachable() -> None:
    reached = {
        run([b"short"]).reason,
        run([sealed(user_id=9)]).reason,
        run([sealed(KEY_B)]).reason,
        run([sealed()], now=NOW + 100).reason,
        run([sealed()], now=NOW - 100).reason,
        run([sealed()], source="192.0.2.11").reason,
        run([sealed()], seen=lambda u, s, t: True).reason,
        run([sealed(port=24)]).reason,
        run([sealed()]).reason,
    }
    # "limit" and "fleet_unavailable" are the judge's, after the verdict (tests/test_limits.py,
    # tests/test_fleet_link.py).
    assert reached == set(REJECTION_REASONS) - {"limit", "fleet_unavailable"} | {"ok"}


# --- precedence ---------------------------------------------------------------------------


def test_expired_from_the_wrong_source_says_expired() -> None:
    assert run([sealed()], source="192.0.2.99", now=NOW + 31).reason == "expired"


def test_future_from_the_wrong_source_says_from_future() -> None:
    assert run([sealed()], source="192.0.2.99", now=NOW - 31).reason == "from_future"


def test_replay_from_another_source_says_source_mismatch() -> None:
    verdict = run([sealed()], source="198.51.100.1", seen=lambda u, s, t: True)
    assert verdict.reason == "source_mismatch"


def test_replay_of_a_forbidden_port_says_replay() -> None:
    assert run([sealed(port=24)], seen=lambda u, s, t: True).reason == "replay"


def test_malformed_plaintext_beats_expiry() -> None:
    message = raw_seal(plaintext(flags=0x02, timestamp=NOW - 10_000))
    assert run([message], source="192.0.2.99").reason == "malformed"


def test_unknown_user_beats_bad_authentication_and_version_beats_user() -> None:
    message = bytearray(sealed(user_id=9))
    message[5] ^= 1
    assert run([bytes(message)]).reason == "unknown_user"
    message[0] = 0x30  # version 3, user id 9
    assert run([bytes(message)]).reason == "malformed"


def test_seen_is_not_asked_before_the_earlier_checks_pass() -> None:
    def seen(user_id: int, siv: bytes, sent_at: int) -> bool:
        raise AssertionError("seen() asked too early")

    for kwargs in ({"source": "192.0.2.9"}, {"now": NOW + 31}, {"now": NOW - 31}):
        run([sealed()], seen=seen, **kwargs)


# --- property: the verdict is exactly what the order predicts -----------------------------


likely = st.integers(0, 4).map(bool)  # True 4 times in 5
POLICIES = {"exact": {4: 32, 6: 128}, "any": "any", "prefix": {4: 24, 6: 56}}


@st.composite
def scenarios(draw):
    family = draw(st.sampled_from([4, 6]))
    if family == 4:
        claimed = ipaddress.IPv4Address(draw(st.integers(0, 2**32 - 1)))
    else:
        claimed = ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1)))
    if isinstance(claimed, ipaddress.IPv6Address) and claimed.ipv4_mapped:
        claimed = CLAIM6
    fields = dict(
        action=draw(st.sampled_from(list(Action))),
        proto=draw(st.sampled_from(list(Proto))),
        port=draw(st.sampled_from([22, 53, 443, draw(st.integers(1, 65535))])),
        timestamp=draw(st.integers(0, 2**33)),
        claimed_ip=claimed,
        user_id=draw(st.integers(0, 4095)),
        salt=draw(st.integers(0, 2**24 - 1)),
        duration=draw(st.integers(0, 65535)),
    )
    policy = draw(st.sampled_from(sorted(POLICIES)))
    source_kind = draw(st.sampled_from(["claimed", "near", "far", "other-family"]))
    if source_kind == "claimed":
        source = claimed
    elif source_kind == "near":  # same /24 or /56, differs in the last bits
        source = type(claimed)(int(claimed) ^ draw(st.integers(1, 255)))
    elif source_kind == "far":  # differs in the first bit
        bits = 32 if family == 4 else 128
        source = type(claimed)(int(claimed) ^ (1 << (bits - 1)))
    else:
        source = CLAIM6 if family == 4 else CLAIM4
    if isinstance(source, ipaddress.IPv6Address) and source.ipv4_mapped:
        source = ipaddress.IPv6Address(int(source) ^ 1 << 100)
    offset = draw(
        st.one_of(
            st.integers(-WINDOW, WINDOW),
            st.integers(-WINDOW, WINDOW),
            st.integers(-3 * WINDOW, 3 * WINDOW),
            st.sampled_from([-WINDOW - 1, -WINDOW, WINDOW, WINDOW + 1]),
            st.integers(-(2**31) + 1, 2**31 - 1),
        )
    ) + draw(st.sampled_from([0.0, 0.25, 0.999]))
    return dict(
        fields=fields,
        key=draw(st.sampled_from([KEY_A, KEY_B])),
        known_user=draw(likely),
        right_key=draw(likely),
        policy=policy,
        source=source,
        offset=offset,
        replayed=not draw(likely),
        allowed=draw(likely),
    )


def predicted(s, k: Knock, u: User | None, now: float, source) -> str:
    if u is None:
        return "unknown_user"
    if not s["right_key"]:
        return "authentication"
    age = (int(now) - k.timestamp) % 2**32  # plain arithmetic, independent of the module
    if age >= 2**31:
        age -= 2**32
    if age > WINDOW:
        return "expired"
    if age < -WINDOW:
        return "from_future"
    policy = POLICIES[s["policy"]]
    if policy != "any":
        if k.claimed_ip.version != source.version:
            return "source_mismatch"
        bits = 32 if source.version == 4 else 128
        prefix = policy[source.version]
        if int(k.claimed_ip) >> (bits - prefix) != int(source) >> (bits - prefix):
            return "source_mismatch"
    if s["replayed"]:
        return "replay"
    if not s["allowed"]:
        return "not_allowed"
    return "ok"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_verdict_follows_the_order(s) -> None:
    k = Knock(**s["fields"])
    message = seal(k, s["key"])
    the_user = None
    users: dict[int, User] = {}
    if s["known_user"]:
        user_key = s["key"] if s["right_key"] else (KEY_B if s["key"] == KEY_A else KEY_A)
        allow = (
            {(k.port, str(k.proto))} if s["allowed"] else {(k.port, "tcp" if k.proto else "udp")}
        )
        the_user = user(k.user_id, user_key, POLICIES[s["policy"]], allow)
        users[k.user_id] = the_user
    users.setdefault((k.user_id + 1) % 4096, user((k.user_id + 1) % 4096, KEY_A))
    now = (k.timestamp % 2**32) + s["offset"] + 2**32 * 3  # any era: only mod 2**32 counts
    replays = {(k.user_id, siv_of(message))} if s["replayed"] else set()
    verdict = judge(
        [message], s["source"], None, now, users, WINDOW, lambda u, v, _sent: (u, v) in replays
    )
    expected = predicted(s, k, the_user, now, s["source"])
    event(expected)
    assert verdict.reason == expected, verdict.detail
    assert verdict.accepted == (expected == "ok")
    if expected not in ("unknown_user", "authentication"):
        assert verdict.knock.port == k.port and verdict.knock.timestamp == k.timestamp % 2**32
        assert verdict.siv == siv_of(message) and verdict.message == message
    assert "\n" not in verdict.detail


# --- candidates: alternatives, limits, garbage -------------------------------------------


LAYOUT = KnockLayout()


def completion(message: bytes, alternatives: list[tuple[int, int]]) -> np.void:
    """A completion record as the capture engine rings it, with the given alternatives."""
    ring = np.zeros(1, dtype=COMPLETION_DTYPE)
    record = ring[0]
    record["kind"] = KIND_KNOCK
    record["family"] = 4 if len(message) == 34 else 6
    record["length"] = len(message)
    record["message"][: len(message)] = np.frombuffer(message, dtype=np.uint8)
    record["n_alternatives"] = len(alternatives)
    for index, (segment, digit) in enumerate(alternatives):
        record["alt_segment"][index] = segment
        record["alt_digit"][index] = digit
    return record


def spoof_digit(message: bytes, segment: int, digit: int) -> bytes:
    digits = message_to_digits(message, LAYOUT.digit_bits)
    digits[segment] = digit
    return digits_to_message(digits, LAYOUT.digit_bits, len(message))


@pytest.mark.parametrize("segment", [0, 1, 2, 17, 33])
def test_spoofed_digit_with_the_genuine_alternative_is_accepted(segment: int) -> None:
    genuine = sealed()
    real = message_to_digits(genuine, LAYOUT.digit_bits)[segment]
    spoofed = real ^ 0x01
    primary = spoof_digit(genuine, segment, spoofed)
    record = completion(primary, [(segment, real)])
    candidates = list(candidate_messages(completion_of(record), LAYOUT.digit_bits))
    assert candidates[0] == primary and genuine in candidates
    verdict = run(candidate_messages(completion_of(record), LAYOUT.digit_bits))
    assert verdict.accepted and verdict.message == genuine


def test_spoofed_digits_in_two_segments() -> None:
    genuine = sealed(claimed_ip=CLAIM6)
    digits = message_to_digits(genuine, LAYOUT.digit_bits)
    primary = spoof_digit(spoof_digit(genuine, 3, digits[3] ^ 0xFF), 40, digits[40] ^ 0x10)
    record = completion(primary, [(3, digits[3]), (40, digits[40]), (40, 7)])
    verdict = run(candidate_messages(completion_of(record), LAYOUT.digit_bits), source=CLAIM6)
    assert verdict.accepted and verdict.message == genuine


def test_when_nothing_authenticates_the_first_candidate_naming_a_user_speaks() -> None:
    # A poisoned header digit (an unknown user, a broken version) hides the user only when
    # no candidate shows it: the admin sees whose knock failed.
    verdict = run([sealed(user_id=9), sealed(KEY_B), b"x"])
    assert (verdict.reason, verdict.user) == ("authentication", USERS[7])
    assert "(3 candidates tried)" in verdict.detail
    verdict = run([b"x", sealed(KEY_B)])
    assert (verdict.reason, verdict.user) == ("authentication", USERS[7])
    verdict = run([sealed(KEY_B), sealed(user_id=9), b"x"])
    assert (verdict.reason, verdict.user) == ("authentication", USERS[7])
    # With no user in sight, the first candidate speaks.
    assert run([sealed(user_id=9), b"x"]).reason == "unknown_user"
    assert run([b"x", sealed(user_id=9)]).reason == "malformed"


def test_the_first_authentic_candidate_is_judged_with_its_own_user() -> None:
    for_b = sealed(KEY_B, user_id=4095)
    verdict = run([sealed(user_id=9), b"junk", for_b, sealed()])
    assert verdict.accepted and verdict.user is USERS[4095] and verdict.message == for_b
    # The first authentic one is judged even if a later one would pass.
    verdict = run([sealed(port=24), sealed()])
    assert verdict.reason == "not_allowed"
    verdict = run([raw_seal(plaintext(flags=0x04)), sealed()])
    assert verdict.reason == "malformed" and verdict.user is USERS[7]


def test_at_most_max_candidates_are_looked_at() -> None:
    pulled = 0

    def candidates():
        nonlocal pulled
        for _ in range(MAX_CANDIDATES):
            pulled += 1
            yield sealed(KEY_B)
        pulled += 1
        yield sealed()  # genuine, but past the limit
        raise AssertionError("judge read past the limit")

    verdict = run(candidates())
    assert verdict.reason == "authentication" and pulled == MAX_CANDIDATES
    assert run([sealed(KEY_B)] * (MAX_CANDIDATES - 1) + [sealed()]).accepted


def test_no_candidates() -> None:
    assert run([]).reason == "malformed"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.binary(min_size=34, max_size=34),
            st.binary(min_size=46, max_size=46),
            st.builds(
                lambda b: bytes([0x10 | b[0] & 0x0F]) + b[1:], st.binary(min_size=34, max_size=34)
            ),
            st.builds(lambda b: b"\x10\x07" + b, st.binary(min_size=44, max_size=44)),
            st.builds(bytearray, st.binary(max_size=50)),
            st.builds(memoryview, st.binary(max_size=50)),
            st.sampled_from([None, 5, -1, 10**30, "text", 3.5, object(), [1, 2]]),
        ),
        max_size=20,
    ),
    st.sampled_from(["192.0.2.10", "2001:db8::10"]),
)
def test_garbage_candidates_never_raise(candidates, source) -> None:
    verdict = run(candidates, source=source)
    assert not verdict.accepted
    assert verdict.reason in ("malformed", "unknown_user", "authentication")


def test_numpy_candidates_are_accepted() -> None:
    array = np.frombuffer(sealed(), dtype=np.uint8)
    assert run([array]).accepted


# --- helpers ---------------------------------------------------------------------------------


GRANTS = GrantSettings(300, 3600, "dry-run", "KNOCKD-FAST", ("INPUT",))


@pytest.mark.parametrize(("duration", "expected"), [(0, 300), (1, 1), (3600, 3600), (65535, 3600)])
def test_grant_duration(duration: int, expected: int) -> None:
    assert grant_duration(knock(duration=duration), GRANTS) == expected


def test_grant_duration_default_above_max_is_impossible_but_capped() -> None:
    assert grant_duration(knock(), GrantSettings(300, 300, "dry-run", "C", ("INPUT",))) == 300


@pytest.mark.parametrize("offset", [-WINDOW, -3, 0, 0.5, 7, WINDOW])
def test_replay_expiry_is_timestamp_plus_window(offset: float) -> None:
    assert replay_expiry(knock(), NOW + offset, WINDOW) == NOW + WINDOW


def test_replay_expiry_after_2106() -> None:
    k = knock(timestamp=(2**32 + 5) % 2**32)  # as the wire carries it
    assert replay_expiry(k, 2**32 + 20, WINDOW) == 2**32 + 5 + WINDOW


def test_random_keys_do_not_collide() -> None:
    # A message for user 7 under a fresh key never authenticates as user 7.
    assert run([sealed(secrets.token_bytes(64))]).reason == "authentication"
