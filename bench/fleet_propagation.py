#!/usr/bin/env python3
"""How fast one gateway's grant change reaches the rest of a fleet (issue 14).

    python bench/fleet_propagation.py [--gateways 3] [--knocks 100] [--runs 3]

Builds tests/fleet_site.py's site (a client, a router with Debian's redis-server, N gateways
running the real daemon with the iptables backend) in namespaces of its own, and sends
``--knocks`` single-packet messages through gateway 1, opens and closes in turn. For each:
the seconds from its capture on gateway 1 (the decision's time) until the change is in
place on the last of the other gateways (the time of that gateway's firewall line, written
once the rule is in). Prints p50, p99 and max per run and writes
bench/results/fleet-<time>.json. A measurement, never a test (the target: p99 under 100 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from fleet_site import fleet_site, propagation  # noqa: E402  (the tests' site)

RESULTS = HERE / "results"


def percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateways", type=int, default=3)
    parser.add_argument("--knocks", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="kf-fleet-") as folder:
            with fleet_site(Path(folder), gateways=args.gateways) as site:
                delays = propagation(site, args.knocks)
        row = {
            "run": run + 1,
            "knocks": len(delays),
            "p50_ms": round(1000 * statistics.median(delays), 1),
            "p99_ms": round(1000 * percentile(delays, 0.99), 1),
            "max_ms": round(1000 * max(delays), 1),
        }
        runs.append(row)
        print(
            f"run {row['run']}: {row['knocks']} changes to the last of {args.gateways - 1} "
            f"gateways: p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, max {row['max_ms']} ms"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"fleet-{time.strftime('%Y%m%d-%H%M%S')}.json"
    machine = {"cpus": os.cpu_count(), "kernel": platform.release()}
    out.write_text(json.dumps({"gateways": args.gateways, "machine": machine, "runs": runs}))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
