"""Fleet-wide replay claims against Debian's redis-server, started here on loopback and
stopped by its PID (tests/redis_server.py). Issue 14, part 1's building block."""

from __future__ import annotations

import secrets
import time

import pytest
from redis_server import REDIS_SERVER, RedisServer

from knockd_fast.fleet import Claim, FleetUnavailable, ReplayClaims, claim_key

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (make test installs it)"
)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer.start(tmp_path / "redis")
    try:
        yield server
    finally:
        server.kill()


def claims(count: int, seconds: int = 60, user_id: int = 7) -> list[Claim]:
    return [Claim(user_id, secrets.token_bytes(16), seconds) for _ in range(count)]


def test_a_message_claimed_by_one_gateway_is_named_as_taken_to_the_others(redis_server) -> None:
    gw1 = ReplayClaims.connect(redis_server.url, "gw1")
    gw2 = ReplayClaims.connect(redis_server.url, "gw2")
    batch = claims(256)
    assert gw1.claim(batch) == [None] * 256, "new messages: gw1 holds them now"
    assert gw2.claim(batch) == ["gw1"] * 256, "a replay to gw2 names who took it"
    assert gw1.claim(batch[:3]) == [None] * 3, "gw1's own claim again is no replay there"
    fresh = claims(1)
    assert gw2.claim([batch[0], *fresh]) == ["gw1", None], "per message, in order"
    # Per user: the same SIV under another user id is another message.
    assert gw2.claim([Claim(8, batch[0].siv, 60)]) == [None]


def test_a_claim_lives_its_seconds(redis_server) -> None:
    gw1 = ReplayClaims.connect(redis_server.url, "gw1")
    gw2 = ReplayClaims.connect(redis_server.url, "gw2")
    (short,) = claims(1, seconds=1)
    assert gw1.claim([short]) == [None]
    ttl = gw1.client.ttl(claim_key(short.user_id, short.siv))
    assert 0 < ttl <= 1
    time.sleep(2.1)
    assert gw2.claim([short]) == [None], "gone with its window: every gateway refuses it as expired"


def test_redis_gone_is_one_line_quickly_and_back_works(redis_server) -> None:
    gw1 = ReplayClaims.connect(redis_server.url, "gw1")
    batch = claims(4)
    assert gw1.claim(batch[:2]) == [None, None]
    redis_server.kill()
    started = time.monotonic()
    with pytest.raises(FleetUnavailable) as info:
        gw1.claim(batch[2:])
    assert time.monotonic() - started < 2, "bounded: one attempt, short timeouts"
    assert str(info.value).startswith("redis: ") and "\n" not in str(info.value)
    redis_server.restart()  # empty: a Redis restarted without persistence
    assert gw1.claim(batch) == [None] * 4


def test_nothing_to_claim_costs_no_round_trip() -> None:
    class Unreachable:
        def pipeline(self, transaction: bool = True):  # noqa: ANN201
            raise AssertionError("no round trip for an empty slice")

    assert ReplayClaims(Unreachable(), "gw1").claim([]) == []


@pytest.mark.parametrize("name", ["", "gw 1", "gw\t1"])
def test_a_gateway_name_with_spaces_or_none_is_refused(name: str) -> None:
    with pytest.raises(ValueError):
        ReplayClaims(object(), name)
