"""The engines' completion records as plain Python values, converted a batch at a time.

A field read from a numpy record (``record["source"]``) costs about a microsecond, and
judging one completion read ten of them: more than the checks themselves. ``completions``
turns a whole drained batch into ``Completion`` tuples with a few array operations, so
the judge reads attributes of plain bytes and ints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from .capture_spec import MESSAGE_CAPACITY

if TYPE_CHECKING:
    import numpy as np


class Completion(NamedTuple):
    """One completed message as the engine reported it."""

    kind: int  # KIND_KNOCK or KIND_SPA
    captured_at: float  # Unix seconds of its last packet (the kernel's timestamp)
    source: bytes  # 16-byte address key (IPv4 as IPv4-mapped IPv6)
    destination: bytes  # the same, of the protected address it was sent to
    message: bytes  # the primary message, as long as the record says
    # (segment, digit) of each conflicting digit seen, in the engine's order; () for most
    alternatives: tuple[tuple[int, int], ...] = ()


def completions(records: np.ndarray) -> list[Completion]:
    """The records of a drained batch (``COMPLETION_DTYPE``), oldest first."""
    count = len(records)
    if not count:
        return []
    kinds = records["kind"].tolist()
    # The same float as int(sec) + int(usec) / 1e6 in Python: both round once per step.
    times = (records["sec"] + records["usec"] / 1e6).tolist()
    lengths = records["length"].clip(max=MESSAGE_CAPACITY).tolist()
    sources = records["source"].tobytes()
    destinations = records["destination"].tobytes()
    messages = records["message"].tobytes()
    with_alternatives = records["n_alternatives"].nonzero()[0].tolist()
    batch = [
        Completion(
            kinds[i],
            times[i],
            sources[16 * i : 16 * i + 16],
            destinations[16 * i : 16 * i + 16],
            messages[MESSAGE_CAPACITY * i : MESSAGE_CAPACITY * i + lengths[i]],
        )
        for i in range(count)
    ]
    for i in with_alternatives:
        record = records[i]
        n = int(record["n_alternatives"])
        segments, digits = record["alt_segment"][:n].tolist(), record["alt_digit"][:n].tolist()
        batch[i] = batch[i]._replace(alternatives=tuple(zip(segments, digits, strict=True)))
    return batch


def completion_of(record: np.void) -> Completion:
    """One record (``COMPLETION_DTYPE``) as a ``Completion``."""
    import numpy as np

    return completions(np.array(record, dtype=record.dtype).reshape(1))[0]
