"""The fleet: several gateways sharing what one of them accepted, through Redis (issue 14).

This module holds the three pieces the gateways share through Redis: replay claims,
signed grant events, and the bus that carries them.

Replay claims: every message a gateway accepts is claimed with
``SET kf:replay:<user>:<siv> <gateway> NX GET EX <seconds>``, all of one judging slice in
one pipelined round trip. A message another gateway claimed first comes back
with that gateway's name: it is a replay there. The local replay cache stays the first
check and the durable one; Redis holds no keys, only who accepted which message.

Grant events: Redis is not trusted with the firewall. Every grant change one gateway
makes is an event (open, close; an extension is an open with a later expiry, an expiry a
close) that the others apply only if its HMAC-SHA256 under the fleet key verifies, and
only once: each gateway numbers its events (``seq``, from its clock in nanoseconds, so a
restart goes on upwards), and a receiver keeps the highest number seen per gateway. So
someone who can write to Redis but holds no fleet key can open no port anywhere, nor play
a captured event again.

The bus: a stream of the changes and a hash of the live grants, kept in step by one
transaction per change, so that a gateway that joins loads the live grants and follows the
stream from exactly where they were read.

``fleetlink`` runs these for the daemon: when to claim, publish and follow.
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

from .firewall.base import Grant, format_key

REPLAY_PREFIX = "kf:replay:"
# One attempt per round trip, each bounded: the loop that judges must never wait long on
# a Redis that is gone (redis-py would otherwise retry, and wait 5 s per attempt).
CONNECT_TIMEOUT = 0.5
COMMAND_TIMEOUT = 0.5


class FleetUnavailable(Exception):
    """Redis cannot be reached or refused the command; ``str()`` is one line saying why."""


@dataclass(frozen=True)
class Claim:
    """An accepted message to claim fleet-wide, for ``seconds`` (its replay window, clock
    skew included: after that every gateway refuses it as expired anyway)."""

    user_id: int
    siv: bytes
    seconds: int


def claim_key(user_id: int, siv: bytes) -> str:
    return f"{REPLAY_PREFIX}{user_id}:{siv.hex()}"


MIN_FLEET_KEY_BYTES = 32


def check_gateway(name: str) -> str:
    """A gateway's name, as claims and events carry it: not empty, no spaces."""
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"gateway name {name!r}: no spaces, not empty")
    return name


def redis_address(url: str) -> str:
    """What comes between ``redis://`` and the database: ``HOST:PORT``, as logs show it."""
    return url.split("://", 1)[-1].split("/", 1)[0]


def check_fleet_key(key: bytes) -> bytes:
    if len(key) < MIN_FLEET_KEY_BYTES:
        raise ValueError(f"a fleet key has at least {MIN_FLEET_KEY_BYTES} bytes, not {len(key)}")
    return key


class ReplayClaims:
    """Fleet-wide claims of accepted messages, for the gateway named ``gateway``."""

    def __init__(self, client: Any, gateway: str) -> None:
        check_gateway(gateway)
        self.client = client
        self.gateway = gateway
        self._own = gateway.encode()
        self._release = client.register_script(_RELEASE)

    @classmethod
    def connect(cls, url: str, gateway: str, password: str | None = None) -> ReplayClaims:
        """Claims through a client of the Redis at ``url`` (see ``redis_client``)."""
        return cls(redis_client(url, password=password), gateway)

    def claim(self, claims: Sequence[Claim]) -> list[str | None]:
        """Claim every message for this gateway in one round trip. Per claim: None when this
        gateway holds it now (new, or claimed by this gateway before), else the name of the
        gateway that claimed it first. Raises FleetUnavailable."""
        if not claims:
            return []
        pipe = self.client.pipeline(transaction=False)
        for claim in claims:
            # NX with GET (Redis >= 7.0): set only if new, and say what was there.
            pipe.set(
                claim_key(claim.user_id, claim.siv), self._own, nx=True, get=True,
                ex=max(1, int(claim.seconds)),
            )  # fmt: skip
        found = _execute(pipe)
        return [
            None if holder is None or holder == self._own else _text(holder) for holder in found
        ]

    def release(self, messages: Sequence[tuple[int, bytes]]) -> None:
        """Give up this gateway's claims of ``messages`` (user id, SIV) in one round trip:
        a message it claimed but then refused (a cap) is judged again where it is sent
        next, as alone. Another gateway's claim is left alone. Raises FleetUnavailable."""
        if not messages:
            return
        pipe = self.client.pipeline(transaction=False)
        for user_id, siv in messages:
            self._release(keys=[claim_key(user_id, siv)], args=[self._own], client=pipe)
        _execute(pipe)


def redis_client(
    url: str,
    *,
    username: str = "",
    password: str | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> Any:
    """A redis-py client of ``url`` (``redis://``, or ``rediss://`` for TLS, checked against
    ``ca_file`` and the system's CAs, with a client certificate if given). It connects at
    its first command; each command makes one attempt, bounded by ``timeout``."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options: dict[str, Any] = {}
    if url.startswith("rediss://"):
        # The server's certificate must chain to ca_file (else the system's CAs) and name
        # the host of the url: any certificate of the CA would do otherwise.
        options.update(ssl_cert_reqs="required", ssl_ca_certs=ca_file, ssl_check_hostname=True)
        if cert_file:
            options.update(ssl_certfile=cert_file, ssl_keyfile=key_file)
    return redis.Redis.from_url(
        url,
        username=username or None,
        password=password,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        **options,
    )


# Deletes a claim only if it is still the given gateway's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _execute(pipe: Any) -> list:
    """One round trip of a pipeline; FleetUnavailable (one line) when Redis cannot do it."""
    import redis

    try:
        return pipe.execute()
    except redis.RedisError as error:
        raise FleetUnavailable(f"redis: {_why(error)}") from None


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _why(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --- signed grant events -----------------------------------------------------------------

EVENT_VERSION = "1"
# An extension is an open with a later expiry. An expiry is applied by every gateway's own
# clock (the expiry is absolute); its event keeps the stream and the live grants exact.
EVENT_ACTIONS = ("open", "close", "expire")
MAX_EVENT_SKEW = 60.0  # seconds an event's time may differ from the receiver's clock
MAX_EVENT_BYTES = 1024  # an event's fields together: a grant is about 200 bytes


class EventRejected(Exception):
    """An event a gateway does not apply; ``str()`` is one line saying why (for the log)."""


class EventSeen(EventRejected):
    """An event numbered at or below the last one seen from its gateway: a replay on the
    stream, or, among the live grants a gateway loads again, one it knows already."""


@dataclass(frozen=True)
class GrantEvent:
    gateway: str  # who made the change
    seq: int  # its number: higher than every earlier event of that gateway
    time: float  # when (unix seconds)
    action: str  # EVENT_ACTIONS
    grant: Grant  # expiry absolute, so every gateway's kernel timeout agrees


def _grant_fields(grant: Grant) -> dict[str, object]:
    return {
        "source": str(grant.source),
        "proto": grant.proto,
        "port": grant.port,
        "destination": str(grant.destination) if grant.destination else None,
        "expires": grant.expires,
        "user": grant.user,
    }


def _signed_bytes(fields: Mapping[str, str]) -> bytes:
    # Every field but the MAC, in one canonical order: nothing unsigned can change meaning.
    return json.dumps(
        {key: fields[key] for key in ("v", "gw", "seq", "t", "ev")},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def _mac(key: bytes, data: bytes) -> hmac.HMAC:
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac


class EventSigner:
    """Makes this gateway's events: numbered upwards, signed with the fleet key."""

    def __init__(
        self, key: bytes, gateway: str, clock_ns: Callable[[], int] = time.time_ns
    ) -> None:
        self._key = check_fleet_key(key)
        self.gateway = check_gateway(gateway)
        self._clock_ns = clock_ns
        self._last_seq = 0  # raised by ``resume`` past what a run before this one signed

    def resume(self, last_seq: int) -> None:
        """Number on from ``last_seq`` (this gateway's last event before a restart): after
        a clock stepped back, its events would otherwise be refused as replays."""
        self._last_seq = max(self._last_seq, last_seq)

    def sign(self, action: str, grant: Grant) -> dict[str, str]:
        """The stream entry's fields of one grant change."""
        if action not in EVENT_ACTIONS:
            raise ValueError(f"event action {action!r} is not one of {EVENT_ACTIONS}")
        now_ns = self._clock_ns()
        self._last_seq = seq = max(self._last_seq + 1, now_ns)  # upwards even if the clock stalls
        fields = {
            "v": EVENT_VERSION,
            "gw": self.gateway,
            "seq": str(seq),
            "t": repr(now_ns / 1e9),
            "ev": json.dumps({"action": action, **_grant_fields(grant)}, sort_keys=True),
        }
        fields["mac"] = _mac(self._key, _signed_bytes(fields)).finalize().hex()
        return fields


class EventVerifier:
    """Checks the events read from the stream: authentic, fresh, not seen before, well
    formed; keeps the highest number seen per gateway (``seen``)."""

    def __init__(
        self, key: bytes, clock: Callable[[], float] = time.time, max_skew: float = MAX_EVENT_SKEW
    ) -> None:
        self._key = check_fleet_key(key)
        self._clock = clock
        self.max_skew = max_skew
        self.seen: dict[str, int] = {}

    def verify(
        self,
        raw: Mapping[bytes | str, bytes | str],
        snapshot: Mapping[str, int] | None = None,
        not_before: float | None = None,
    ) -> GrantEvent:
        """The event of one entry; EventRejected says why not (one line).

        On the stream an event is dated within ``max_skew`` of this gateway's clock and
        numbered above the last seen from its gateway (``seen``, raised as it goes). When a
        gateway catches up after an outage, ``not_before`` replaces the lower bound: the time
        of the stream position it resumes from, less the skew. A live grant loaded at a join
        (``snapshot``: ``seen`` as it was before the join) may be older, but must be an open
        numbered above what that gateway's events had reached; ``seen`` is raised too. None
        may be dated ahead of the clock. Whether a grant is still live is the caller's to
        check: an expired one is no forgery."""
        if not isinstance(raw, Mapping):
            raise EventRejected("event is not a set of fields")
        fields = {_text(name): _text(value) for name, value in raw.items()}
        if sum(len(name) + len(value) for name, value in fields.items()) > MAX_EVENT_BYTES:
            raise EventRejected("event too large")
        missing = {"v", "gw", "seq", "t", "ev", "mac"} - fields.keys()
        if missing:
            raise EventRejected(f"event without {', '.join(sorted(missing))}")
        if fields["v"] != EVENT_VERSION:
            raise EventRejected(f"event version {fields['v'][:16]!r}, this gateway reads 1")
        try:
            tag = bytes.fromhex(fields["mac"])
        except ValueError:
            raise EventRejected("event MAC is not hex") from None
        try:  # first, and in constant time: nothing unauthenticated is parsed further
            _mac(self._key, _signed_bytes(fields)).verify(tag)
        except InvalidSignature:
            raise EventRejected(
                f"event from {fields['gw'][:64]!r} fails its MAC: not made with the fleet key"
            ) from None
        gateway = fields["gw"]
        try:
            seq, moment = int(fields["seq"]), float(fields["t"])
            body = json.loads(fields["ev"])
            action = body["action"]
            grant = Grant(
                ipaddress.ip_address(body["source"]),
                body["proto"],
                body["port"],
                ipaddress.ip_address(body["destination"]) if body["destination"] else None,
                body["expires"],
                body["user"],
            )
        except (ValueError, KeyError, TypeError, RecursionError) as error:
            raise EventRejected(f"event from {gateway!r} is malformed: {error}") from None
        if action not in EVENT_ACTIONS:
            raise EventRejected(f"event from {gateway!r}: unknown action {action!r}")
        now = self._clock()
        ahead = now + self.max_skew
        if not math.isfinite(moment) or moment > ahead or seq / 1e9 > ahead:
            raise EventRejected(
                f"event {seq} from {gateway!r} is dated ahead of this gateway's clock by more "
                f"than {self.max_skew:.0f} s"
            )
        if snapshot is not None:
            if action != "open":
                raise EventRejected(f"live entry from {gateway!r} is not an open")
            if seq <= snapshot.get(gateway, 0):
                raise EventSeen(f"live entry {seq} from {gateway!r} is known already")
            self.seen[gateway] = max(seq, self.seen.get(gateway, 0))
            return GrantEvent(gateway, seq, moment, action, grant)
        oldest = now - self.max_skew if not_before is None else not_before
        if moment < oldest:
            raise EventRejected(
                f"event {seq} from {gateway!r} is dated {moment:.0f}, older than this gateway "
                f"takes ({oldest:.0f}): a replay, or a clock off by more than "
                f"{self.max_skew:.0f} s"
            )
        if seq <= self.seen.get(gateway, 0):
            raise EventSeen(f"event {seq} from {gateway!r} was seen before (a replay)")
        self.seen[gateway] = seq
        return GrantEvent(gateway, seq, moment, action, grant)


# --- the bus: the live grants and the stream of changes, kept in step --------------------

STREAM = "kf:grants"  # every change, in order
LIVE = "kf:live"  # the live grants: grant key -> "EXPIRES\nUSER\n" + the signed open
EPOCH = "kf:epoch"  # the first joiner's token: a Redis that lost its data has another
STREAM_LENGTH = 100_000  # changes kept (approximately): a gateway away longer loads LIVE


def grant_field(grant: Grant) -> str:
    """A grant's field in LIVE: its key, as logs write it (``198.51.100.7 22/tcp``)."""
    return format_key(grant.key)


# One change, atomically: the stream entry, and the live grants as the firewalls hold them.
# Both keys are read before anything is written: a key of the wrong type (planted by
# someone who can write to Redis) fails the script before it changes anything.
# An open never shortens a live grant (as Firewall.open), a close removes only its user's,
# an expiry only a grant that has not been extended since: gateways publish concurrently.
_PUBLISH = """
local held = redis.call('HGET', KEYS[2], ARGV[3])
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 7))
local held_expires, held_user
if held then
  held_expires, held_user = string.match(held, '^(%d+)\\n([^\\n]*)\\n')
  held_expires = tonumber(held_expires)
end
if ARGV[2] == 'open' then
  if not held or not held_expires or held_expires <= tonumber(ARGV[4]) then
    redis.call('HSET', KEYS[2], ARGV[3], ARGV[6])
  end
elseif held and ARGV[2] == 'close' then
  if held_user == ARGV[5] then redis.call('HDEL', KEYS[2], ARGV[3]) end
elseif held and ARGV[2] == 'expire' then
  if not held_expires or held_expires <= tonumber(ARGV[4]) then
    redis.call('HDEL', KEYS[2], ARGV[3])
  end
end
return id
"""


_FORGET = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
local expires = held and tonumber(string.match(held, '^(%d+)\\n'))
if expires and expires <= tonumber(ARGV[2]) then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""


class GrantBus:
    """The fleet's grant changes on Redis. ``publish`` adds changes to the stream and to
    the live grants, each atomically (a script), so the two never disagree; ``join`` reads
    the live grants and the stream's ends in one transaction: a gateway that applies the
    snapshot and then follows the stream from there misses no change and sees none twice."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._publish = client.register_script(_PUBLISH)
        self._forget = client.register_script(_FORGET)

    def publish(self, fields: Mapping[str, str], action: str, grant: Grant) -> str:
        """One signed change (``EventSigner.sign``); the stream entry's id."""
        return self.publish_many([(fields, action, grant)])[0]

    def publish_many(self, changes: Sequence[tuple[Mapping[str, str], str, Grant]]) -> list[str]:
        """Several signed changes, in order, in one round trip; their stream entries' ids."""
        pipe = self.client.pipeline(transaction=False)
        for fields, action, grant in changes:
            live = f"{grant.expires}\n{grant.user}\n{json.dumps(dict(fields))}"
            argv = [STREAM_LENGTH, action, grant_field(grant), grant.expires, grant.user, live]
            for name, value in fields.items():
                argv += [name, value]
            self._publish(keys=[STREAM, LIVE], args=argv, client=pipe)
        found = _execute(pipe)
        return [_text(entry_id) for entry_id in found]

    def forget(self, grants: Sequence[Grant]) -> None:
        """Remove expired grants from the live grants (those a joining gateway found), each
        only if it was not extended meanwhile; one round trip."""
        if not grants:
            return
        pipe = self.client.pipeline(transaction=False)
        for grant in grants:
            self._forget(keys=[LIVE], args=[grant_field(grant), grant.expires], client=pipe)
        _execute(pipe)

    def join(self, token: str = "") -> tuple[list[Mapping[str, str]], str, str, str]:
        """(the live grants' signed events, the stream's last id, the id from which it holds
        every entry, the token of this Redis): follow from the last; a gateway that was
        following from an id before the third missed some. The token is the first joiner's
        ``token``, kept in Redis: a Redis restarted without its data has a new one."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(LIVE)
        pipe.xrevrange(STREAM, count=1)
        pipe.xrange(STREAM, count=1)
        pipe.xlen(STREAM)
        pipe.set(EPOCH, token or "-", nx=True, get=True)
        live, last, first, length, epoch = _execute(pipe)
        snapshot = []
        for raw in live.values():
            try:
                found = json.loads(_text(raw).split("\n", 2)[2])
            except (ValueError, IndexError, RecursionError):
                found = {}
            snapshot.append(found if isinstance(found, dict) else {})  # the verifier says why
        # Trimming (XADD MAXLEN ~) keeps at least STREAM_LENGTH entries: a shorter stream
        # was never trimmed, and holds every entry after any position in it.
        kept_from = "0-0" if length < STREAM_LENGTH or not first else _text(first[0][0])
        return (
            snapshot,
            _text(last[0][0]) if last else "0-0",
            kept_from,
            _text(epoch) if epoch is not None else token,
        )

    def follow(self, after: str, block_ms: int | None = 1000, count: int = 512):
        """The stream's entries after ``after``: [(id, fields)], waiting up to ``block_ms``
        for one (None: not at all)."""
        import redis

        try:
            found = self.client.xread({STREAM: after}, count=count, block=block_ms or None)
        except redis.RedisError as error:
            raise FleetUnavailable(f"redis: {_why(error)}") from None
        return [(_text(entry_id), raw) for _, entries in found or () for entry_id, raw in entries]
