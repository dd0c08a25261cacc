"""The daemon's link to the fleet (knockd_fast/fleetlink.py), gateway by gateway, over a real
redis-server on loopback: each gateway a FleetLink on its own firewall worker (the dry-run
backend, so no namespace is needed here; tests/test_fleet_e2e.py runs whole daemons)."""

from __future__ import annotations

import ipaddress
import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer

from knock_client.protocol import Action
from knockd_fast.config import FleetSettings
from knockd_fast.firewall.base import Grant, GrantChange
from knockd_fast.firewall.dryrun import DryRunFirewall
from knockd_fast.firewall.worker import FirewallWorker
from knockd_fast.fleet import LIVE, STREAM, EventSigner, GrantBus, grant_field
from knockd_fast.fleetlink import FleetLink

FLEET_KEY = secrets.token_bytes(64)
SOURCE = ipaddress.ip_address("192.0.2.2")
WAIT = 5.0


class Gateway:
    """One gateway: a dry-run firewall, its worker, and its link to the fleet."""

    def __init__(
        self,
        url: str,
        name: str,
        entitled: Callable[[Grant], str | None],
        position: Path | None = None,
        firewall: DryRunFirewall | None = None,
    ) -> None:
        self.firewall = firewall or DryRunFirewall()
        self.worker = FirewallWorker(self.firewall)
        self.worker.track(self.firewall.grants())  # as the daemon does at start
        settings = FleetSettings(url=url, gateway=name, key=FLEET_KEY)
        self.link = FleetLink(settings, self.worker, entitled, position_file=position)
        self.worker.start()
        self.link.start()

    def stop(self) -> None:  # as the daemon stops
        self.link.stop_following()
        self.worker.stop()
        self.link.stop()

    def holds(self) -> dict[tuple[int, str], int]:
        return {(g.port, g.user): g.expires for g in self.firewall.grants()}


@pytest.fixture
def fleet(redis_server: RedisServer) -> Iterator[Callable[..., Gateway]]:
    gateways: list[Gateway] = []

    def gateway(
        name: str, entitled: Callable[[Grant], str | None] = lambda _: None, **options
    ) -> Gateway:
        gateways.append(Gateway(redis_server.url, name, entitled, **options))
        wait_for(lambda: gateways[-1].link.up, f"{name} joins")
        return gateways[-1]

    try:
        yield gateway
    finally:
        for each in gateways:
            each.stop()


def wait_for(condition: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.01)


def grant(port: int = 22, seconds: int = 300, user: str = "alice") -> Grant:
    return Grant(SOURCE, "tcp", port, None, int(time.time()) + seconds, user)


def test_an_open_close_and_extension_on_one_gateway_reach_the_others(fleet) -> None:
    gw1, gw2, gw3 = fleet("gw1"), fleet("gw2"), fleet("gw3")
    opened = grant(22, 300)
    gw1.worker.submit([GrantChange(Action.OPEN, opened)])
    for other in (gw2, gw3):
        wait_for(lambda o=other: o.holds() == {(22, "alice"): opened.expires}, "open spreads")
    longer = grant(22, 600)
    gw2.worker.submit([GrantChange(Action.OPEN, longer)])
    for other in (gw1, gw3):
        wait_for(lambda o=other: o.holds() == {(22, "alice"): longer.expires}, "extension")
    gw3.worker.submit([GrantChange(Action.CLOSE, longer)])
    for other in (gw1, gw2):
        wait_for(lambda o=other: o.holds() == {}, "close spreads")
    # Nothing went round twice: a change from the fleet is applied, never published again.
    time.sleep(0.3)
    published = sum(g.link.counters["published"] for g in (gw1, gw2, gw3))
    assert published == 3
    assert [g.link.counters["applied"] for g in (gw1, gw2, gw3)] == [2, 2, 2]


def test_a_gateway_that_joins_later_loads_the_live_grants_once(fleet) -> None:
    gw1 = fleet("gw1")
    gw1.worker.submit([GrantChange(Action.OPEN, grant(22)), GrantChange(Action.OPEN, grant(443))])
    gw1.worker.submit([GrantChange(Action.CLOSE, grant(22))])
    wait_for(lambda: gw1.link.counters["published"] == 3, "published")
    gw2 = fleet("gw2")
    wait_for(lambda: set(gw2.holds()) == {(443, "alice")}, "snapshot applied")
    assert gw2.link.counters["applied"] == 1


def test_a_replay_claimed_by_one_gateway_is_named_on_the_others(fleet) -> None:
    gw1, gw2 = fleet("gw1"), fleet("gw2")
    until = int(time.time()) + 60
    messages = [(7, secrets.token_bytes(16), until) for _ in range(3)]
    assert gw1.link.claim(messages[:2], time.time()) == [None, None]
    assert gw2.link.claim(messages, time.time()) == ["gw1", "gw1", None]
    assert gw1.link.claim(messages[:1], time.time()) == [None], "its own again: still its own"


def test_an_open_this_gateway_does_not_allow_is_not_applied(fleet) -> None:
    gw1 = fleet("gw1")
    gw2 = fleet("gw2", entitled=lambda g: None if g.port == 22 else "not here")
    gw1.worker.submit([GrantChange(Action.OPEN, grant(3306)), GrantChange(Action.OPEN, grant(22))])
    wait_for(lambda: set(gw2.holds()) == {(22, "alice")}, "the allowed one applied")
    assert gw2.link.counters["rejected"] == 1


def test_events_without_the_fleet_key_or_played_again_are_ignored(fleet, redis_server) -> None:
    import redis

    gw1 = fleet("gw1")
    client = redis.Redis.from_url(redis_server.url)
    forger = EventSigner(b"\x05" * 64, "gw9")
    client.xadd(STREAM, forger.sign("open", grant(22)))
    real = EventSigner(FLEET_KEY, "gw2").sign("open", grant(443))
    client.xadd(STREAM, real)
    client.xadd(STREAM, real)  # captured from the stream and written again
    wait_for(lambda: set(gw1.holds()) == {(443, "alice")}, "the genuine one applied")
    wait_for(lambda: gw1.link.counters["rejected"] == 2, "forged and replayed refused")
    assert gw1.link.counters["applied"] == 1


def test_the_live_grants_in_redis_follow_open_extend_close_and_expiry(redis_server) -> None:
    """Gateways publish concurrently: an open never shortens the live entry, a close removes
    only its user's grant, an expiry only a grant not extended since."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    bus, signer = GrantBus(client), EventSigner(FLEET_KEY, "gw1")

    def publish(action: str, g: Grant) -> None:
        bus.publish(signer.sign(action, g), action, g)

    def live_expiry() -> int | None:
        value = client.hget(LIVE, grant_field(grant()))
        return int(value.split(b"\n", 1)[0]) if value else None

    short, long = grant(22, 100), grant(22, 500)
    publish("open", long)
    publish("open", short)  # a late event of an earlier open
    assert live_expiry() == long.expires
    publish("expire", short)  # another gateway expired the old one
    assert live_expiry() == long.expires
    publish("close", grant(22, 500, user="bob"))
    assert live_expiry() == long.expires, "bob holds no grant there"
    publish("close", long)
    assert live_expiry() is None
    entries = client.xrange(STREAM)
    assert [json.loads(f[b"ev"])["action"] for _, f in entries] == [
        "open", "open", "expire", "close", "close"
    ]  # fmt: skip


def test_redis_lost_and_back_empty_converges(fleet, redis_server) -> None:
    gw1, gw2 = fleet("gw1"), fleet("gw2")
    gw1.worker.submit([GrantChange(Action.OPEN, grant(22))])
    wait_for(lambda: set(gw2.holds()) == {(22, "alice")}, "open spreads")
    redis_server.kill()
    wait_for(lambda: not gw1.link.up and not gw2.link.up, "both see redis gone")
    # Meanwhile gw1 goes on alone: its change waits, and so do its claims.
    gw1.worker.submit([GrantChange(Action.OPEN, grant(443))])
    message = (7, secrets.token_bytes(16), int(time.time()) + 60)
    assert gw1.link.claim([message], time.time()) is None
    assert gw1.link.stats().unsent_claims == 1
    redis_server.restart()  # empty: it kept nothing
    wait_for(lambda: gw1.link.up and gw2.link.up, "both back")
    wait_for(lambda: set(gw2.holds()) == {(22, "alice"), (443, "alice")}, "converged")
    assert gw2.link.claim([message], time.time()) == ["gw1"], "the late claim was made"
    # A gateway joining now loads what both republished.
    gw3 = fleet("gw3")
    wait_for(lambda: set(gw3.holds()) == {(22, "alice"), (443, "alice")}, "snapshot rebuilt")
    assert gw1.link.counters["outages"] == gw2.link.counters["outages"] == 1


def test_a_gateway_restarted_catches_up_on_the_closes_it_missed(fleet, tmp_path) -> None:
    """Its position in the stream is kept in its state directory: the close made while it
    was down is applied when it is back, not only what is still open loaded."""
    gw1 = fleet("gw1")
    gw2 = fleet("gw2", position=tmp_path / "fleet.position")
    gw1.worker.submit([GrantChange(Action.OPEN, grant(22)), GrantChange(Action.OPEN, grant(443))])
    wait_for(lambda: set(gw2.holds()) == {(22, "alice"), (443, "alice")}, "opens spread")
    gw2.stop()  # its firewall keeps the grants, as the kernel does
    gw1.worker.submit([GrantChange(Action.CLOSE, grant(22)), GrantChange(Action.OPEN, grant(8443))])
    wait_for(lambda: gw1.link.counters["published"] == 4, "published")
    again = fleet("gw2", position=tmp_path / "fleet.position", firewall=gw2.firewall)
    wait_for(lambda: set(again.holds()) == {(443, "alice"), (8443, "alice")}, "caught up")


def test_an_expiry_is_published_by_the_gateway_that_made_the_grant_only(
    fleet, redis_server
) -> None:
    import redis

    gw1, gw2 = fleet("gw1"), fleet("gw2")
    short = grant(22, 3)  # whole seconds: at least 2 s to spread before it expires
    gw1.worker.submit([GrantChange(Action.OPEN, short)])
    wait_for(lambda: set(gw2.holds()) == {(22, "alice")}, "open spreads")
    wait_for(lambda: not gw1.holds() and not gw2.holds(), "both expire it", timeout=6)
    client = redis.Redis.from_url(redis_server.url)
    wait_for(lambda: client.hlen(LIVE) == 0, "gone from the live grants")
    actions = [json.loads(f[b"ev"])["action"] for _, f in client.xrange(STREAM)]
    assert actions == ["open", "expire"], actions


def test_a_claim_given_back_is_free_for_the_next_gateway(fleet) -> None:
    gw1, gw2 = fleet("gw1"), fleet("gw2")
    message = (7, secrets.token_bytes(16), int(time.time()) + 60)
    assert gw1.link.claim([message], time.time()) == [None]
    gw2.link.release([message[:2]])  # not gw2's to give back
    assert gw2.link.claim([message], time.time()) == ["gw1"]
    gw1.link.release([message[:2]])  # gw1 refused it after all (a cap)
    assert gw2.link.claim([message], time.time()) == [None]


def test_garbage_among_the_live_grants_is_refused_and_the_gateway_joins(
    fleet, redis_server
) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    for index, value in enumerate(["1\nu\n[1]", "1\nu\nnull", "1\nu\n" + "[" * 100_000, "x"]):
        client.hset(LIVE, f"junk{index}", value)
    gw1 = fleet("gw1")
    assert gw1.link.up and gw1.link.counters["rejected"] == 4


def test_a_signed_open_put_back_after_its_close_reopens_nothing(
    fleet, redis_server, tmp_path
) -> None:
    """Someone who can write to Redis copies a genuine open (from the stream) and plays it
    again after its close: onto the stream while a gateway is away, and into the live
    grants of a Redis made to look restarted. The gateway knows the event's number."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    gw1 = fleet("gw1")
    gw2 = fleet("gw2", position=tmp_path / "fleet.position")
    gw1.worker.submit([GrantChange(Action.OPEN, grant(22))])
    wait_for(lambda: set(gw2.holds()) == {(22, "alice")}, "open spreads")
    gw1.worker.submit([GrantChange(Action.CLOSE, grant(22))])
    wait_for(lambda: not gw2.holds(), "close spreads")
    (_, opened), _ = client.xrange(STREAM)
    gw2.stop()
    client.xadd(STREAM, opened)  # the copy, on the stream
    again = fleet("gw2", position=tmp_path / "fleet.position", firewall=gw2.firewall)
    wait_for(lambda: again.link.counters["rejected"] == 1, "the copy refused on catching up")
    assert not again.holds()
    again.stop()
    client.delete(STREAM)  # now a Redis that looks restarted, with the copy as a live grant
    client.set("kf:epoch", "someone-else")
    fields = {k.decode(): v.decode() for k, v in opened.items()}
    client.hset(LIVE, grant_field(grant(22)), f"{grant(22).expires}\nalice\n{json.dumps(fields)}")
    third = fleet("gw2", position=tmp_path / "fleet.position", firewall=gw2.firewall)
    time.sleep(0.5)
    assert not third.holds() and third.link.counters["applied"] == 0


# --- TLS ---------------------------------------------------------------------------------


def _certificate(subject: str, key, issuer=None, issuer_key=None, ca: bool = False):
    """A certificate for ``subject`` (an IP address for a server), signed by ``issuer``
    (self-signed when None)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = [x509.IPAddress(ipaddress.ip_address(subject))] if subject[0].isdigit() else []
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write_pki(folder, name: str, server: str = "127.0.0.1"):
    """A CA, a server certificate for ``server`` and a client certificate, as PEM files."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def pem(path, data: bytes):
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def key_pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(f"{name} CA", ca_key, ca=True)
    files = {"ca": pem(folder / f"{name}-ca.pem", ca.public_bytes(serialization.Encoding.PEM))}
    for role, subject in (("server", server), ("client", "gateway")):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(subject, key, ca, ca_key)
        files[role] = pem(
            folder / f"{name}-{role}.pem", cert.public_bytes(serialization.Encoding.PEM)
        )
        files[f"{role}_key"] = pem(folder / f"{name}-{role}.key", key_pem(key))
    return files


def test_tls_with_the_fleets_ca_and_a_client_certificate_and_nothing_less(tmp_path) -> None:
    from redis_server import REDIS_SERVER

    from knockd_fast.fleet import Claim, FleetUnavailable, ReplayClaims, redis_client

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    pki, other = _write_pki(tmp_path, "fleet"), _write_pki(tmp_path, "other")
    tls = {"cert": pki["server"], "key": pki["server_key"], "ca": pki["ca"]}
    server = RedisServer.start(tmp_path / "redis", tls=tls)
    try:
        assert server.url.startswith("rediss://")

        def claim(**files) -> list:
            client = redis_client(server.url, **{k: str(v) for k, v in files.items()})
            return ReplayClaims(client, "gw1").claim([Claim(7, secrets.token_bytes(16), 30)])

        assert claim(ca_file=pki["ca"], cert_file=pki["client"], key_file=pki["client_key"]) == [
            None
        ]
        with pytest.raises(FleetUnavailable, match="certificate verify failed"):
            claim(ca_file=other["ca"], cert_file=pki["client"], key_file=pki["client_key"])
        with pytest.raises(FleetUnavailable):  # the server asks for a certificate of its CA
            claim(ca_file=pki["ca"], cert_file=other["client"], key_file=other["client_key"])
        with pytest.raises(FleetUnavailable):
            claim(ca_file=pki["ca"])
    finally:
        server.kill()


def test_the_admin_guides_redis_acl_is_the_one_the_tests_run_with() -> None:
    """docs/admin.md gives admins an ACL user; the end-to-end tests run every gateway as
    exactly that user, so the guide's list is known to be enough."""
    from redis_server import FLEET_ACL

    guide = (Path(__file__).resolve().parent.parent / "docs" / "admin.md").read_text()
    (line,) = [x for x in guide.splitlines() if x.startswith("user knockd on >THE-PASSWORD ")]
    assert line.removeprefix("user knockd on >THE-PASSWORD ").split() == FLEET_ACL.split()
