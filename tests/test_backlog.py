"""The judging backlog: bounded, and fair between source prefixes (knockd_fast.judging).

A flood of whole completions from one network must neither delay another network's knock
by its own length nor push it out when the backlog is full. bench/backlog.py measures the
share of genuine knocks accepted under such floods with the real judge.
"""

from __future__ import annotations

import collections
import ipaddress

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from knockd_fast.capture_spec import COMPLETION_DTYPE, KIND_SPA, address_key
from knockd_fast.completions import Completion
from knockd_fast.judging import Backlog, source_prefixes

SERIAL = slice(0, 4)  # where a record's serial number is kept, in its message bytes


def records(sources: list[str], first_serial: int = 0) -> np.ndarray:
    out = np.zeros(len(sources), dtype=COMPLETION_DTYPE)
    for n, source in enumerate(sources):
        address = ipaddress.ip_address(source)
        out[n]["kind"], out[n]["family"], out[n]["length"] = KIND_SPA, address.version, 4
        out[n]["source"] = list(address_key(address))
        out[n]["message"][SERIAL] = list((first_serial + n).to_bytes(4, "big"))
    return out


def serial(completion: Completion) -> int:
    return int.from_bytes(completion.message[SERIAL], "big")


def source(completion: Completion) -> str:
    key = completion.source
    return str(ipaddress.ip_address(key[12:] if key[:12] == bytes(10) + b"\xff\xff" else key))


def test_prefixes_are_ipv4_24_and_ipv6_48() -> None:
    keys = source_prefixes(
        records(["192.0.2.1", "192.0.2.254", "192.0.3.1", "2001:db8:1::1", "2001:db8:1:ff::9"])
    )
    assert keys[0] == keys[1] != keys[2]
    assert keys[3] == keys[4] != keys[0]


def test_a_flood_from_one_network_does_not_delay_another_by_its_length() -> None:
    backlog = Backlog(10_000)
    backlog.add("eth0", records(["203.0.113.7"] * 5_000))
    backlog.add("eth1", records(["198.51.100.9"], first_serial=99_999))
    first = [(interface, source(r)) for interface, r in backlog.take(2)]
    assert first == [("eth0", "203.0.113.7"), ("eth1", "198.51.100.9")]
    assert len(backlog) == 4_999 and backlog.prefixes() == 1


def test_a_full_backlog_drops_from_the_longest_queue_never_the_lone_newcomer() -> None:
    backlog = Backlog(100)
    backlog.add(None, records(["203.0.113.7"] * 100))
    backlog.add(None, records(["203.0.113.8"] * 5, first_serial=1_000))  # the same /24
    assert backlog.dropped == 5  # its own network is the longest queue: the newcomers go
    backlog.add(None, records(["198.51.100.9", "2001:db8::1"], first_serial=2_000))
    assert backlog.dropped == 7 and len(backlog) == 100
    taken = [serial(r) for _, r in backlog.take(None)]
    # The flood lost its newest two; the two other networks are served among the first.
    assert taken[:3] == [0, 2_000, 2_001] and taken[3:] == list(range(1, 98))


def test_every_lone_source_survives_a_full_backlog_of_one_network() -> None:
    backlog = Backlog(1_000)
    backlog.add(None, records(["203.0.113.7"] * 1_000))
    lone = [f"198.51.{n // 256}.{n % 256}" for n in range(0, 256 * 256, 256)][:200]
    backlog.add(None, records(lone, first_serial=10_000))
    kept = collections.Counter(source(r).rsplit(".", 1)[0] for _, r in backlog.take(None))
    assert all(kept[address.rsplit(".", 1)[0]] == 1 for address in lone)
    assert kept["203.0.113"] == 800 and backlog.dropped == 200


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(st.integers(0, 5), min_size=1, max_size=30)),
        st.tuples(st.just("take"), st.integers(0, 20)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 40), steps=operations)
def test_backlog_properties(limit: int, steps: list) -> None:
    """Against a model of queue lengths: bounded; nothing lost or invented; each network's
    completions in order; an arrival is dropped only when its own queue would be a longest
    one, and otherwise pushes out the newest of a longest queue; networks served in turn."""
    backlog = Backlog(limit)
    queues: dict[int, list[int]] = collections.defaultdict(list)  # network -> serials
    added = taken = 0
    next_serial = 0
    for kind, argument in steps:
        if kind == "add":
            for network in argument:
                full = len(backlog) >= limit
                longest = max((len(q) for q in queues.values()), default=0)
                dropped = backlog.dropped
                backlog.add(None, records([f"192.0.{network}.1"], next_serial))
                if not full:
                    assert backlog.dropped == dropped
                    queues[network].append(next_serial)
                elif len(queues[network]) + 1 >= longest:
                    assert backlog.dropped == dropped + 1  # the arrival itself
                else:
                    assert backlog.dropped == dropped + 1
                    lengths = _lengths(backlog)
                    shortened = [n for n in queues if lengths.get(n, 0) < len(queues[n])]
                    assert len(shortened) == 1 and len(queues[shortened[0]]) == longest
                    queues[shortened[0]].pop()  # its newest
                    queues[network].append(next_serial)
                next_serial += 1
                added += 1
        else:
            waiting = [n for n in queues if queues[n]]
            got = [(_network(r), serial(r)) for _, r in backlog.take(argument)]
            taken += len(got)
            assert len(got) == min(argument, sum(len(q) for q in queues.values()))
            # In turn: no network served twice before every waiting one was served once.
            first_round = [n for n, _ in got[: len(waiting)]]
            assert len(set(first_round)) == len(first_round)
            for network, number in got:
                assert queues[network].pop(0) == number  # oldest first, per network
        assert len(backlog) == sum(len(q) for q in queues.values()) <= limit
        assert added == taken + backlog.dropped + len(backlog)


def _network(completion: Completion) -> int:
    return completion.source[14]


def _lengths(backlog: Backlog) -> dict[int, int]:
    return {key[14]: len(queue) for key, queue in backlog._queues.items()}
