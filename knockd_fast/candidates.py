"""From a completion to the messages worth authenticating.

A segment that saw conflicting digits (a late retransmit, a spoofed packet) carries
alternatives; the right message is one of the combinations. The count is bounded so that
a spoofer cannot make the daemon spend unbounded AES work on one completion.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from .capture_spec import KIND_SPA, MAX_CANDIDATES
from .completions import Completion


def _set_digit(value: int, total_bits: int, digit_bits: int, segment: int, digit: int) -> int:
    shift = total_bits - (segment + 1) * digit_bits
    mask = ((1 << digit_bits) - 1) << shift
    return (value & ~mask) | (digit << shift)


def candidate_messages(
    completion: Completion, digit_bits: int, limit: int = MAX_CANDIDATES
) -> Iterable[bytes]:
    """The primary message, then each combination of alternatives, at most ``limit`` in all."""
    if completion.kind == KIND_SPA or not completion.alternatives:
        return (completion.message,)  # most completions: no generator to start and run out
    return _combinations(completion, digit_bits, limit)


def _combinations(completion: Completion, digit_bits: int, limit: int) -> Iterator[bytes]:
    primary = completion.message
    yield primary
    options: dict[int, list[int | None]] = {}
    for segment, digit in completion.alternatives:
        options.setdefault(segment, [None]).append(digit)
    segments = sorted(options)
    length = len(primary)
    pad = -(length * 8) % digit_bits
    total_bits = length * 8 + pad
    value = int.from_bytes(primary, "big") << pad
    produced = 1
    for choice in itertools.product(*(options[s] for s in segments)):
        if all(digit is None for digit in choice):
            continue  # the primary, already given
        if produced >= limit:
            return
        candidate = value
        for segment, digit in zip(segments, choice, strict=True):
            if digit is not None:
                candidate = _set_digit(candidate, total_bits, digit_bits, segment, digit)
        produced += 1
        yield (candidate >> pad).to_bytes(length, "big")
