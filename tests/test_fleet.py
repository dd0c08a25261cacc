"""Fleet-wide replay claims against Debian's redis-server, started here on loopback and
stopped by its PID (tests/redis_server.py), and the signed grant events (issue 14)."""

from __future__ import annotations

import ipaddress
import json
import secrets
import time

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from knockd_fast.firewall.base import Grant
from knockd_fast.fleet import (
    LIVE,
    Claim,
    EventRejected,
    EventSeen,
    EventSigner,
    EventVerifier,
    FleetUnavailable,
    GrantBus,
    ReplayClaims,
    claim_key,
    grant_field,
)


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
    # Nothing listens on loopback port 1: any round trip would raise FleetUnavailable.
    claims = ReplayClaims.connect("redis://127.0.0.1:1/0", "gw1")
    assert claims.claim([]) == []
    claims.release([])
    with pytest.raises(FleetUnavailable):
        claims.claim([Claim(7, bytes(16), 30)])


@pytest.mark.parametrize("name", ["", "gw 1", "gw\t1"])
def test_a_gateway_name_with_spaces_or_none_is_refused(name: str) -> None:
    with pytest.raises(ValueError):
        ReplayClaims(object(), name)


# --- signed grant events ------------------------------------------------------------------

FLEET_KEY = bytes(range(32))
NOW = 1_800_000_000.0
GRANT = Grant(ipaddress.ip_address("192.0.2.2"), "tcp", 22, ipaddress.ip_address("192.0.2.1"),
              int(NOW) + 300, "alice")  # fmt: skip


def signer(gateway: str = "gw1", key: bytes = FLEET_KEY, at: float = NOW) -> EventSigner:
    return EventSigner(key, gateway, clock_ns=lambda: int(at * 1e9))


def verifier(at: float = NOW) -> EventVerifier:
    return EventVerifier(FLEET_KEY, clock=lambda: at)


def test_an_event_signed_with_the_fleet_key_is_applied_once() -> None:
    fields = signer().sign("open", GRANT)
    receiver = verifier()
    event = receiver.verify(fields)
    assert (event.gateway, event.action, event.grant) == ("gw1", "open", GRANT)
    with pytest.raises(EventRejected, match=r"was seen before \(a replay\)"):
        receiver.verify(fields)


def test_events_of_one_gateway_number_upwards_across_a_restart_and_a_stalled_clock() -> None:
    first = signer()
    a, b = first.sign("open", GRANT), first.sign("close", GRANT)  # same clock reading
    restarted = signer(at=NOW + 1)  # a new process: its numbers start from its clock
    c = restarted.sign("open", GRANT)
    receiver = verifier(NOW + 1)
    assert [receiver.verify(f).seq for f in (a, b, c)] == sorted({int(f["seq"]) for f in (a, b, c)})


def test_an_event_without_the_fleet_key_opens_nothing() -> None:
    forged = signer(key=b"\x01" * 32).sign("open", GRANT)
    with pytest.raises(EventRejected, match="fails its MAC: not made with the fleet key"):
        verifier().verify(forged)


@given(field=st.sampled_from(["v", "gw", "seq", "t", "ev", "mac"]), junk=st.text(max_size=40))
def test_any_change_to_a_signed_event_is_refused(field: str, junk: str) -> None:
    fields = signer().sign("open", GRANT)
    assume(junk != fields[field])
    with pytest.raises(EventRejected):
        verifier().verify({**fields, field: junk})


@given(st.dictionaries(st.text(max_size=8), st.text(max_size=60), max_size=8))
def test_garbage_entries_are_refused_in_one_line(raw: dict) -> None:
    with pytest.raises(EventRejected) as info:
        verifier().verify(raw)
    assert "\n" not in str(info.value)


def test_an_old_or_future_event_is_refused() -> None:
    old = signer(at=NOW - 120).sign("open", GRANT)
    with pytest.raises(EventRejected, match="older than this gateway takes"):
        verifier().verify(old)
    # Catching up from a position dated before it, the same event is taken.
    assert verifier().verify(old, not_before=NOW - 180).action == "open"
    ahead = signer(at=NOW + 120).sign("open", GRANT)
    for mode in ({}, {"snapshot": {}}, {"not_before": 0.0}):
        with pytest.raises(EventRejected, match="ahead of this gateway's clock"):
            verifier().verify(ahead, **mode)


def test_live_grants_loaded_again_take_only_opens_newer_than_what_was_seen() -> None:
    """A signed open copied back into the live grants after its close (by someone who can
    write to Redis) is one this gateway saw: known already, not applied again."""
    first = signer(at=NOW - 300)
    opened, closed = first.sign("open", GRANT), first.sign("close", GRANT)
    receiver = verifier()
    receiver.verify(opened, not_before=0.0)
    receiver.verify(closed, not_before=0.0)
    floor = dict(receiver.seen)
    with pytest.raises(EventSeen):
        receiver.verify(opened, snapshot=floor)
    with pytest.raises(EventRejected, match="is not an open"):
        verifier().verify(closed, snapshot={})
    later = signer(at=NOW - 10).sign("open", GRANT)
    assert receiver.verify(later, snapshot=floor).seq == int((NOW - 10) * 1e9)
    with pytest.raises(EventRejected, match="not a set of fields"):
        verifier().verify([1], snapshot={})  # type: ignore[arg-type]


def test_events_travel_on_a_redis_stream_and_a_forged_entry_is_ignored(redis_server) -> None:
    """The transport the fleet will use: XADD by one gateway (and by someone without the
    key), XREAD by another, which applies only what verifies."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    gw1 = EventSigner(FLEET_KEY, "gw1")
    client.xadd("kf:grants", gw1.sign("open", GRANT))
    client.xadd("kf:grants", {**gw1.sign("close", GRANT), "ev": '{"action": "open"}'})
    client.xadd("kf:grants", EventSigner(b"\x02" * 32, "gw9").sign("open", GRANT))
    receiver = EventVerifier(FLEET_KEY)
    applied, refused = [], []
    for _, entries in client.xread({"kf:grants": "0"}):
        for _, raw in entries:
            try:
                applied.append(receiver.verify(raw))
            except EventRejected as error:
                refused.append(str(error))
    assert [(e.gateway, e.action) for e in applied] == [("gw1", "open")]
    assert len(refused) == 2 and all("fails its MAC" in why for why in refused), refused


def test_a_joining_gateway_loads_the_live_grants_then_follows_missing_none_twice(
    redis_server,
) -> None:
    """The snapshot and the stream position come from one transaction: applying the one and
    then following the other gives every live grant exactly once."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    bus, gw1 = GrantBus(client), EventSigner(FLEET_KEY, "gw1")

    def grant(port: int) -> Grant:
        return Grant(GRANT.source, "tcp", port, GRANT.destination, int(time.time()) + 300, "alice")

    def change(action: str, port: int) -> None:
        bus.publish(gw1.sign(action, grant(port)), action, grant(port))

    change("open", 22)
    change("open", 443)
    change("close", 22)
    # Someone who can write to Redis, without the fleet key, adds a live "grant".
    forged = EventSigner(b"\x03" * 32, "gw9").sign("open", grant(22))
    client.hset(LIVE, "198.51.100.66 22/tcp", f"{grant(22).expires}\nalice\n{json.dumps(forged)}")
    receiver, live, refused, applied = EventVerifier(FLEET_KEY), {}, [], []

    def apply(raw, snapshot: dict | None = None) -> None:
        try:
            event = receiver.verify(raw, snapshot=snapshot)
        except EventRejected as error:
            refused.append(str(error))
            return
        applied.append((event.gateway, event.seq))
        key = grant_field(event.grant)
        if event.action == "open":
            live[key] = event.grant
        else:
            live.pop(key, None)

    snapshot, position, _, _ = bus.join()
    floor = dict(receiver.seen)
    for raw in snapshot:
        apply(raw, snapshot=floor)
    assert sorted(live) == ["192.0.2.2 -> 192.0.2.1 443/tcp"]
    assert len(refused) == 1 and "fails its MAC" in refused[0]
    change("open", 8443)
    change("close", 443)
    entries = bus.follow(position, block_ms=100)
    assert len(entries) == 2, "only what came after the snapshot"
    for _, raw in entries:
        apply(raw)
    assert sorted(live) == ["192.0.2.2 -> 192.0.2.1 8443/tcp"]
    assert bus.follow(entries[-1][0], block_ms=50) == []
    assert len(applied) == len(set(applied)) == 3, "the 443 open once, then two changes"


@pytest.mark.parametrize("key", [b"", b"\x00" * 31])
def test_a_fleet_key_shorter_than_32_bytes_is_refused(key: bytes) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        EventSigner(key, "gw1")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        EventVerifier(key)
