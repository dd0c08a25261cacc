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
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROBE = HERE.parent / "tests" / "firewall_probe.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    ns = f"kfbench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                str(PROBE),
                "bench",
                "--sizes",
                *map(str, args.sizes),
                "--repeat",
                str(args.repeat),
            ],
            check=True,
            capture_output=True,
            text=True,
            # A lock file of our own: never wait on (or block) the host's iptables.
            env=dict(os.environ, XTABLES_LOCKFILE=f"/tmp/{ns}.lock"),
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        Path(f"/tmp/{ns}.lock").unlink(missing_ok=True)
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
