"""The real `knock` sends the right packets: captured on lo inside a fresh namespace.

A DROP rule on the knock range makes the SYNs go unanswered, as on a real doorman, so
a socket the client left open would retransmit its SYN after 1 s.
"""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path

import pytest
from netns import Sniffer, iptables_commands, run_in

from knock_client.protocol import (
    DEFAULT_SPA_PORT,
    MESSAGE_LENGTHS,
    Action,
    KnockLayout,
    Proto,
    open_message,
)

pytestmark = pytest.mark.netns

SYN, ACK = 0x02, 0x10
SYN_DELAY_MS = 40  # 34 SYNs take > 1.3 s: any socket kept open would retransmit meanwhile
RETRANSMIT_WINDOW_S = 2.5  # capture this long after the first SYN (the kernel retries at 1 s)
SETTLE_S = 0.3  # for udp/spa: lo delivers at once, this only absorbs scheduling noise
KNOCKS = {4: 34, 6: 46}  # 8-bit digits of a 34- or 46-byte message


@pytest.fixture
def doorman(netns: str) -> str:
    """The namespace, with knocks to 20000..40000 dropped (TCP and UDP, IPv4 and IPv6)."""
    for tool in iptables_commands():
        for proto in ("tcp", "udp"):
            rule = f"-A INPUT -i lo -p {proto} --dport 20000:40000 -j DROP".split()
            run_in(netns, [tool, *rule], check=True, capture_output=True)
    return netns


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("mode", ["syn", "udp", "spa"])
def test_knock_packets_on_the_wire(
    mode: str,
    host: str,
    doorman: str,
    knock_cmd: list[str],
    knock_env: dict[str, str],
    knock_key: tuple[Path, bytes],
    tmp_path: Path,
) -> None:
    key_path, key = knock_key
    family = ipaddress.ip_address(host).version
    message_len = MESSAGE_LENGTHS[family]
    argv = [
        *knock_cmd,
        "open",
        host,
        "22/tcp",
        "--user",
        "7",
        "--key-file",
        str(key_path),
        "--mode",
        mode,
    ]
    if mode == "syn":
        argv += ["--delay-ms", str(SYN_DELAY_MS)]

    with Sniffer(doorman, tmp_path / "capture.jsonl") as sniffer:
        started = time.monotonic()
        sent = run_in(doorman, argv, env=knock_env, capture_output=True, text=True, timeout=30)
        assert sent.returncode == 0, sent.stderr
        if mode == "syn":
            time.sleep(max(RETRANSMIT_WINDOW_S - (time.monotonic() - started), 1.2))
        else:
            time.sleep(SETTLE_S)
    packets = sniffer.packets()
    sent_at = time.time()

    assert packets, "nothing captured"
    assert {(p["family"], p["src"], p["dst"]) for p in packets} == {(family, host, host)}
    layout = KnockLayout()
    if mode == "spa":
        assert [(p["proto"], p["dport"]) for p in packets] == [("udp", DEFAULT_SPA_PORT)]
        message = bytes.fromhex(packets[0]["payload_hex"])
        assert len(message) == message_len
    else:
        if mode == "syn":
            assert all(p["proto"] == "tcp" for p in packets)
            flags = [p["tcp_flags"] for p in packets]
            assert all(f & SYN and not f & ACK for f in flags), f"not all pure SYNs: {flags}"
        else:
            assert all(p["proto"] == "udp" and p["payload_hex"] == "" for p in packets)
        # One source port for the whole knock, an unprivileged one (the daemon groups by it).
        (sport,) = {p["sport"] for p in packets}
        assert 1024 <= sport <= 65535
        ports = [p["dport"] for p in packets]
        repeated = sorted({port for port in ports if ports.count(port) > 1})
        assert not repeated, f"ports knocked more than once (retransmits?): {repeated}"
        segments = sorted((port - layout.base_port) // layout.segment_size for port in ports)
        assert segments == list(range(KNOCKS[family])), f"segments: {segments}"
        message = layout.message_from_ports(ports, message_len)

    knock = open_message(message, key)
    assert (knock.action, knock.proto, knock.port, knock.user_id) == (Action.OPEN, Proto.TCP, 22, 7)
    assert knock.claimed_ip == ipaddress.ip_address(host)
    assert knock.duration == 0
    assert abs(sent_at - knock.timestamp) < 10


@pytest.mark.parametrize("mode", ["syn", "udp"])
def test_each_knock_draws_its_own_source_port_unless_one_is_given(
    mode: str,
    doorman: str,
    knock_cmd: list[str],
    knock_env: dict[str, str],
    knock_key: tuple[Path, bytes],
    tmp_path: Path,
) -> None:
    key_path, _ = knock_key
    argv = [*knock_cmd, "open", "127.0.0.1", "22/tcp", "--user", "7", "--key-file", str(key_path)]
    argv += ["--mode", mode, "--json"]
    with Sniffer(doorman, tmp_path / "capture.jsonl") as sniffer:
        reported = []
        for extra in ([], [], ["--source-port", "40001"]):
            sent = run_in(doorman, [*argv, *extra], env=knock_env, capture_output=True, text=True)
            assert sent.returncode == 0, sent.stderr
            reported.append(json.loads(sent.stdout)["source_port"])
        time.sleep(SETTLE_S)
    by_port: dict[int, int] = {}
    for packet in sniffer.packets():
        by_port[packet["sport"]] = by_port.get(packet["sport"], 0) + 1
    # Three knocks, three ports (two random draws of 64,512 agree once in 64,512 runs).
    assert reported[2] == 40001 and len(set(reported)) == 3, reported
    assert by_port == dict.fromkeys(reported, KNOCKS[4]), by_port
