"""A completed message -> accept, or reject with one reason (docs/protocol.md §7).

``judge`` is a pure function: no I/O, no clock (``now`` is given), no state but what
the caller passes (the users and a ``seen`` predicate over the replay cache). It
never raises for anything a sender controls; it does not remember an accepted
message: the caller does, with ``replay_expiry`` (see ``knockd_fast.replay``).
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from knock_client.protocol import (
    Knock,
    PlaintextError,
    ProtocolError,
    read_header,
    seconds_since,
    siv_of,
    unseal,
)

from .addresses import address_text
from .capture_spec import MAX_CANDIDATES, key_address
from .config import GrantSettings, IPAddress, User

OK = "ok"


class Verdict(NamedTuple):
    accepted: bool
    reason: str  # "ok" or one of knock_client.protocol.REJECTION_REASONS
    detail: str  # one short human line for the log
    user: User | None  # known from the header on, even if the message is then rejected
    knock: Knock | None  # the decoded fields, once a candidate authenticated
    message: bytes | None  # the candidate that authenticated
    siv: bytes | None
    # The packet's source as an address object, on an accepted verdict (built by the judge
    # for its checks; the caller's grant takes the same object instead of a second one)
    source: IPAddress | None = None


def _reject(
    reason: str,
    detail: str,
    user: User | None = None,
    knock: Knock | None = None,
    message: bytes | None = None,
    siv: bytes | None = None,
) -> Verdict:
    return Verdict(False, reason, detail, user, knock, message, siv)


def _authenticate(candidate: object, users: Mapping[int, User]) -> Verdict | tuple:
    """Checks 1-3a on one candidate: a rejecting Verdict, or (user, knock, message, siv)."""
    if type(candidate) is bytes:  # what the daemon passes; anything else is converted
        message = candidate
    else:
        try:
            message = memoryview(candidate).tobytes()  # type: ignore[arg-type]
        except (TypeError, ValueError):  # never bytes(n): an int would allocate n bytes
            return _reject(
                "malformed", f"candidate is not a byte string ({type(candidate).__name__})"
            )
    try:
        user_id = read_header(message)
    except ProtocolError as error:
        return _reject("malformed", str(error))
    user = users.get(user_id)
    if user is None:
        return _reject("unknown_user", f"no user with id {user_id}")
    try:
        knock = unseal(message, user.key, user_id)
    except PlaintextError as error:
        # Authentic, so judged no further: the sender holds the key but breaks the format.
        return _reject("malformed", f"authentic but {error}", user, None, message, siv_of(message))
    except ValueError as error:  # the user has no usable key (config loaded without keys)
        return _reject("authentication", f"user {user.name!r}: {error}", user)
    if knock is None:
        return _reject("authentication", f"does not authenticate for user {user.name!r}", user)
    return user, knock, message, siv_of(message)


def judge(
    candidates: Iterable[bytes],
    source: IPAddress | str | bytes,
    destination: IPAddress | str | None,
    now: float,
    users: Mapping[int, User],
    window: int,
    seen: Callable[[int, bytes, int], bool | str],
) -> Verdict:
    """Judge one completion: its candidate messages (primary first), as §7 orders the checks.

    At most ``MAX_CANDIDATES`` candidates are looked at, whatever the iterable holds. The
    first that authenticates under the key of the user its own header names is judged
    further (checks 3a-8); if none does, the verdict is that of the first candidate whose
    header names a configured user (so a failed knock is logged with its user whenever one
    of its candidates shows it), else the first candidate's (malformed, unknown_user).
    ``seen(user_id, siv, sent_at)`` says whether the replay cache counts that message (sealed
    at ``sent_at``, unwrapped) as seen: True, or a string saying why, e.g.
    ``lambda uid, siv, sent: cache.seen(uid, siv, now, sent)``; after an
    accepted verdict the caller remembers it with ``replay_expiry``. ``destination`` is
    not checked (the capture only reports knocks to protected addresses); it is taken so
    that callers pass one completion whole. ``source`` may be the engine's 16-byte key: the
    address object is then built only for a message that authenticates.
    """
    if isinstance(source, str):  # an address object as is: ip_address() would re-parse it
        source = ipaddress.ip_address(source)
    first: Verdict | None = None
    tried = 0
    found = None
    for candidate in itertools.islice(candidates, MAX_CANDIDATES):
        tried += 1
        outcome = _authenticate(candidate, users)
        if not isinstance(outcome, Verdict):  # (user, knock, message, siv)
            found = outcome
            break
        if outcome.message is not None:  # authentic but malformed: this one is judged
            return outcome
        if first is None or (first.user is None and outcome.user is not None):
            first = outcome
    if found is None:
        if first is None:
            return _reject("malformed", "no candidate message")
        if tried > 1:
            detail = f"{first.detail} ({tried} candidates tried)"
            return _reject(first.reason, detail, first.user)
        return first

    user, knock, message, siv = found
    if type(source) is bytes:
        source = key_address(source)
    age = seconds_since(knock.timestamp, now)
    if age > window:
        return _reject("expired", f"sent {age} s ago, window {window} s", *found)
    if age < -window:
        return _reject("from_future", f"timestamp {-age} s ahead, window {window} s", *found)
    if not user.source_matches(knock.claimed_ip, source):
        return _reject(
            "source_mismatch", f"claimed {knock.claimed_ip}, packet from {source}", *found
        )
    hit = seen(user.id, siv, int(now) - age)
    if hit:
        detail = hit if isinstance(hit, str) else f"already accepted (SIV {siv.hex()[:16]})"
        return _reject("replay", detail, *found)
    if not user.allows(knock.port, knock.proto):
        return _reject(
            "not_allowed", f"{knock.port}/{knock.proto} is not allowed for {user.name!r}", *found
        )
    what = f"{knock.action} {knock.port}/{knock.proto}"
    detail = f"{what} for {address_text(source)} (user {user.name!r})"
    return Verdict(True, OK, detail, user, knock, message, siv, source)


def grant_duration(knock: Knock, settings: GrantSettings) -> int:
    """Seconds an ``open`` grant lasts: 0 asks for the default; capped at the maximum."""
    requested = knock.duration or settings.default_timeout
    return min(requested, settings.max_timeout)


def replay_expiry(knock: Knock, now: float, window: int) -> int:
    """The ``expires_at`` to remember an accepted message with: its timestamp + window.

    The wire timestamp is taken modulo 2**32; it is unwrapped around ``now`` as check 4
    does, so the cache keeps the message exactly as long as check 4 would still pass it.
    """
    return int(now) - seconds_since(knock.timestamp, now) + window
