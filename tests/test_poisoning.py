"""Blind digit poisoning (docs/capture.md, "Blind poisoning"), on both capture twins.

The attacker knows the victim's address and the layout and sees no traffic: it sends SYNs
from the victim's address to knock ports of its choosing, from source ports of its choosing.
Grouping digits by address and source port (the default) puts every packet whose port is
not the knock's own in a partial knock of its own: the victim's knock completes untouched.
Grouping by address alone (for port-rewriting NATs) is what the attacker breaks with three
packets; that cost is asserted too, so that the documentation's claim stays true.
"""

from __future__ import annotations

import ipaddress
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twins import engine_over_frames

from knock_client.protocol import Action, Knock, KnockLayout, Proto, open_message, seal
from knockd_fast import frames as fr
from knockd_fast.candidates import candidate_messages
from knockd_fast.capture_spec import GROUP_BY_ADDRESS, LINKTYPE_ETHERNET
from knockd_fast.completions import completion_of

LAYOUT = KnockLayout()
VICTIM, SERVER = ipaddress.IPv4Address("192.0.2.10"), ipaddress.IPv4Address("198.51.100.20")
KEY = bytes(range(64))
T0 = 1_700_000_000
SEGMENTS = 34  # an IPv4 message at 8 bits per digit


def genuine(salt: int = 0) -> bytes:
    return seal(Knock(Action.OPEN, Proto.TCP, 22, T0, VICTIM, 7, salt), KEY)


def syn(sport: int, port: int, mode: str = "syn") -> bytes:
    transport = fr.tcp(sport, port, "S") if mode == "syn" else fr.udp(sport, port)
    proto = fr.PROTO_TCP if mode == "syn" else fr.PROTO_UDP
    return fr.frame(LINKTYPE_ETHERNET, fr.ip(VICTIM, SERVER, proto, transport))


def port(segment: int, digit: int) -> int:
    return LAYOUT.base_port + segment * LAYOUT.segment_size + digit


def run(engine_module, frames: list[bytes], **options):  # noqa: ANN001, ANN201
    """(records, stats) of the engine over ``frames``, 1 ms apart."""
    return engine_over_frames(engine_module, LAYOUT, frames, T0, destinations=[SERVER], **options)


def recovered(records, message: bytes) -> bool:  # noqa: ANN001
    """Whether ``message`` is among the candidates of some completion (what the verifier
    would authenticate: at most MAX_CANDIDATES per completion)."""
    return any(
        message in candidate_messages(completion_of(record), LAYOUT.digit_bits)
        for record in records
    )


def triple_before(message: bytes, segment: int, ports: list[int]) -> list[bytes]:
    """The review's attack: 3 SYNs to one segment, 3 digits other than the genuine one,
    before the knock, from the source ports given; then the knock from port 43210."""
    knock_ports = LAYOUT.ports_for(message)
    real = knock_ports[segment] - port(segment, 0)
    bogus = [d for d in range(256) if d != real][:3]
    attack = [syn(sport, port(segment, d)) for sport, d in zip(ports, bogus, strict=True)]
    return attack + [syn(43210, p) for p in knock_ports]


def test_three_spoofed_syns_cannot_touch_a_knock_grouped_by_port(engine_module) -> None:  # noqa: ANN001
    message = genuine()
    for segment in (0, 1, 17, SEGMENTS - 1):  # the header's two digits too
        records, stats = run(engine_module, triple_before(message, segment, [1111, 2222, 3333]))
        assert [bytes(r["message"][:34]) for r in records] == [message]
        assert records[0]["n_alternatives"] == 0 and stats["alternatives_dropped"] == 0
        assert open_message(message, KEY).user_id == 7


def test_three_spoofed_syns_break_a_knock_grouped_by_address(engine_module) -> None:  # noqa: ANN001
    """The documented cost of ``group_by = "address"``: three packets deny a knock."""
    message = genuine()
    records, stats = run(
        engine_module, triple_before(message, 5, [1111, 2222, 3333]), group_by=GROUP_BY_ADDRESS
    )
    assert stats["alternatives_dropped"] == 1
    assert not recovered(records, message)


def test_an_attacker_who_guesses_the_port_once_is_still_recovered(engine_module) -> None:  # noqa: ANN001
    """One wrong digit from the knock's own port (a guess that hit, or a retransmission)
    becomes an alternative: the genuine message is still a candidate."""
    message = genuine()
    knock_ports = LAYOUT.ports_for(message)
    real = knock_ports[9] - port(9, 0)
    frames = [syn(43210, port(9, real ^ 0x40))] + [syn(43210, p) for p in knock_ports]
    records, _ = run(engine_module, frames)
    assert len(records) == 1 and records[0]["n_alternatives"] == 1
    assert recovered(records, message)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32 - 1),
    attack=st.lists(
        st.tuples(
            st.integers(1, 65535),  # source port: anything but the knock's
            st.integers(0, SEGMENTS - 1),
            st.integers(0, 255),
            st.sampled_from(("syn", "udp")),
        ),
        max_size=300,
    ),
    knock_sport=st.integers(1, 65535),
    mode=st.sampled_from(("syn", "udp")),
)
def test_blind_packets_never_touch_a_knock_grouped_by_port(
    engine_module,  # noqa: ANN001
    seed: int,
    attack: list[tuple[int, int, int, str]],
    knock_sport: int,
    mode: str,
) -> None:
    """Any number of spoofed digits from the victim's address, from any port but the
    knock's, anywhere before, inside or after the shuffled knock: the knock completes
    exactly, with no alternative (the table holds every partial knock: no eviction)."""
    rng = random.Random(seed)
    message = genuine(seed % (1 << 24))
    knock = [syn(knock_sport, p, mode) for p in LAYOUT.ports_for(message)]
    rng.shuffle(knock)
    frames = list(knock)
    for sport, segment, digit, attack_mode in attack:
        if sport == knock_sport:
            sport = sport % 65535 + 1  # blind: never the knock's own port
        frames.insert(rng.randint(0, len(frames)), syn(sport, port(segment, digit), attack_mode))
    records, stats = run(engine_module, frames, capacity=len(attack) + 2)
    mine = [r for r in records if bytes(r["message"][:34]) == message]
    assert len(mine) == 1 and mine[0]["n_alternatives"] == 0, stats
    assert stats["evictions"] == 0
