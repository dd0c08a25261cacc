#!/usr/bin/env python3
"""What a wake-up costs this machine: CPU per unit of Python work, run back to back and
with a sleep before each unit.

    python bench/wakeup.py [--reps 400]

The daemon's loop paces light turns (``daemon.TURN_SECONDS``) because of this number: on a
2-core VM each wake-up after a sleep of a few milliseconds cost 100-300 µs of CPU more than
the same work back to back, whatever the work (cold caches and branch predictors, the idle
exit), so a loop woken at every 5 ms capture block paid it 200 times a second. A
measurement, never a test.
"""

from __future__ import annotations

import argparse
import time

UNITS = (100, 1_000, 5_000)  # dict updates per unit of work: ~20, 200, 700 µs here
SLEEPS = (0.001, 0.005, 0.02)


def work(updates: int) -> None:
    table: dict[int, int] = {}
    for i in range(updates):
        table[i % 97] = table.get(i % 53, 0) + i


def cpu_per_unit(updates: int, sleep: float, reps: int) -> float:
    """µs of process CPU per unit of work, a sleep of ``sleep`` seconds before each."""
    started = time.process_time()
    for _ in range(reps):
        if sleep:
            time.sleep(sleep)
        work(updates)
    return (time.process_time() - started) / reps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=400)
    args = parser.parse_args()
    print(
        "work     back to back   extra CPU per wake-up after a sleep of "
        + ", ".join(f"{s * 1000:g} ms" for s in SLEEPS)
    )
    for updates in UNITS:
        hot = cpu_per_unit(updates, 0, args.reps)
        extra = [cpu_per_unit(updates, s, args.reps) - hot for s in SLEEPS]
        print(f"{updates:5d}   {hot:9.1f} µs   " + "   ".join(f"{e:+8.1f} µs" for e in extra))


if __name__ == "__main__":
    main()
