"""A site with a fleet of gateways, in namespaces: for tests/test_fleet_e2e.py and
bench/fleet_propagation.py. A helper module, not a test file.

::

                         router  (Redis on 198.18.0.1, its loopback)
    client 192.0.2.2 --- 192.0.2.1
                         198.51.100.1/30 --- gw1 198.51.100.2   } each gateway holds the
                         198.51.100.5/30 --- gw2 198.51.100.6   } service address 203.0.113.1
                         198.51.100.9/30 --- gw3 198.51.100.10  } (anycast) on its loopback

The router sends the service address to one gateway at a time (``Site.route_to``), as a
balancer that hashes on the source address, or anycast after a failover, would: a client's
next connection may land on any of them. Each gateway runs the real daemon (iptables
backend, DROP rules for the service ports in iptables-legacy, echo listeners on them) with
``[fleet]`` pointing at Debian's redis-server, which the site starts in the router with an
ACL user and a password (as docs/admin.md's fleet section asks) and ends by its PID.
Everything is torn down on the way out, also on failure.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netns
from e2e import (
    Harness,
    User,
    _spawn_listener,
    _teardown,
    close_ports,
    ns_run,
    render_config,
    tool,
    write_key,
)
from netns import End
from redis_server import RedisServer

from knockd_fast.firewall.registry import KINDS

SERVICE = "203.0.113.1"  # every gateway's (anycast) service address
CLIENT, ROUTER = "192.0.2.2", "192.0.2.1"
REDIS_HOST = "198.18.0.1"
REDIS_USER = "knockd"
PORTS = (2222, 2223)
SPA_PORT = 62201


def router_address(index: int) -> str:
    return f"198.51.100.{4 * index + 1}"


def gateway_address(index: int) -> str:
    return f"198.51.100.{4 * index + 2}"


@dataclass
class Site:
    router: str
    client: str
    gateways: list[Harness]  # gw1, gw2, ... (``Harness.server`` is the gateway's namespace)
    redis: RedisServer
    directory: Path
    routed_to: int | None = None

    def route_to(self, index: int) -> None:
        """Send the service address to gateway ``index`` (0-based) from now on."""
        if self.routed_to != index:
            netns.ip("-n", self.router, "route", "replace", f"{SERVICE}/32", "via",
                     gateway_address(index))  # fmt: skip
            self.routed_to = index

    def knock(self, index: int, action: str, port: int, mode: str = "spa") -> dict[str, Any]:
        """``knock ACTION`` from the client, through gateway ``index``; the client's JSON
        (``message`` holds what was sent)."""
        self.route_to(index)
        return self.gateways[index].knock(action, SERVICE, f"{port}/tcp", "--mode", mode)

    def send_again(self, index: int, message_hex: str) -> None:
        """The same single-packet message again, through gateway ``index``: a replay."""
        self.route_to(index)
        self.gateways[index].cursor = self.gateways[index].mark()
        done = tool(self.client, "udp", SERVICE, SPA_PORT, message_hex)
        assert done.returncode == 0, done.stderr

    def connects(self, index: int, port: int) -> bool:
        """A real TCP connect from the client to the service, through gateway ``index``."""
        self.route_to(index)
        return self.gateways[index].can_connect(SERVICE, port)

    def python_in_router(self, code: str, *args: str) -> str:
        """Python ``code`` run in the router (redis-py reaches Redis from there)."""
        import sys

        done = ns_run(self.router, [sys.executable, "-c", code, *args])
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


def json_lines(harness: Harness, since: int = 0) -> list[dict[str, Any]]:
    """A gateway's log lines from ``since``, as JSON objects (``run --json``)."""
    with harness._changed:
        lines = harness.lines[since:]
    found = []
    for line in lines:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                found.append(entry)
    return found


def wait_json(
    harness: Harness, predicate: Callable[[dict[str, Any]], bool], since: int, timeout: float = 5.0
) -> dict[str, Any]:
    """The first JSON log line from ``since`` for which ``predicate`` holds."""

    def find(line: str) -> dict[str, Any] | None:
        try:
            entry = json.loads(line)
        except ValueError:
            return None
        return entry if isinstance(entry, dict) and predicate(entry) else None

    return harness._wait(find, timeout, since, "matching JSON log line")


def line_time(entry: dict[str, Any]) -> float:
    """A log line's ``time`` (``2026-12-08T10:46:26.123Z``) as Unix seconds."""
    when = datetime.datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
    return when.replace(tzinfo=datetime.UTC).timestamp()


@contextlib.contextmanager
def fleet_site(
    directory: Path,
    gateways: int = 3,
    on_unavailable: Sequence[str] = (),
    start: bool = True,
    backends: Sequence[str] = (),
) -> Iterator[Site]:
    """The site above with ``gateways`` gateways, their daemons started (``start``);
    ``on_unavailable`` gives each gateway's ``fleet.on_unavailable`` (default "local"),
    ``backends`` its ``grants.backend`` (default "iptables"; "nftables" protects the ports
    in its own chain, the others get DROP rules in iptables-legacy, as e2e.doorman does)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alice = User(7, "alice", [f"{port}/tcp" for port in PORTS])
    alice.key_file = directory / "alice.key"
    alice.key = write_key(alice.key_file)
    write_key(directory / "fleet.key")
    password = secrets.token_hex(16)
    password_file = directory / "redis.pass"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    with contextlib.ExitStack() as stack:
        router = stack.enter_context(netns.network_namespace("kfr"))
        client = stack.enter_context(netns.network_namespace("kfk"))
        tag = router.split("-", 1)[1].replace("-", "")[-8:]
        netns.veth_link(End(router, f"kfrc{tag}", (f"{ROUTER}/24",)),
                        End(client, f"kfkc{tag}", (f"{CLIENT}/24",)))  # fmt: skip
        netns.ip("-n", client, "route", "add", "default", "via", ROUTER)
        netns.ip("-n", router, "addr", "add", f"{REDIS_HOST}/32", "dev", "lo")
        ns_run(router, ["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        redis = RedisServer.start(
            directory / "redis", REDIS_HOST, netns=router, user=REDIS_USER, password=password
        )
        stack.callback(redis.kill)
        harnesses = []
        for index in range(gateways):
            name = f"gw{index + 1}"
            gateway = stack.enter_context(netns.network_namespace("kfg"))
            own_if, router_if = f"kfg{index}{tag}", f"kfr{index}{tag}"
            netns.veth_link(End(router, router_if, (f"{router_address(index)}/30",)),
                            End(gateway, own_if, (f"{gateway_address(index)}/30",)))  # fmt: skip
            netns.ip("-n", gateway, "addr", "add", f"{SERVICE}/32", "dev", "lo")
            netns.ip("-n", gateway, "route", "add", "default", "via", router_address(index))
            home = directory / name
            (home / "home").mkdir(parents=True, exist_ok=True)
            harness = Harness(gateway, client, own_if, home, home / "config.toml", [alice], PORTS)
            harness.capture = (own_if,)
            backend = backends[index] if index < len(backends) else "iptables"
            grants: dict[str, Any] = {"backend": backend}
            if backend == "nftables":
                grants["protect"] = [f"{port}/tcp" for port in PORTS]
            fleet = {
                "url": f"redis://{REDIS_HOST}:{redis.port}/0",
                "gateway": name,
                "key_file": directory / "fleet.key",
                "username": REDIS_USER,
                "password_file": password_file,
                "on_unavailable": on_unavailable[index] if index < len(on_unavailable) else "local",
            }
            harness.config_path.write_text(
                render_config(
                    own_if,
                    home / "state",
                    [alice],
                    modes=("syn", "spa"),
                    extra={
                        "capture": {"destinations": [SERVICE]},
                        "grants": grants,
                        "limits": {"max_knocks_per_minute": 10_000},
                        "fleet": fleet,
                    },
                )
            )
            stack.callback(_teardown, harness)
            harness._helpers.append(_spawn_listener(gateway, PORTS))
            harnesses.append(harness)
        site = Site(router, client, harnesses, redis, directory)
        if start:
            chosen = [*backends, *["iptables"] * (gateways - len(backends))]
            for harness, backend in zip(harnesses, chosen, strict=True):
                harness.start()
                if KINDS[backend] == "legacy xtables":
                    close_ports(harness)
            for harness in harnesses:
                harness.wait_log(r"^fleet: redis at .* joined as gateway", since=0)
        yield site


def applied_from(origin: str, change: str, port: int):
    """A firewall line for a change another gateway made."""
    return lambda entry: (
        entry.get("event") == "firewall"
        and entry.get("origin") == origin
        and entry.get("change") == change
        and entry.get("port") == port
    )


def decision(site: Site, index: int, since: int) -> dict:
    gateway = site.gateways[index]
    return gateway.wait_decision(lambda d: True, since=since)


def propagation(site: Site, knocks: int) -> list[float]:
    """``knocks`` messages through gateway 1, opens and closes in turn: for each, seconds
    from its capture on gateway 1 (the decision's time) to the change being in place on the
    last of the others (the time of its firewall line there). Fails if one never arrives."""
    others = site.gateways[1:]
    delays = []
    for number in range(knocks):
        action, change = ("open", "opened") if number % 2 == 0 else ("close", "closed")
        marks = [g.mark() for g in site.gateways]
        site.knock(0, action, 2222)
        accepted = decision(site, 0, marks[0])
        assert accepted["verdict"] == "accepted", accepted
        arrived = [
            wait_json(gateway, applied_from("gw1", change, 2222), mark)
            for gateway, mark in zip(others, marks[1:], strict=True)
        ]
        delays.append(max(map(line_time, arrived)) - line_time(accepted))
    return delays
