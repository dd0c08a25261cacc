"""The fleet: several gateways sharing what one of them accepted, through Redis (issue 14).

This module holds the fleet-wide replay claims: every message a gateway accepts is claimed
with ``SET kf:replay:<user>:<siv> <gateway> NX GET EX <seconds>``, all of one judging
slice in one pipelined round trip. A message another gateway claimed first comes back
with that gateway's name: it is a replay there. The local replay cache stays the first
check and the durable one; Redis holds no keys, only who accepted which message.

Not wired into the daemon yet (issue 14 is in progress): the claims client and its tests
against Debian's redis-server come first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


class ReplayClaims:
    """Fleet-wide claims of accepted messages, for the gateway named ``gateway``."""

    def __init__(self, client: Any, gateway: str) -> None:
        if not gateway or any(c.isspace() for c in gateway):
            raise ValueError(f"gateway name {gateway!r}: no spaces, not empty")
        self.client = client
        self.gateway = gateway
        self._own = gateway.encode()

    @classmethod
    def connect(cls, url: str, gateway: str, password: str | None = None) -> ReplayClaims:
        """A client of the Redis at ``url`` (``redis://`` or ``rediss://`` for TLS); no
        connection is made until the first claim."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(
            url,
            password=password,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        return cls(client, gateway)

    def claim(self, claims: Sequence[Claim]) -> list[str | None]:
        """Claim every message for this gateway in one round trip. Per claim: None when this
        gateway holds it now (new, or claimed by this gateway before), else the name of the
        gateway that claimed it first. Raises FleetUnavailable."""
        if not claims:
            return []
        import redis

        pipe = self.client.pipeline(transaction=False)
        for claim in claims:
            # NX with GET (Redis >= 7.0): set only if new, and say what was there.
            pipe.set(
                claim_key(claim.user_id, claim.siv), self._own, nx=True, get=True,
                ex=max(1, int(claim.seconds)),
            )  # fmt: skip
        try:
            found = pipe.execute()
        except redis.RedisError as error:
            raise FleetUnavailable(f"redis: {_why(error)}") from None
        return [
            None if holder is None or holder == self._own else _text(holder) for holder in found
        ]


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _why(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
