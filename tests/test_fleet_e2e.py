"""A fleet of three gateways, end to end: real daemons in namespaces behind a router, the
real client, iptables, and Debian's redis-server (tests/fleet_site.py draws the site).

A knock through one gateway opens the port on all three (proved with real connections
through each); the same message through the others is a replay; Redis killed, knocks go on
where the configuration says so and the gateways converge when it is back; an event forged
into the stream opens nothing; a gateway killed and restarted loses and doubles nothing.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_site import (
    SERVICE,
    Site,
    applied_from,
    decision,
    fleet_site,
    json_lines,
    propagation,
    wait_json,
)
from netns import NetnsUnavailable
from redis_server import REDIS_SERVER

pytestmark = pytest.mark.extension  # live capture


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from _site(tmp_path)


def _site(directory: Path, **options) -> Iterator[Site]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    try:
        with fleet_site(directory, **options) as built:
            yield built
    except NetnsUnavailable as error:
        pytest.skip(f"network namespaces unavailable: {error}")


def test_a_knock_through_one_gateway_opens_everywhere_and_is_a_replay_elsewhere(
    tmp_path,
) -> None:
    """Each gateway with its own backend: iptables, nftables, ipset."""
    for site in _site(tmp_path, backends=("iptables", "nftables", "ipset")):
        _opens_everywhere_and_is_a_replay_elsewhere(site)


def _opens_everywhere_and_is_a_replay_elsewhere(site: Site) -> None:
    gw1, gw2, gw3 = site.gateways
    assert not any(site.connects(i, 2222) for i in range(3)), "closed to begin with"
    marks = [g.mark() for g in site.gateways]
    sent = site.knock(0, "open", 2222)
    assert decision(site, 0, marks[0])["verdict"] == "accepted"
    for gateway, mark in ((gw2, marks[1]), (gw3, marks[2])):
        wait_json(gateway, applied_from("gw1", "opened", 2222), mark)
    assert all(site.connects(i, 2222) for i in range(3)), "the next connection may land anywhere"
    # The same message through the other gateways: a replay, naming who accepted it.
    for index in (1, 2):
        mark = site.gateways[index].mark()
        site.send_again(index, sent["message"])
        refused = decision(site, index, mark)
        assert (refused["verdict"], refused["reason"]) == ("rejected", "replay"), refused
        assert "accepted first by gateway gw1" in refused["detail"], refused
    mark = gw1.mark()
    site.send_again(0, sent["message"])
    assert decision(site, 0, mark)["reason"] == "replay"  # its own cache, as ever
    # Knock mode, every packet through one gateway (an HA pair, or hashing on the source
    # address): as good as single-packet mode.
    marks = [g.mark() for g in site.gateways]
    site.knock(1, "open", 2223, mode="syn")
    assert decision(site, 1, marks[1])["verdict"] == "accepted"
    for gateway, mark in ((gw1, marks[0]), (gw3, marks[2])):
        wait_json(gateway, applied_from("gw2", "opened", 2223), mark)
    assert site.connects(2, 2223)
    # A close through the third closes everywhere.
    marks = [g.mark() for g in site.gateways]
    site.knock(2, "close", 2222)
    for gateway, mark in ((gw1, marks[0]), (gw2, marks[1])):
        wait_json(gateway, applied_from("gw3", "closed", 2222), mark)
    assert not any(site.connects(i, 2222) for i in range(3))
    assert site.connects(0, 2223), "the other grant stays"


def test_a_hundred_knocks_all_reach_every_gateway(site, tmp_path) -> None:
    """Each change reaches the other two; the delays are printed and kept (a measurement:
    bench/fleet_propagation.py reports them, no test fails on time)."""
    delays = propagation(site, 100)
    assert len(delays) == 100 and min(delays) >= 0
    ordered = sorted(delays)
    report = {
        "knocks": len(delays),
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "max_ms": round(1000 * ordered[-1], 1),
    }
    (tmp_path / "propagation.json").write_text(json.dumps(report))
    print(f"propagation to the last of 2 other gateways: {report}")


def test_redis_lost_knocks_go_on_as_configured_and_the_fleet_converges(tmp_path) -> None:
    for site in _site(tmp_path, on_unavailable=("local", "local", "refuse")):
        gw1, gw2, gw3 = site.gateways
        mark = gw2.mark()
        before = site.knock(1, "close", 2222)  # accepted (nothing to close) and claimed
        assert decision(site, 1, mark)["verdict"] == "accepted"
        marks = [g.mark() for g in site.gateways]
        site.redis.kill()
        for gateway, mark in zip(site.gateways, marks, strict=True):
            gateway.wait_log(r"^fleet: redis at .* unavailable", since=mark)
        mark = gw1.mark()
        sent = site.knock(0, "open", 2222)  # "local": gw1 goes on alone
        assert decision(site, 0, mark)["verdict"] == "accepted"
        assert site.connects(0, 2222) and not site.connects(1, 2222)
        mark = gw3.mark()
        site.knock(2, "open", 2223)  # "refuse": gw3 opens nothing while the fleet is away
        refused = decision(site, 2, mark)
        assert (refused["verdict"], refused["reason"]) == ("rejected", "fleet_unavailable")
        assert not site.connects(2, 2223)
        status = gw1.knockd("status", "-c", str(gw1.config_path))
        assert "fleet as gateway gw1: redis UNREACHABLE" in status.stdout, status.stdout
        marks = [g.mark() for g in site.gateways]
        site.redis.restart()  # empty: a Redis restarted without its data
        for gateway, mark in zip(site.gateways, marks, strict=True):
            gateway.wait_log(r"^fleet: redis at .* back after", since=mark, timeout=10)
        for gateway, mark in ((gw2, marks[1]), (gw3, marks[2])):
            wait_json(gateway, applied_from("gw1", "opened", 2222), mark)
        assert site.connects(1, 2222) and site.connects(2, 2222), "converged"
        time.sleep(2.5)  # metrics.prom, which status reads, is rewritten every 2 s
        status = json.loads(gw1.knockd("status", "-c", str(gw1.config_path), "--json").stdout)
        fleet = status["counters"]["fleet"]
        assert (fleet["gateway"], fleet["up"], fleet["outages"]) == ("gw1", True, 1), fleet
        assert fleet["claims"]["unsent"] == 1 and fleet["events"]["published"] >= 1, fleet
        # The claim gw1 could not make while Redis was away was made when it came back.
        mark = gw2.mark()
        site.send_again(1, sent["message"])
        refused = decision(site, 1, mark)
        assert refused["reason"] == "replay" and "gateway gw1" in refused["detail"], refused
        # Redis lost every claim; gw2 claimed again what its replay cache remembers.
        mark = gw3.mark()
        site.send_again(2, before["message"])
        refused = decision(site, 2, mark)
        assert refused["reason"] == "replay" and "gateway gw2" in refused["detail"], refused
        mark = gw3.mark()
        site.knock(2, "open", 2223)
        assert decision(site, 2, mark)["verdict"] == "accepted", "back: gw3 accepts again"


def test_an_event_forged_into_redis_opens_nothing_and_is_logged(site) -> None:
    """Someone who can write to Redis, without the fleet key: into the stream and into the
    live grants a gateway loads when it starts."""
    gw1, gw2, _ = site.gateways
    forge = (
        "import json, secrets, sys, time\n"
        "import redis\n"
        "from knockd_fast.firewall.base import Grant\n"
        "from knockd_fast.fleet import EventSigner\n"
        "client = redis.Redis(host=sys.argv[1], port=int(sys.argv[2]), username=sys.argv[3],\n"
        "                     password=sys.argv[4])\n"
        "grant = Grant('192.0.2.2', 'tcp', 2222, sys.argv[5], int(time.time()) + 600, 'alice')\n"
        "fields = EventSigner(secrets.token_bytes(64), 'gw2').sign('open', grant)\n"
        "client.xadd('kf:grants', fields)\n"
        "client.hset('kf:live', '192.0.2.2 -> ' + sys.argv[5] + ' 2222/tcp',\n"
        "            f'{grant.expires}\\nalice\\n' + json.dumps(fields))\n"
    )
    marks = [g.mark() for g in site.gateways]
    site.python_in_router(
        forge, "198.18.0.1", str(site.redis.port), "knockd", site.redis.password, SERVICE
    )
    for gateway, mark in zip(site.gateways, marks, strict=True):
        gateway.wait_log(r"^fleet: ignored an event on the stream: .* fails its MAC", since=mark)
    gw2.kill9()
    (gw2.directory / "state" / "fleet.position").unlink()  # as a gateway new to the fleet
    mark = gw2.mark()
    gw2.start()  # it loads the live grants
    gw2.wait_log(r"^fleet: ignored a live grant in redis: .* fails its MAC", since=mark)
    assert not any(site.connects(i, 2222) for i in range(3))
    assert not [e for e in json_lines(gw1) if e.get("event") == "firewall" and e.get("origin")]


def test_a_gateway_killed_and_restarted_rejoins_losing_and_doubling_nothing(site) -> None:
    """It reads its grants back from its firewall and catches up on the stream from where
    it was (kept in its state directory): a close made while it was down is applied."""
    gw1, gw2, gw3 = site.gateways
    marks = [g.mark() for g in site.gateways]
    site.knock(1, "open", 2223)  # gw2's own grant, spread to the others
    site.knock(0, "open", 2222)  # gw1's, spread to gw2
    wait_json(gw1, applied_from("gw2", "opened", 2223), marks[0])
    wait_json(gw2, applied_from("gw1", "opened", 2222), marks[1])
    gw2.kill9()
    marks = [g.mark() for g in site.gateways]
    site.knock(0, "close", 2222)  # while gw2 is down
    wait_json(gw3, applied_from("gw1", "closed", 2222), marks[2])
    gw2.start()
    joined = r"^fleet: redis at .* joined as gateway gw2: caught up on \d+ changes, 1 to apply"
    gw2.wait_log(joined, since=marks[1])
    wait_json(gw2, applied_from("gw1", "closed", 2222), marks[1])
    assert not site.connects(1, 2222) and site.connects(1, 2223)
    marks = [g.mark() for g in site.gateways]
    site.knock(2, "open", 2222)  # and it follows the stream again
    wait_json(gw2, applied_from("gw3", "opened", 2222), marks[1])
    assert site.connects(1, 2222)
    rules = gw2.grant_rules()
    for port in (2222, 2223):
        assert len([r for r in rules if f"--dport {port} " in r]) == 1, rules
