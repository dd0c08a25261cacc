"""Admission: what the capture engine refuses before Python, needing no key, on both twins.

A message whose header is not version 1 or names no configured user, and any packet of a
mode that is off, never reaches the judge: it is counted (``refused_version``,
``refused_user``, ``refused_mode``), not judged and not logged (docs/capture.md,
"Admission"). The refusal is a pure pre-filter: a completion is refused only when no
combination of its digits could have named a configured user, so no knock the judge would
accept is lost.
"""

from __future__ import annotations

import ipaddress
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twins import engine_over_frames

from knock_client.protocol import Action, Knock, KnockLayout, Proto, seal
from knockd_fast import frames as fr
from knockd_fast.candidates import candidate_messages
from knockd_fast.capture_spec import LINKTYPE_ETHERNET, admission, engine_settings
from knockd_fast.completions import completion_of
from knockd_fast.pcapfile import CaptureWriter

LAYOUT = KnockLayout()
CLIENT, SERVER = ipaddress.IPv4Address("192.0.2.10"), ipaddress.IPv4Address("198.51.100.20")
KEY = bytes(range(64))
T0 = 1_700_000_000
USERS = frozenset({7, 300})


def sealed(user_id: int = 7, salt: int = 0) -> bytes:
    return seal(Knock(Action.OPEN, Proto.TCP, 22, T0, CLIENT, user_id, salt), KEY)


def with_header(message: bytes, version: int, user_id: int) -> bytes:
    return bytes([version << 4 | user_id >> 8, user_id & 0xFF]) + message[2:]


def knock_frames(message: bytes, sport: int = 43210, mode: str = "syn") -> list[bytes]:
    out = []
    for port in LAYOUT.ports_for(message):
        transport = fr.tcp(sport, port, "S") if mode == "syn" else fr.udp(sport, port)
        proto = fr.PROTO_TCP if mode == "syn" else fr.PROTO_UDP
        out.append(fr.frame(LINKTYPE_ETHERNET, fr.ip(CLIENT, SERVER, proto, transport)))
    return out


def spa_frame(payload: bytes) -> bytes:
    udp = fr.udp(43210, LAYOUT.spa_port, payload)
    return fr.frame(LINKTYPE_ETHERNET, fr.ip(CLIENT, SERVER, fr.PROTO_UDP, udp))


def digit_frame(segment: int, digit: int, sport: int = 43210) -> bytes:
    port = LAYOUT.base_port + segment * LAYOUT.segment_size + digit
    return fr.frame(
        LINKTYPE_ETHERNET, fr.ip(CLIENT, SERVER, fr.PROTO_TCP, fr.tcp(sport, port, "S"))
    )


def run(engine_module, frames: list[bytes], bpf: bool = False, **options):  # noqa: ANN001, ANN201
    """(records, stats) of a fresh engine over ``frames``, 1 ms apart."""
    return engine_over_frames(
        engine_module, LAYOUT, frames, T0, bpf=bpf, destinations=[SERVER], **options
    )


def messages(records: np.ndarray) -> list[bytes]:
    return [bytes(r["message"][: int(r["length"])]) for r in records]


# --- SPA: one header per datagram ---------------------------------------------------------


def test_spa_headers_are_refused_before_judging(engine_module) -> None:  # noqa: ANN001
    good = sealed(7)
    frames = [
        spa_frame(good),
        spa_frame(with_header(good, 2, 7)),  # a future version
        spa_frame(with_header(good, 0, 7)),
        spa_frame(with_header(good, 1, 8)),  # no such user here
        spa_frame(with_header(good, 1, 300)),  # a user here: judged (and fails there)
        spa_frame(bytes([0xF0]) + bytes(33)),  # version 15
    ]
    records, stats = run(engine_module, frames, user_ids=USERS)
    assert messages(records) == [good, with_header(good, 1, 300)]
    assert stats["spa_packets"] == stats["completions"] == 2
    assert stats["refused_version"] == 3 and stats["refused_user"] == 1
    assert stats["malformed"] == stats["ignored"] == 0


def test_without_user_ids_every_header_is_judged(engine_module) -> None:  # noqa: ANN001
    """Tests and benchmarks feed random messages: no header check unless users are given."""
    junk = [random.Random(number).randbytes(34) for number in range(50)]
    records, stats = run(engine_module, [spa_frame(m) for m in junk])
    assert messages(records) == junk
    assert stats["refused_version"] == stats["refused_user"] == 0


def test_a_junk_spa_flood_mostly_never_reaches_python(engine_module) -> None:  # noqa: ANN001
    """Random 34-byte payloads: 1 in 16 has version 1, and then 2 in 4096 name a user."""
    rng = random.Random(10)
    junk = [rng.randbytes(34) for _ in range(4000)]
    records, stats = run(engine_module, [spa_frame(m) for m in junk], user_ids=USERS)
    admitted = [m for m in junk if m[0] >> 4 == 1 and ((m[0] & 15) << 8 | m[1]) in USERS]
    assert messages(records) == admitted
    assert stats["refused_version"] == sum(1 for m in junk if m[0] >> 4 != 1)
    assert stats["refused_user"] == 4000 - len(admitted) - stats["refused_version"]
    assert stats["refused_version"] > 3600  # the cost a flood of garbage now leaves behind


# --- knocks: the header is the first digits ----------------------------------------------


@pytest.mark.parametrize("mode", ["syn", "udp"])
def test_a_knock_naming_no_user_is_refused_at_completion(engine_module, mode: str) -> None:  # noqa: ANN001
    good = sealed(7)
    frames = (
        knock_frames(good, 1111, mode)
        + knock_frames(with_header(good, 1, 9), 2222, mode)
        + knock_frames(with_header(good, 3, 7), 3333, mode)
    )
    records, stats = run(engine_module, frames, user_ids=USERS)
    assert messages(records) == [good]
    assert stats["completions"] == 1
    assert stats["refused_user"] == 1 and stats["refused_version"] == 1
    assert stats["knock_packets"] == 3 * 34  # each packet was a digit; the message is refused


def test_a_refused_knock_frees_its_slot(engine_module) -> None:  # noqa: ANN001
    """The source's next knock starts afresh (no leftovers of the refused one)."""
    good = sealed(7)
    frames = knock_frames(with_header(good, 1, 9), 1111) + knock_frames(good, 1111)
    records, stats = run(engine_module, frames, user_ids=USERS)
    assert messages(records) == [good] and stats["refused_user"] == 1
    assert stats["conflicts"] == stats["duplicates"] == 0


def test_an_alternative_in_the_header_keeps_the_genuine_knock(engine_module) -> None:  # noqa: ANN001
    """A conflicting first digit (a spoofer's, or a stale one) comes first and names nobody:
    the genuine digit is an alternative, and the completion is still judged."""
    good = sealed(7)
    wrong_first = (good[0] + 1) % 256
    frames = [digit_frame(0, wrong_first), *knock_frames(good)]
    records, stats = run(engine_module, frames, user_ids=USERS)
    assert len(records) == 1 and stats["refused_user"] + stats["refused_version"] == 0
    assert messages(records)[0][0] == wrong_first  # the primary names nobody...
    # ...an alternative does
    assert good in list(candidate_messages(completion_of(records[0]), LAYOUT.digit_bits))


def header_admitted(message: bytes) -> bool:
    return message[0] >> 4 == 1 and ((message[0] & 15) << 8 | message[1]) in USERS


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    digit_bits=st.sampled_from([4, 6, 8, 10]),
    header_digits=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 1023)), min_size=0, max_size=8
    ),
    user_id=st.sampled_from([7, 300, 8, 4095]),
    version=st.sampled_from([1, 1, 1, 0, 2]),
)
def test_refusal_is_exactly_no_candidate_naming_a_user(
    engine_module,  # noqa: ANN001
    digit_bits: int,
    header_digits: list[tuple[int, int]],
    user_id: int,
    version: int,
) -> None:
    """Against the judge's own view: a completion is refused if and only if none of its
    candidate messages (every combination of alternatives) has an admitted header."""
    layout = KnockLayout(base_port=20000 if digit_bits < 10 else 1024, digit_bits=digit_bits)
    message = with_header(sealed(7), version, user_id)
    ports = layout.ports_for(message)
    # Conflicting digits in the segments that hold the header, sent first: they become the
    # primary digits and the genuine ones alternatives, or alternatives themselves.
    extra = [
        layout.base_port + segment * layout.segment_size + digit % layout.segment_size
        for segment, digit in header_digits
        if segment * digit_bits < 16
    ]
    frames = [
        fr.frame(LINKTYPE_ETHERNET, fr.ip(CLIENT, SERVER, fr.PROTO_TCP, fr.tcp(4321, p, "S")))
        for p in extra + ports
    ]

    def over(**options):  # noqa: ANN202
        return engine_over_frames(
            engine_module, layout, frames, T0, destinations=[SERVER], **options
        )

    plain, _ = over()
    admitted, stats = over(user_ids=USERS)
    assert len(plain) == 1
    every = list(candidate_messages(completion_of(plain[0]), digit_bits, limit=10**6))
    if any(header_admitted(m) for m in every):
        assert np.array_equal(admitted, plain)
    else:
        assert len(admitted) == 0
        refused = "refused_user" if any(m[0] >> 4 == 1 for m in every) else "refused_version"
        assert stats[refused] == 1 and stats["completions"] == 0


# --- modes --------------------------------------------------------------------------------


def test_a_mode_that_is_off_refuses_its_packets(engine_module) -> None:  # noqa: ANN001
    good = sealed(7)
    frames = [*knock_frames(good), spa_frame(good)]
    records, stats = run(engine_module, frames, knock_mode=False, user_ids=USERS)
    assert messages(records) == [good] and stats["spa_packets"] == 1
    assert stats["refused_mode"] == 34 and stats["knock_packets"] == 0
    records, stats = run(engine_module, frames, spa_mode=False, user_ids=USERS)
    assert messages(records) == [good] and stats["knock_packets"] == 34
    assert stats["refused_mode"] == 1 and stats["spa_packets"] == 0


def test_admit_changes_what_is_refused(engine_module) -> None:  # noqa: ANN001
    """A reload: users and modes change on a running engine, its table kept."""
    engine = engine_module.CaptureEngine(LAYOUT, user_ids={300}, spa_mode=False)
    assert engine.admission == admission(True, False, {300})
    engine.admit(knock_mode=True, spa_mode=True, user_ids={7})
    assert engine.admission.user_ids == {7} and engine.admission.spa_mode
    good = sealed(7)
    with tempfile.TemporaryDirectory(prefix="knockd-admission-") as directory:
        path = Path(directory) / "capture.pcap"
        with CaptureWriter(path, LINKTYPE_ETHERNET) as writer:
            for number, frame in enumerate([spa_frame(good), *knock_frames(good)]):
                writer.write(T0, number, frame)
        engine.open_file(str(path))
        engine.dispatch(10)  # the datagram and 9 digits
        engine.admit(knock_mode=True, spa_mode=True, user_ids={8})
        while engine.dispatch():
            pass
    records, stats = engine.drain(), engine.stats()
    assert messages(records) == [good]  # the datagram, judged under the old users
    assert stats["refused_user"] == 1  # the knock completed under the new ones


@pytest.mark.parametrize(
    "arguments, error",
    [
        ({"knock_mode": 1}, TypeError),
        ({"spa_mode": "yes"}, TypeError),
        ({"user_ids": [True]}, TypeError),
        ({"user_ids": ["7"]}, TypeError),
        ({"user_ids": [4096]}, ValueError),
        ({"user_ids": [-1]}, ValueError),
    ],
)
def test_admission_arguments_are_checked_alike(engine_module, arguments, error) -> None:  # noqa: ANN001
    with pytest.raises(error) as from_spec:
        engine_settings(LAYOUT, **arguments)
    with pytest.raises(error) as from_engine:
        engine_module.CaptureEngine(LAYOUT, **arguments)
    assert str(from_engine.value) == str(from_spec.value)
    engine = engine_module.CaptureEngine(LAYOUT)
    with pytest.raises(error):
        engine.admit(**{"knock_mode": True, "spa_mode": True, "user_ids": None, **arguments})
    assert engine.admission == admission()  # a refused change changes nothing


# --- the kernel filter --------------------------------------------------------------------


@pytest.mark.extension
def test_the_filter_leaves_out_the_ports_of_a_mode_that_is_off() -> None:
    from knockd_fast import _capture_c

    good = sealed(7)
    frames = [*knock_frames(good), spa_frame(good), *knock_frames(good, mode="udp")]
    records, stats = run(_capture_c, frames, bpf=True, spa_mode=False, user_ids=USERS)
    assert stats["packets"] == 68 and stats["refused_mode"] == 0  # the kernel kept it out
    assert len(records) == 2
    records, stats = run(_capture_c, frames, bpf=True, knock_mode=False, user_ids=USERS)
    assert stats["packets"] == 1 and messages(records) == [good]
    engine = _capture_c.CaptureEngine(LAYOUT, spa_mode=False)
    assert f"dst port {LAYOUT.spa_port}" not in engine.filter_expression
    engine.admit(knock_mode=False, spa_mode=True)
    assert f"dst port {LAYOUT.spa_port}" in engine.filter_expression
    assert "portrange" not in engine.filter_expression
