"""Latency of one grant in the iptables backend with 10, 1,000 and 10,000 live grants.

    python bench/firewall_latency.py [--sizes 10 1000 10000] [--repeat 7]

Runs tests/firewall_probe.py's timing inside a network namespace made for it (never the
host's firewall), prints the medians and writes bench/results/firewall-<time>.json.
libiptc commits the whole table, so the cost grows with the table: the numbers say when
kernel sets with timeouts (ipset / nft sets) should take over.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROBE = HERE.parent / "tests" / "firewall_probe.py"
sys.path.insert(0, str(PROBE.parent))
import netns  # noqa: E402  (tests/netns.py: the namespace helper tests and the demo use)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with netns.network_namespace("kfbench") as ns:
        # A lock file of our own: never wait on (or block) the host's iptables.
        lock = Path(f"/tmp/{ns}.lock")
        argv = [sys.executable, str(PROBE), "bench", "--repeat", str(args.repeat)]
        argv += ["--sizes", *map(str, args.sizes)]
        try:
            done = netns.run_in(
                ns,
                argv,
                check=True,
                capture_output=True,
                text=True,
                env=dict(os.environ, XTABLES_LOCKFILE=str(lock)),
            )
        finally:
            lock.unlink(missing_ok=True)
    timings = json.loads(done.stdout)
    result = {"grants": timings, "repeat": args.repeat, "machine": {"nproc": os.cpu_count()}}
    out = HERE / "results" / f"firewall-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'live grants':>12} {'open new':>10} {'extend':>10} {'close':>10} {'reconcile':>10}")
    for size, row in timings.items():
        print(
            f"{size:>12} {row['open_new_ms']:>8.1f}ms {row['open_extend_ms']:>8.1f}ms "
            f"{row['close_ms']:>8.1f}ms {row['reconcile_ms']:>8.1f}ms"
        )
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
