#!/usr/bin/env python3
"""Garbage completions at a multiple of judging capacity -> share of genuine knocks accepted.

    python bench/backlog.py [--seconds 10] [--rates 2,4] [--quick]

Garbage completions are what the capture engine cannot refuse without a key: SPA messages
whose clear header names a configured user (the id travels in clear), random bytes after
it; each fails authentication in the judge. They arrive at ``rate`` times what the judge
can take; genuine knocks (fresh messages of that user, each from an address of its own in
one of the 256 /24s of 198.19.0.0/16, in turn) arrive 20 times a second among them.

The daemon's own pieces do the work: ``judging.Judge.judge_slice`` (the real checks, AES-SIV
and the replay cache in memory) takes ``JUDGE_SLICE`` completions a turn from the backlog
under test, at most ``MIN_BACKLOG`` long. Time is virtual: the judging capacity is measured
first (completions per CPU second, on this machine), a turn lasts ``JUDGE_SLICE`` / capacity,
and capture times follow it, so freshness and waits are what a daemon judging at that speed
would see; the CPU of the sender, the capture and the log is left out (docs/admin.md).

Policies: ``fair`` is ``judging.Backlog`` (per-prefix queues served in turn, a full backlog
drops from the longest queue); ``fifo`` is the backlog before it (first come, first served,
a full backlog drops the newcomer), kept here as the reference. Garbage sources: ``one
host``; ``one /16`` (spoofed across its 256 /24s); ``everywhere`` (spoofed, uniform over
IPv4: no prefix is fairer than another). Writes bench/results/backlog-<time>.json. A
measurement, never a test.
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import machine_info, write_json  # noqa: E402

from knock_client.keys import write_key_file  # noqa: E402
from knock_client.protocol import Action, Knock, Proto, seal  # noqa: E402
from knockd_fast.capture_spec import (  # noqa: E402
    COMPLETION_DTYPE,
    KIND_KNOCK,
    KIND_SPA,
    MAX_ALTERNATIVES,
    address_key,
)
from knockd_fast.config import load_config  # noqa: E402
from knockd_fast.daemon import JUDGE_SLICE  # noqa: E402
from knockd_fast.judging import MIN_BACKLOG, Backlog, Judge  # noqa: E402
from knockd_fast.replay import ReplayCache  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KEY = bytes(range(64))
USER_ID = 7
SERVER = ipaddress.IPv4Address("203.0.113.1")
GENUINE_PER_SECOND = 20
SOURCES = ("one host", "one /16", "everywhere")
POLICIES = ("fair", "fifo")
HEADER = bytes([0x10 | USER_ID >> 8, USER_ID & 0xFF])
GENUINE_NET = int(ipaddress.IPv4Address("198.19.0.0"))  # a /16: 256 networks of users


class FifoBacklog:
    """The backlog before per-prefix fairness: one queue, a full one drops the newcomers."""

    def __init__(self, limit: int) -> None:
        self.limit, self.dropped = limit, 0
        self._queue: collections.deque = collections.deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, interface: str | None, records: np.ndarray) -> None:
        room = self.limit - len(self._queue)
        self.dropped += max(0, len(records) - room)
        self._queue.extend((interface, r) for r in records[: max(0, room)])

    def take(self, limit: int | None):  # noqa: ANN201
        for _ in range(min(limit or len(self._queue), len(self._queue))):
            yield self._queue.popleft()


def judge_for(directory: Path) -> Judge:
    """A judge with a fresh replay cache, for one user (key and config written once)."""
    if not (directory / "user.key").exists():
        write_key_file(directory / "user.key", KEY)
    (directory / "config.toml").write_text(
        f'[capture]\ninterface = "eth0"\n[state]\ndirectory = "{directory / "state"}"\n'
        # The genuine knocks are one user's, many a second: no per-user cap in the way.
        "[limits]\nmax_grants = 65536\nmax_knocks_per_minute = 60000\n"
        f'[[users]]\nid = {USER_ID}\nname = "alice"\nkey_file = "user.key"\n'
        'allow = ["22/tcp"]\n'
    )
    return Judge(load_config(directory / "config.toml"), ReplayCache(None))


def garbage(rng: np.random.Generator, count: int, sources: str, when: float) -> np.ndarray:
    records = np.zeros(count, dtype=COMPLETION_DTYPE)
    records["kind"], records["family"], records["length"] = KIND_SPA, 4, 34
    sec = math.floor(when)
    records["sec"], records["usec"] = sec, int((when - sec) * 1e6)
    if sources == "one host":
        addresses = np.full(count, int(ipaddress.IPv4Address("198.18.7.7")), np.uint32)
    elif sources == "one /16":
        base = int(ipaddress.IPv4Address("198.18.0.0"))
        addresses = base + rng.integers(0, 1 << 16, count, dtype=np.uint32)
    else:  # anywhere but the genuine users' networks
        addresses = rng.integers(1 << 24, 0xE0000000, count, dtype=np.uint32)
        addresses[(addresses >> 16) == GENUINE_NET >> 16] ^= 1 << 20
    records["source"][:, 10:12] = 0xFF
    records["source"][:, 12:16] = addresses.astype(">u4").view(np.uint8).reshape(count, 4)
    records["destination"] = list(address_key(SERVER))
    records["message"][:, :2] = list(HEADER)
    records["message"][:, 2:34] = rng.integers(0, 256, (count, 32), dtype=np.uint8)
    return records


def genuine(serial: int, when: float) -> tuple[np.ndarray, str]:
    source = ipaddress.IPv4Address(GENUINE_NET + (serial % 256 << 8) + 1 + serial // 256)
    message = seal(Knock(Action.OPEN, Proto.TCP, 22, int(when), source, USER_ID, serial), KEY)
    record = np.zeros(1, dtype=COMPLETION_DTYPE)
    record["kind"], record["family"], record["length"] = KIND_SPA, 4, len(message)
    sec = math.floor(when)
    record["sec"], record["usec"] = sec, int((when - sec) * 1e6)
    record["source"] = list(address_key(source))
    record["destination"] = list(address_key(SERVER))
    record["message"][0, : len(message)] = list(message)
    return record, str(source)


def with_alternatives(records: np.ndarray) -> np.ndarray:
    """The same garbage as knock completions with 8 alternatives in 4 segments: 81
    combinations, of which the judge tries MAX_CANDIDATES."""
    records = records.copy()
    records["kind"], records["n_alternatives"] = KIND_KNOCK, MAX_ALTERNATIVES
    records["alt_segment"] = [10, 10, 11, 11, 12, 12, 13, 13]
    records["alt_digit"] = [1, 2, 3, 4, 5, 6, 7, 8]
    return records


def judging_cost(directory: Path, records: np.ndarray, t0: float) -> float:
    """CPU seconds per completion judged (slices of JUDGE_SLICE, as the daemon does)."""
    judge = judge_for(directory)
    backlog = Backlog(len(records))
    backlog.add("eth0", records)
    started = time.process_time()
    while len(backlog):
        judge.judge_slice(backlog, JUDGE_SLICE, lambda: t0)
    return (time.process_time() - started) / len(records)


def capacity(directory: Path, t0: float) -> float:
    """Garbage completions the judge rejects per CPU second, on this machine."""
    return 1 / judging_cost(
        directory, garbage(np.random.default_rng(0), 20_000, "everywhere", t0), t0
    )


def simulate(
    directory: Path,
    policy: str,
    sources: str,
    rate: float,
    seconds: float,
    per_second: float,
    limit: int = MIN_BACKLOG,
) -> dict:
    """One run: ``seconds`` of genuine knocks once the backlog is full (steady state)."""
    judge = judge_for(directory)
    rng = np.random.default_rng(1)
    backlog = Backlog(limit) if policy == "fair" else FifoBacklog(limit)
    turn = JUDGE_SLICE / per_second  # virtual seconds a turn takes to judge
    arrivals = rate * JUDGE_SLICE  # garbage completions per turn
    t0 = float(int(time.time()))
    now = t0
    clock = lambda: now  # noqa: E731
    sent: dict[str, float] = {}
    waits: list[float] = []
    carry = 0.0
    serial = 0
    # Genuine knocks start once the flood has filled the backlog and stop ``seconds`` later;
    # the flood and the judging go on until every genuine knock sent is judged or lost: the
    # backlog holds at most ``limit``, so that is limit / capacity later (plus a second).
    start = t0 + limit / (max(rate - 1, 0.01) * per_second) + 1.0
    next_genuine, stop = start, start + seconds
    end = stop + limit / per_second + 1.0
    started = time.process_time()
    while now < end:
        carry += arrivals
        count, carry = int(carry), carry - int(carry)
        batch = garbage(rng, count, sources, now)
        while next_genuine <= min(now, stop):
            record, source = genuine(serial, next_genuine)
            sent[source] = next_genuine
            at = int(rng.integers(0, len(batch) + 1))
            batch = np.concatenate([batch[:at], record, batch[at:]])
            serial += 1
            next_genuine += 1 / GENUINE_PER_SECOND
        backlog.add("eth0", batch)
        now += turn
        decisions, _changes = judge.judge_slice(backlog, JUDGE_SLICE, clock)
        for decision in decisions:
            if decision.verdict == "accepted":
                waits.append(now - sent.pop(decision.source))
    counted = serial
    accepted = len(waits)
    waits.sort()
    row = {
        "policy": policy,
        "sources": sources,
        "rate": rate,
        "genuine": counted,
        "accepted": accepted,
        "accepted_share": accepted / counted if counted else None,
        "wait_p50_s": waits[len(waits) // 2] if waits else None,
        "wait_p99_s": waits[min(len(waits) - 1, int(len(waits) * 0.99))] if waits else None,
        "dropped": backlog.dropped,
        "cpu_seconds": round(time.process_time() - started, 2),
    }
    print(
        f"{policy:>4} {sources:>10} x{rate:g}: {accepted}/{counted} genuine accepted, wait p50 "
        f"{_ms(row['wait_p50_s'])} p99 {_ms(row['wait_p99_s'])}, {backlog.dropped} dropped",
        flush=True,
    )
    return row


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="virtual seconds per run")
    parser.add_argument("--rates", type=lambda t: [float(x) for x in t.split(",")], default=None)
    parser.add_argument("--quick", action="store_true", help="4 virtual seconds, rate 2")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    args = parser.parse_args(argv)
    seconds = 4.0 if args.quick else args.seconds
    # The backlog's "full" warning goes to a daemon's log; here it would only interleave.
    logging.getLogger("knockd_fast").setLevel(logging.ERROR)
    if seconds * GENUINE_PER_SECOND > 256 * 250:
        parser.error("too many virtual seconds: the genuine users have 64,000 addresses")
    rates = args.rates or ([2.0] if args.quick else [2.0, 4.0])
    with tempfile.TemporaryDirectory(prefix="kf-backlog-") as directory:
        window = judge_for(Path(directory)).config.knock.window
        t0 = time.time()
        junk = garbage(np.random.default_rng(0), 20_000, "everywhere", t0)
        costs = {
            "garbage_us": judging_cost(Path(directory), junk, t0) * 1e6,
            "garbage_max_candidates_us": judging_cost(
                Path(directory), with_alternatives(junk[:5_000]), t0
            )
            * 1e6,
        }
        per_second = 1e6 / costs["garbage_us"]
        print(
            f"judging: {costs['garbage_us']:.1f} µs per garbage completion (capacity "
            f"{per_second:,.0f}/s), {costs['garbage_max_candidates_us']:.1f} µs with the "
            "most candidates"
        )
        rows = [
            simulate(Path(directory), policy, sources, rate, seconds, per_second)
            for rate in rates
            for sources in SOURCES
            for policy in POLICIES
        ]
    result = {
        "benchmark": "backlog",
        "timestamp": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "settings": {
            "virtual_seconds": seconds,
            "judging_capacity_per_second": round(per_second),
            "judging_cost_us": {name: round(value, 2) for name, value in costs.items()},
            "judge_slice": JUDGE_SLICE,
            "backlog_limit": MIN_BACKLOG,
            "genuine_per_second": GENUINE_PER_SECOND,
            "window": window,
        },
        "rows": rows,
        "machine": machine_info(),
    }
    out = write_json("backlog", result, args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
