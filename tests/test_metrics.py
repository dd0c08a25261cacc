"""Prometheus metrics: a running daemon scraped after a known workload, the files it writes,
and ``status`` reading its counters back. The mapping of every counter is checked offline.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e import SERVER_V4, knockd_command, ns_run
from netns import free_port
from prometheus_client.parser import text_string_to_metric_families

from knock_client.protocol import Action, Knock, KnockLayout, Proto, seal
from knockd_fast import __version__
from knockd_fast.capture_spec import COUNTER_NAMES, PCAP_COUNTER_NAMES
from knockd_fast.config import MetricsSettings
from knockd_fast.firewall.worker import GRANT_CHANGES
from knockd_fast.metrics import (
    ENGINE_COUNTERS,
    STATE_FILE,
    DoormanCollector,
    MetricsPublisher,
    read_published,
)
from knockd_fast.stats import CaptureStats, DoormanStats, FleetStats, LatencyHistogram

PORT = 2222
SPA_PORT = KnockLayout().spa_port

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    """``{(sample name, labels): value}`` of a Prometheus text exposition."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape(h, port: int) -> Samples:
    """GET /metrics from inside the server namespace, as a local Prometheus would."""
    code = (
        "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
        f"'http://127.0.0.1:{port}/metrics', timeout=5).read().decode())"
    )
    done = ns_run(h.server, [sys.executable, "-c", code])
    assert done.returncode == 0, done.stderr
    return parse(done.stdout)


def scrape_until(h, port: int, ready, timeout: float = 10.0) -> Samples:
    """Scrapes until ``ready(samples)``: the loop publishes a snapshot every 0.25 s."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(h, port)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def forged(claimed: str) -> bytes:
    """alice's user id, sealed with a key that is not hers: authentic to no one."""
    knock = Knock(
        Action.OPEN, Proto.TCP, PORT, int(time.time()), ipaddress.ip_address(claimed), 7,
        secrets.randbits(24),
    )  # fmt: skip
    return seal(knock, secrets.token_bytes(64))


@pytest.mark.netns
@pytest.mark.extension
def test_a_scrape_of_a_running_daemon_counts_a_known_workload(e2e, tmp_path):
    port = free_port()
    textfile = tmp_path / "textfile" / "knockd_fast.prom"
    textfile.parent.mkdir()
    h = e2e(
        extra={"metrics": {"listen": f"127.0.0.1:{port}", "textfile": str(textfile)}}
    )
    h.wait_log(rf"^metrics: http://127\.0\.0\.1:{port}/metrics$", since=0)
    samples = scrape(h, port)
    build = [dict(labels) for (name, labels) in samples if name == "knockd_fast_build_info"]
    assert [labels["version"] for labels in build] == [__version__]
    assert value(samples, "knockd_fast_capture_up", interface=h.interface) == 1

    # The workload: an open, the same port again (an extension), a replay of the first
    # message, three messages under alice's id sealed with another key, two datagrams whose
    # header is version 0 (refused before judging), a close.
    first = h.knock("open", SERVER_V4, f"{PORT}/tcp", "--mode", "spa")
    h.wait_log(rf"^firewall: opened {PORT}/tcp ")
    h.knock("open", SERVER_V4, f"{PORT}/tcp", "--mode", "spa")
    h.wait_log(rf"^firewall: opened {PORT}/tcp ")
    mid = scrape_until(h, port, lambda s: value(s, "knockd_fast_grants", backend="iptables") == 1)
    assert value(mid, "knockd_fast_grants", backend="iptables") == 1
    h.send_udp(SERVER_V4, SPA_PORT, bytes.fromhex(first["message"]))
    for _ in range(3):
        h.send_udp(SERVER_V4, SPA_PORT, forged("192.0.2.2"))
    for _ in range(2):
        h.send_udp(SERVER_V4, SPA_PORT, bytes(34))
    h.knock("close", SERVER_V4, f"{PORT}/tcp", "--mode", "spa")
    h.wait_log(rf"^firewall: closed {PORT}/tcp ")

    def judged(s: Samples) -> float:
        return value(s, "knockd_fast_judging_latency_seconds_count")

    samples = scrape_until(
        h, port, lambda s: judged(s) == 7 and value(
            s, "knockd_fast_grant_changes_total", backend="iptables", change="closed") == 1,
    )  # fmt: skip
    decisions = {
        (dict(labels)["verdict"], dict(labels)["reason"]): count
        for (name, labels), count in samples.items()
        if name == "knockd_fast_decisions_total"
    }
    assert decisions == {
        ("accepted", "ok"): 3,
        ("rejected", "replay"): 1,
        ("rejected", "authentication"): 3,
    }
    assert judged(samples) == 7
    assert 0 < value(samples, "knockd_fast_judging_latency_seconds_sum") < 7 * 5
    assert value(samples, "knockd_fast_judging_latency_seconds_bucket", le="+Inf") == 7
    changes = {
        change: value(samples, "knockd_fast_grant_changes_total", backend="iptables", change=change)
        for change in GRANT_CHANGES
    }
    assert changes == {"opened": 1, "extended": 1, "kept": 0, "closed": 1, "expired": 0}
    assert value(samples, "knockd_fast_grants", backend="iptables") == 0
    assert value(samples, "knockd_fast_firewall_failures_total", backend="iptables") == 0
    interface = h.interface
    assert value(samples, "knockd_fast_completions_total", interface=interface) == 7
    assert value(samples, "knockd_fast_capture_refused_messages_total", interface=interface,
                 why="version") == 2  # fmt: skip
    assert value(samples, "knockd_fast_capture_packets_total", interface=interface) == 9
    for by in ("kernel", "interface"):
        assert value(samples, "knockd_fast_capture_dropped_packets_total", interface=interface,
                     by=by) == 0  # fmt: skip
    assert value(samples, "knockd_fast_replay_cache_messages") == 3
    assert value(samples, "knockd_fast_replay_cache_degraded") == 0
    assert value(samples, "knockd_fast_backlog_completions") == 0
    assert time.time() - value(samples, "knockd_fast_last_snapshot_timestamp_seconds") < 5

    # The endpoint listens on loopback only: from the client the port is closed.
    assert not h.can_connect(SERVER_V4, port)

    # `status` reads the counters back from the state directory's file, rewritten every 2 s.
    state_file = h.directory / "state" / STATE_FILE
    deadline = time.monotonic() + 10
    while read_published(state_file).grant_changes["closed"] != 1:
        assert time.monotonic() < deadline, "the state file was not rewritten"
        time.sleep(0.2)
    status = h.knockd("status", "-c", str(h.config_path))
    assert status.returncode == 0, status
    text = status.stdout
    assert f"  {interface}: captured, 9 packets read, 0 dropped by the kernel, 0 by the " \
        "interface, 7 messages" in text, text  # fmt: skip
    assert "judged 7: accepted 3, rejected 4 (authentication 3, replay 1); backlog 0" in text
    assert "firewall iptables: 0 live grants; opened 1, extended 1, kept 0, closed 1, " \
        "expired 0; 0 failures" in text, text  # fmt: skip
    report = json.loads(h.knockd("status", "-c", str(h.config_path), "--json").stdout)
    assert report["counters"]["interfaces"] == [{
        "interface": interface, "up": True, "packets": 9, "dropped_by_kernel": 0,
        "dropped_by_interface": 0, "completions": 7,
    }]  # fmt: skip

    # The textfile for node_exporter holds the same metrics.
    files = parse(textfile.read_text())
    assert {name for name, _ in files} == {name for name, _ in samples}
    assert textfile.stat().st_mode & 0o777 == 0o644

    # At stop the endpoint closes and the file keeps the final counters.
    h.stop()
    refused = ns_run(h.server, [sys.executable, "-c", (
        f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)")])
    assert refused.returncode != 0 and "ConnectionRefusedError" in refused.stderr
    final = parse(state_file.read_text())
    assert value(final, "knockd_fast_judging_latency_seconds_count") == 7
    status = h.knockd("status", "-c", str(h.config_path))
    assert status.returncode == 3
    assert "counters the last the daemon wrote, at " in status.stdout, status.stdout


@pytest.mark.netns
@pytest.mark.extension
def test_a_metrics_port_already_taken_stops_the_start_before_the_firewall(
    e2e,
) -> None:
    port = free_port()
    h = e2e(start=False, extra={"metrics": {"listen": f"127.0.0.1:{port}"}})
    code = (
        f"import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', {port})); "
        "s.listen(); print('ready', flush=True); sys.stdin.read()"
    )

    holder = subprocess.Popen(
        ["ip", "netns", "exec", h.server, sys.executable, "-c", code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    h._helpers.append(holder)  # killed at teardown, also on failure
    assert holder.stdout.readline().strip() == "ready"
    done = ns_run(h.server, [*knockd_command(), "run", "-c", str(h.config_path)], env=h.env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"knockd-fast: error: {h.config_path}: metrics.listen: cannot listen on "
        f"127.0.0.1:{port}: Address already in use"
    )
    assert not any("KNOCKD-FAST" in rule for rule in h.iptables_rules()), "firewall touched"


# --- offline -------------------------------------------------------------------------


def test_every_engine_counter_is_exported_once() -> None:
    assert set(ENGINE_COUNTERS) == {*COUNTER_NAMES, *PCAP_COUNTER_NAMES}
    series = {(metric, tuple(labels.items())) for metric, _, labels in ENGINE_COUNTERS.values()}
    assert len(series) == len(ENGINE_COUNTERS), "two counters would share one series"


def snapshot(**changes) -> DoormanStats:
    latency = LatencyHistogram()
    latency.observe([0.0004, 0.003, 0.003, 20.0])
    counters = {name: index for index, name in enumerate((*COUNTER_NAMES, *PCAP_COUNTER_NAMES))}
    fields = dict(
        time=1_800_000_000.5, captures=(CaptureStats("eth0", True, counters),
        CaptureStats("eth1", False, dict.fromkeys(counters, 0))), backlog=5, backlog_limit=65536,
        backlog_dropped=2, decisions={("accepted", "ok"): 4, ("rejected", "replay"): 1},
        firewall_backend="nftables", firewall_applied=4, firewall_failed=1, firewall_retried=3,
        firewall_absorbed=0, firewall_dropped=0, replay_entries=4, replay_degraded="disk full",
        judging_latency=latency.snapshot(), grants_live=2,
        grant_changes={"opened": 3, "extended": 1, "kept": 0, "closed": 1, "expired": 1},
        firewall_pending=0, started=1_799_999_000.0,
    )  # fmt: skip
    fields.update(changes)
    return DoormanStats(**fields)


def test_the_histogram_is_cumulative_with_every_observation_in_inf() -> None:
    collector = DoormanCollector({"version": "x"})
    collector.update(snapshot())
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    samples = parse(generate_latest(registry).decode())
    name = "knockd_fast_judging_latency_seconds_bucket"
    assert value(samples, name, le="0.0005") == 1
    assert value(samples, name, le="0.0025") == 1
    assert value(samples, name, le="0.005") == 3
    assert value(samples, name, le="10.0") == 3
    assert value(samples, name, le="+Inf") == 4  # 20 s is past every bound
    assert value(samples, "knockd_fast_judging_latency_seconds_sum") == pytest.approx(20.0064)
    assert value(samples, "knockd_fast_capture_up", interface="eth1") == 0
    assert value(samples, "knockd_fast_capture_packets_total", interface="eth0") == 0
    assert value(samples, "knockd_fast_completions_total", interface="eth0") == COUNTER_NAMES.index(
        "completions")  # fmt: skip
    assert value(samples, "knockd_fast_replay_cache_degraded") == 1


def test_the_state_file_reads_back_as_written(tmp_path: Path) -> None:
    publisher = MetricsPublisher(MetricsSettings(), tmp_path, {"version": "x"})
    assert read_published(tmp_path / STATE_FILE) is None  # nothing written yet
    publisher.publish(snapshot(), now=0.0)
    published = read_published(tmp_path / STATE_FILE)
    assert published is not None
    assert published.time == 1_800_000_000.5
    eth0, eth1 = published.interfaces
    pcap = len(COUNTER_NAMES)
    assert (eth0.interface, eth0.up, eth0.dropped_by_kernel, eth0.dropped_by_interface) == (
        "eth0", True, pcap + 1, pcap + 2)  # fmt: skip
    assert (eth1.up, eth1.packets) == (False, 0)
    assert published.decisions == {("accepted", "ok"): 4, ("rejected", "replay"): 1}
    assert (published.backend, published.grants, published.firewall_failures) == ("nftables", 2, 1)
    assert published.grant_changes == {
        "opened": 3, "extended": 1, "kept": 0, "closed": 1, "expired": 1}  # fmt: skip
    assert published.replay_degraded


def test_an_unwritable_textfile_is_one_warning_and_the_state_file_still_written(
    tmp_path: Path, caplog
) -> None:
    settings = MetricsSettings(textfile=tmp_path / "no" / "such" / "dir" / "k.prom")
    publisher = MetricsPublisher(settings, tmp_path, {"version": "x"})
    with caplog.at_level("WARNING", logger="knockd_fast"):
        publisher.publish(snapshot(), now=0.0)
        publisher.publish(snapshot(), now=10.0)  # due again: the same failure, not logged
    warnings = [r.getMessage() for r in caplog.records if r.name == "knockd_fast"]
    assert warnings == [
        f"metrics: cannot write {settings.textfile} (No such file or directory); "
        "retrying every 2 s"
    ]
    assert (tmp_path / STATE_FILE).is_file()
    assert list(tmp_path.iterdir()) == [tmp_path / STATE_FILE], "no temporary left behind"


def test_every_metric_the_admin_guide_names_is_exported() -> None:
    """The guide's table, scrape config and alert rules name only series that exist."""
    import re

    from prometheus_client import CollectorRegistry, generate_latest

    guide = (Path(__file__).resolve().parent.parent / "docs" / "admin.md").read_text()
    section = guide[guide.index("## 13. Metrics") :]
    named = set(re.findall(r"knockd_fast_[a-z_]+", section))
    collector = DoormanCollector({"version": "x"})
    collector.update(snapshot(fleet=FleetStats("gw1", True, {}, 0, 0)))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    exported = {name for name, _ in parse(generate_latest(registry).decode())}
    families = {name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
                for name in exported}  # fmt: skip
    assert named <= exported | families, named - exported - families
    assert len(named) > 20


def test_a_grant_change_rewrites_the_state_file_at_once(tmp_path: Path) -> None:
    """`status` right after a knock lists the grant: its counters must not lag 2 s behind."""
    publisher = MetricsPublisher(MetricsSettings(), tmp_path, {"version": "x"})
    publisher.publish(snapshot(), now=0.0)
    same = snapshot(time=1_800_000_001.0)
    publisher.publish(same, now=0.5)  # nothing changed, the 2 s not over: not rewritten
    assert read_published(tmp_path / STATE_FILE).time == 1_800_000_000.5
    changed = snapshot(time=1_800_000_002.0, grant_changes={
        "opened": 4, "extended": 1, "kept": 0, "closed": 1, "expired": 1})  # fmt: skip
    publisher.publish(changed, now=0.75)
    published = read_published(tmp_path / STATE_FILE)
    assert (published.time, published.grant_changes["opened"]) == (1_800_000_002.0, 4)
