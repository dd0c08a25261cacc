"""knockd_fast.completions: a drained batch as Python values, field for field what the records
hold; and the address text the judge and the firewall log."""

from __future__ import annotations

import ipaddress

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from knockd_fast.addresses import address_text, key_text
from knockd_fast.capture_spec import (
    COMPLETION_DTYPE,
    IPV4_MAPPED_PREFIX,
    MAX_ALTERNATIVES,
    MESSAGE_CAPACITY,
    key_address,
)
from knockd_fast.completions import Completion, completion_of, completions

raw_records = st.lists(
    st.tuples(
        st.integers(0, 255),  # kind
        st.integers(0, 255),  # length, past the capacity too
        st.integers(0, 255),  # n_alternatives, past MAX_ALTERNATIVES too
        st.integers(0, 2**32 - 1),  # usec, past a second too
        st.integers(-(2**62), 2**62),  # sec
        st.binary(min_size=16 + 16 + MESSAGE_CAPACITY + 3 * MAX_ALTERNATIVES, max_size=80 + 24),
    ),
    max_size=20,
)


def as_records(raw: list) -> np.ndarray:
    records = np.zeros(len(raw), dtype=COMPLETION_DTYPE)
    for record, (kind, length, alternatives, usec, sec, data) in zip(records, raw, strict=True):
        record["kind"], record["length"], record["n_alternatives"] = kind, length, alternatives
        record["usec"], record["sec"] = usec, sec
        record["source"], record["destination"] = list(data[:16]), list(data[16:32])
        record["message"] = list(data[32 : 32 + MESSAGE_CAPACITY])
        record["alt_segment"] = list(data[80:88])
        record["alt_digit"] = [data[88 + 2 * i] << 8 | data[89 + 2 * i] for i in range(8)]
    return records


def one_by_one(record: np.void) -> Completion:
    """The fields as the judge read them from each record before (the reference)."""
    count = int(record["n_alternatives"])
    return Completion(
        int(record["kind"]),
        int(record["sec"]) + int(record["usec"]) / 1e6,
        bytes(record["source"]),
        bytes(record["destination"]),
        bytes(record["message"][: int(record["length"])]),
        tuple(
            (int(s), int(d))
            for s, d in zip(record["alt_segment"][:count], record["alt_digit"][:count], strict=True)
        ),
    )


@settings(max_examples=200, deadline=None)
@given(raw_records)
def test_a_batch_converts_to_exactly_its_records_fields(raw) -> None:
    records = as_records(raw)
    batch = completions(records)
    assert batch == [one_by_one(record) for record in records]
    assert all(type(c.captured_at) is float and type(c.kind) is int for c in batch)
    assert [completion_of(record) for record in records] == batch


addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda n: IPV4_MAPPED_PREFIX + n.to_bytes(4, "big")),
    st.binary(min_size=16, max_size=16),
    # IPv6 spellings glibc's inet_ntop would say otherwise: ::a.b.c.d, runs of zeros
    st.integers(0, 2**32 - 1).map(lambda n: bytes(12) + n.to_bytes(4, "big")),
    st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF]), min_size=8, max_size=8).map(
        lambda words: b"".join(w.to_bytes(2, "big") for w in words)
    ),
)


@settings(max_examples=500, deadline=None)
@given(addresses)
def test_key_text_says_what_the_address_says(key: bytes) -> None:
    assert key_text(key) == str(key_address(key))
    assert ipaddress.ip_address(key_text(key)) == key_address(key)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
def test_a_grants_address_text_is_what_the_address_says(address) -> None:
    assert address_text(address) == str(address)
