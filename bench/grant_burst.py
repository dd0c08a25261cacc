"""A burst of grants against the live daemon: do firewall commits hold up the capture?

    python bench/grant_burst.py [--sources 500] [--waves 2] [--backend iptables]

Builds two namespaces (server 198.18.0.1, clients 198.18.1.0/24 and up, documentation
ranges), runs `knockd-fast run` in the server one, and sends one SPA knock from each of
N client addresses in W waves (N new addresses each), as frames built beforehand and
written to a packet socket: the sender shares the two cores with the daemon, and a
socket bound per address cost it 25 µs a knock, a third of what the daemon spends; each
accepted knock is a grant change for the firewall thread, which hands the backend
everything waiting at once (one transaction where the backend applies batches). Reports the
daemon's own counters at stop (packets, completions, pcap received / dropped), the
accepted decisions, the time until the last grant was in place, and writes
bench/results/grant-burst-<time>.json. A measurement, never a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import netns  # noqa: E402  (tests/netns.py: the namespace helper tests and the demo use)

from knockd_fast import __version__, frames  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SERVER = "198.18.0.1"

SENDER = r"""
import json, socket, sys
plan = json.load(open(sys.argv[1]))
out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
out.bind((plan["interface"], 0))
for wave in plan["waves"]:
    for frame in wave:
        out.send(bytes.fromhex(frame))
"""


def sh(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


def knockd_fast_command() -> str:
    """``knockd-fast`` on PATH (make puts the venv first), else the one beside this Python."""
    return shutil.which("knockd-fast") or str(Path(sys.executable).with_name("knockd-fast"))


@contextlib.contextmanager
def hosts(count: int):
    """Server 198.18.0.1/15 and a client with ``count`` addresses from 198.18.1.0 on, all
    in one /15; yields (server, client, server interface, client addresses)."""
    tag = f"kfb{os.getpid()}"
    server_if, client_if = f"{tag}s", f"{tag}c"
    with netns.network_namespace("kfbs") as server, netns.network_namespace("kfbc") as client:
        # The MAC addresses the prebuilt frames carry (knockd_fast.frames).
        netns.veth_link(
            netns.End(server, server_if, (f"{SERVER}/15",), frames.DST_MAC.hex(":")),
            netns.End(client, client_if, (), frames.SRC_MAC.hex(":")),
        )
        sources = [str(ipaddress.ip_address("198.18.1.0") + n) for n in range(count)]
        netns.add_addresses(client, client_if, (f"{source}/15" for source in sources))
        yield server, client, server_if, client_if, sources


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=500)
    parser.add_argument("--waves", type=int, default=2)
    parser.add_argument("--backend", default="iptables", help="grants.backend")
    args = parser.parse_args()

    from knock_client.keys import generate_key, write_key_file
    from knock_client.protocol import Action, Knock, KnockLayout, Proto, seal
    from knockd_fast.capture_spec import LINKTYPE_ETHERNET

    work = Path(tempfile.mkdtemp(prefix="kf-burst-"))
    key = generate_key()
    write_key_file(work / "bench.key", key)
    # What each backend needs beyond the defaults: the port to drop, room for the burst.
    backend_extra = {
        "nftables": 'protect = ["2222/tcp"]\n',
        "ipset": f"ipset_maxelem = {max(65536, 2 * args.sources * args.waves)}\n",
    }.get(args.backend, "")
    (work / "config.toml").write_text(
        '[capture]\ninterface = "IFACE"\n'
        f'[grants]\ndefault_timeout = 600\nbackend = "{args.backend}"\n{backend_extra}'
        f'[state]\ndirectory = "{work / "state"}"\n'
        '[[users]]\nid = 1\nname = "bench"\nkey_file = "bench.key"\nallow = ["2222/tcp"]\n'
        # One user knocks for every source of the burst: its caps must not count.
        "max_grants = 65536\nmax_knocks_per_minute = 60000\n"
    )
    # The knocks are sealed before the daemon starts: give it a replay cache with its
    # history (an empty one), or it refuses them as sealed before it started.
    from knockd_fast.replay import ReplayCache

    ReplayCache.for_state_dir(work / "state").close()
    # Every wave from addresses of its own: the firewall queue would coalesce a second open
    # of one grant into the first, and each knock here is meant to be a change of its own.
    with hosts(args.sources * args.waves) as (server, client, server_if, client_if, sources):
        config = work / "config.toml"
        config.write_text(config.read_text().replace("IFACE", server_if))
        now = int(time.time())
        layout = KnockLayout()  # the daemon's, as the config leaves [knock] at its defaults

        def spa(wave: int, n: int, source: str) -> str:
            address = ipaddress.ip_address(source)
            knock = Knock(Action.OPEN, Proto.TCP, 2222, now, address, 1, wave * 100_000 + n)
            sport = 1024 + (wave * args.sources + n) % 60_000  # one port per knock, as the client
            message = seal(knock, key)
            return frames.spa_frame(layout, message, source, SERVER, LINKTYPE_ETHERNET, sport).hex()

        waves = [
            [
                spa(wave, n, source)
                for n, source in enumerate(sources[wave * args.sources : (wave + 1) * args.sources])
            ]
            for wave in range(args.waves)
        ]
        plan = work / "plan.json"
        plan.write_text(json.dumps({"interface": client_if, "waves": waves}))
        log_path = work / "daemon.log"
        argv = [knockd_fast_command(), "run", "-c", str(config), "--json"]
        with open(log_path, "w") as log_file:
            daemon = subprocess.Popen(["ip", "netns", "exec", server, *argv], stderr=log_file)
        deadline = time.monotonic() + 20
        started_line = re.compile(rf'"event": "start", "version": "{re.escape(__version__)}"')
        while not started_line.search(log_path.read_text()):
            if time.monotonic() > deadline or daemon.poll() is not None:
                print(log_path.read_text(), file=sys.stderr)
                return 1
            time.sleep(0.1)
        started, started_wall = time.monotonic(), time.time()
        sh("ip", "netns", "exec", client, sys.executable, "-c", SENDER, str(plan))
        sent = time.monotonic()
        expected = args.sources * args.waves
        # Read the log as it grows (re-reading it whole every poll would cost the machine
        # more than the daemon spends: tens of MB at 40,000 grants).
        opened, tail = 0, ""
        with open(log_path) as growing:
            while opened < expected and time.monotonic() - started <= 600:
                chunk = growing.read()
                if not chunk:
                    time.sleep(0.05)
                    continue
                lines = (tail + chunk).split("\n")
                tail = lines.pop()
                opened += sum("firewall: opened" in line for line in lines)
        granted = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        text = log_path.read_text()
    # With --json every line is one JSON object: decisions have a verdict, the stop line
    # its counters.
    entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    decisions = [entry for entry in entries if "verdict" in entry]
    stops = [entry["counters"] for entry in entries if entry.get("event") == "stop"]
    counters = stops[-1] if stops else {}
    result = {
        "backend": args.backend,
        "sources": args.sources,
        "waves": args.waves,
        "knocks_sent": expected,
        "send_seconds": round(sent - started, 3),
        "accepted": sum(d["verdict"] == "accepted" for d in decisions),
        "rejected_reasons": sorted({d["reason"] for d in decisions if d["verdict"] != "accepted"}),
        "grants_opened": text.count("firewall: opened"),
        # A decision's time is its knock's capture time: this is when the last knock was
        # captured; pcap_dropped = 0 in the counters shows the commits never held up the
        # capture thread (the firewall thread makes them).
        "seconds_to_last_decision": round(
            max(
                (
                    datetime.datetime.fromisoformat(d["time"].replace("Z", "+00:00")).timestamp()
                    for d in decisions
                ),
                default=started_wall,
            )
            - started_wall,
            3,
        ),
        "seconds_to_last_grant": round(granted - started, 3),
        "grants_per_second": round(text.count("firewall: opened") / (granted - started), 1),
        "counters": {k: int(v) for k, v in counters.items()},
        "machine": {"nproc": os.cpu_count()},
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = RESULTS / f"grant-burst-{args.backend}-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
