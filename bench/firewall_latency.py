#!/usr/bin/env python3
"""Grant latency of every firewall backend with 10 to 100,000 live grants.

    python bench/firewall_latency.py [--backends iptables nftables ...] [--sizes 10 1000 ...]
                                     [--repeat 31]

Each backend runs in a network namespace made for it (never the host's firewall), built
from a ``[grants]`` configuration as the daemon builds it. For each size N: N grants are
put in place (in transactions of MAX_BATCH where the backend applies batches), then
``--repeat`` times: open a new grant, extend a held one, close a held one, each timed on
its own (p50 and p99); then one batch of 1,000 opens is timed (grants/s in one
transaction: what the firewall thread does with a slice's changes). Prints a table and
writes bench/results/firewall-<time>.json and a PNG. A measurement, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))
import netns  # noqa: E402  (tests/netns.py: the namespace helper tests and the demo use)

RESULTS = HERE / "results"
SIZES = (10, 1_000, 10_000, 100_000)
SOURCES = IPv4Address("198.18.0.0")  # a /15: 131,072 sources
DESTINATION = IPv4Address("192.0.2.1")
BATCH_OPENS = 1_000


def percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def build_firewall(backend: str):  # noqa: ANN201
    """The backend the daemon would build from a config naming it (the other settings at
    their defaults, but what the largest size needs)."""
    from knock_client.keys import write_key_file
    from knockd_fast.config import load_config
    from knockd_fast.firewall import registry

    # What each backend needs beyond the defaults to hold the largest size.
    extra = {
        "nftables": 'protect = ["22/tcp"]\n',
        "ipset": f"ipset_maxelem = {2 * max(SIZES)}\n",
    }.get(backend, "")
    directory = Path(tempfile.mkdtemp(prefix="kf-fwbench-"))
    write_key_file(directory / "bench.key", bytes(32))
    (directory / "config.toml").write_text(
        f'[capture]\ninterface = "lo"\n[grants]\nbackend = "{backend}"\n{extra}'
        f'[state]\ndirectory = "{directory / "state"}"\n'
        '[[users]]\nid = 1\nname = "bench"\nkey_file = "bench.key"\nallow = ["22/tcp"]\n'
    )
    return registry.create(load_config(directory / "config.toml").grants)


def inside(backend: str, sizes: list[int], repeat: int) -> dict:
    """Run in the namespace: the measurements of one backend, as JSON-able rows."""
    from knock_client.protocol import Action
    from knockd_fast.firewall.base import MAX_BATCH, AppliesBatches, Grant, GrantChange

    def grant(n: int, expires: int, base: IPv4Address = SOURCES) -> Grant:
        return Grant(base + n, "tcp", 22, DESTINATION, expires, "bench")

    def put(changes: list) -> None:
        if isinstance(fw, AppliesBatches):
            for start in range(0, len(changes), MAX_BATCH):
                fw.apply_batch(changes[start : start + MAX_BATCH])
        else:
            for change in changes:
                fw.open(change.grant)

    fw = build_firewall(backend)
    rows = []
    for size in sizes:
        fw.teardown()
        fw.setup()
        expires = int(time.time()) + 86_400
        started = time.perf_counter()
        put([GrantChange(Action.OPEN, grant(n, expires)) for n in range(size)])
        filled = time.perf_counter() - started
        opens, extends, closes = [], [], []
        fresh = IPv4Address("203.0.113.0")
        for r in range(repeat):
            new = Grant(fresh + r, "tcp", 22, DESTINATION, expires, "bench")
            t0 = time.perf_counter()
            fw.open(new)
            opens.append(time.perf_counter() - t0)
            held = grant((size // 2 + r) % size, expires + 60 + r)
            t0 = time.perf_counter()
            fw.open(held)
            extends.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fw.close(grant((size // 3 + r) % size, expires).key, "bench")
            closes.append(time.perf_counter() - t0)
        batch = [
            GrantChange(Action.OPEN, grant(n, expires, IPv4Address("100.64.0.0")))
            for n in range(BATCH_OPENS)
        ]
        t0 = time.perf_counter()
        put(batch)
        batch_seconds = time.perf_counter() - t0
        listed = len(fw.grants())
        rows.append(
            {
                "backend": backend,
                "live_grants": size,
                "open_p50_ms": round(statistics.median(opens) * 1e3, 3),
                "open_p99_ms": round(percentile(opens, 0.99) * 1e3, 3),
                "extend_p50_ms": round(statistics.median(extends) * 1e3, 3),
                "extend_p99_ms": round(percentile(extends, 0.99) * 1e3, 3),
                "close_p50_ms": round(statistics.median(closes) * 1e3, 3),
                "close_p99_ms": round(percentile(closes, 0.99) * 1e3, 3),
                "batch_grants_per_s": round(BATCH_OPENS / batch_seconds),
                "batched": isinstance(fw, AppliesBatches),
                "fill_seconds": round(filled, 2),
                "listed_after": listed,
                "repeat": repeat,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    fw.teardown()
    return {"rows": rows}


def plot(rows: list[dict], path: Path) -> bool:
    from run import pyplot

    plt = pyplot()
    if plt is None:
        return False

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for backend in sorted({r["backend"] for r in rows}):
        mine = [r for r in rows if r["backend"] == backend]
        ax.plot([r["live_grants"] for r in mine], [r["open_p50_ms"] for r in mine], "o-",
                label=f"{backend}: open p50")  # fmt: skip
        ax.plot([r["live_grants"] for r in mine], [r["extend_p50_ms"] for r in mine], "s--",
                label=f"{backend}: extend p50")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("live grants")
    ax.set_ylabel("milliseconds per change (one at a time)")
    ax.set_title("Grant latency by firewall backend")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=None, help="default: every one")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeat", type=int, default=31)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--inside", help=argparse.SUPPRESS)  # the run in the namespace
    args = parser.parse_args(argv)
    if args.inside:
        if not netns.in_named_namespace():
            parser.error("--inside runs in a namespace made for it, never the host's firewall")
        print(json.dumps(inside(args.inside, args.sizes, args.repeat)))
        return 0
    from knockd_fast.firewall.registry import NAMES

    backends = args.backends or [name for name in NAMES if name != "dry-run"]
    rows: list[dict] = []
    for backend in backends:
        with netns.network_namespace("kfbench") as ns:
            lock = Path(f"/tmp/{ns}.lock")  # never wait on (or block) the host's iptables
            argv = [sys.executable, __file__, "--inside", backend, "--repeat", str(args.repeat)]
            try:
                done = netns.run_in(
                    ns,
                    [*argv, "--sizes", *map(str, args.sizes)],
                    stdout=subprocess.PIPE,
                    text=True,
                    env=dict(os.environ, XTABLES_LOCKFILE=str(lock)),
                )
            finally:
                lock.unlink(missing_ok=True)
        if done.returncode != 0:
            print(f"{backend}: failed (exit {done.returncode}); left out", file=sys.stderr)
            continue
        rows += json.loads(done.stdout)["rows"]
    from run import machine_info, write_json

    result = {
        "benchmark": "firewall",
        "timestamp": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "settings": {"sizes": args.sizes, "repeat": args.repeat, "batch_opens": BATCH_OPENS},
        "rows": rows,
        "machine": machine_info(),
    }
    print(
        f"{'backend':>10} {'grants':>7} {'open p50/p99 ms':>16} {'extend p50/p99':>15} "
        f"{'close p50/p99':>15} {'batch/s':>9}"
    )
    for r in rows:
        print(
            f"{r['backend']:>10} {r['live_grants']:>7}"
            f" {r['open_p50_ms']:>7.3f}/{r['open_p99_ms']:<8.3f}"
            f" {r['extend_p50_ms']:>6.3f}/{r['extend_p99_ms']:<8.3f}"
            f" {r['close_p50_ms']:>6.3f}/{r['close_p99_ms']:<8.3f} {r['batch_grants_per_s']:>9}"
        )
    out = write_json("firewall", result, args.out)
    if plot(rows, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
