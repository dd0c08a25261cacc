#!/usr/bin/env python3
"""Deterministic capture files for the benchmarks, under bench/results/ (bench/README.md).

The generators live in ``knockd_fast.workloads``, shared with ``knockd-fast bench``; this
script gives them bench/results/ as their default folder, and a command line:

    python bench/make_pcap.py --kind knocks --sources 10000
    python bench/make_pcap.py --kind flood --packets 1000000 --sources 130000
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from knockd_fast import workloads
from knockd_fast.capture_spec import SNAPLEN
from knockd_fast.workloads import (  # noqa: F401  (the harnesses' names for them)
    BENCH_KEY,
    START_SEC,
    USER_ID,
    CaptureFile,
    Sealing,
    knock_ports,
    write_knocks,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
plan_knocks = functools.partial(workloads.plan_knocks, out_dir=RESULTS_DIR)
knocks_path = functools.partial(workloads.knocks_path, out_dir=RESULTS_DIR)
make_knocks = functools.partial(workloads.make_knocks, out_dir=RESULTS_DIR)
flood_shape = functools.partial(workloads.flood_shape, out_dir=RESULTS_DIR)
make_flood = functools.partial(workloads.make_flood, out_dir=RESULTS_DIR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("knocks", "flood"), default="knocks")
    parser.add_argument(
        "--sources",
        type=int,
        help="knocks: concurrent knockers K (default 10000); flood: source addresses "
        "(default 130000)",
    )
    parser.add_argument(
        "--packets",
        type=int,
        help="total packets (knocks: default one knock per source plus background; "
        "flood: default 1000000)",
    )
    parser.add_argument("--background-share", type=float, default=0.5, help="knocks only")
    parser.add_argument("--ipv6-share", type=float, default=0.0, help="knocks only")
    parser.add_argument("--garbage-share", type=float, default=0.0, help="knocks only")
    parser.add_argument(
        "--background", choices=workloads.BACKGROUNDS, default="traffic", help="knocks only"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--snaplen", type=int, default=SNAPLEN)
    parser.add_argument("--out", type=Path, help=f"output file (default: a name in {RESULTS_DIR})")
    parser.add_argument("--force", action="store_true", help="rewrite an existing file")
    args = parser.parse_args(argv)
    if args.kind == "knocks":
        shape = make_knocks(
            args.sources or 10_000,
            args.packets,
            args.background_share,
            args.ipv6_share,
            args.seed,
            out=args.out,
            snaplen=args.snaplen,
            force=args.force,
            garbage_share=args.garbage_share,
            background=args.background,
        )
    else:
        shape = make_flood(
            args.packets or 1_000_000,
            args.sources or 130_000,
            args.seed,
            out=args.out,
            snaplen=args.snaplen,
            force=args.force,
        )
    info = shape.as_json()
    print(info.pop("path"))
    for key, value in info.items():
        print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
