#!/usr/bin/env python3
"""What a fleet costs its Redis: memory per claim, live grant and stream entry; round trips.

Memory per remembered message (a replay claim), per live grant and per stream entry (also
at the stream's cap), the time a joining gateway takes to read the live grants, and the
round trip of one judging slice's claims (1 and 256 messages) and of publishing changes.

    redis-server --bind 127.0.0.1 --port 6390 --save "" --appendonly no --daemonize no &
    .venv/bin/python bench/fleet_sizing.py redis://127.0.0.1:6390/0 [--count 10000] [--runs 500]

It writes what gateways write, through knockd_fast.fleet itself (ReplayClaims, EventSigner,
GrantBus) and under the same key names, so run it against a scratch redis-server only: it
refuses a database that holds any key, and deletes what it wrote at the end. Memory is
Redis's own count (INFO memory: used_memory) before and after, and MEMORY USAGE of the
keys; times are wall clock around one call, as the daemon makes it. A measurement, never
a test (docs/admin.md, "A fleet of gateways", quotes its numbers).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import time

from knockd_fast.firewall.base import Grant
from knockd_fast.fleet import (
    EPOCH,
    LIVE,
    REPLAY_PREFIX,
    STREAM,
    STREAM_LENGTH,
    Claim,
    EventSigner,
    GrantBus,
    ReplayClaims,
    redis_client,
)
from knockd_fast.fleetlink import PUBLISH_BATCH

GATEWAY = "gw1.example.org"  # a host name's length: claims store it, events carry it
SLICE = 256  # messages claimed per round trip at most (a busy judging slice)
FIRST_SOURCE = int(ipaddress.ip_address("198.18.0.0"))  # benchmark range: nothing is sent


def used_memory(client) -> int:
    return int(client.info("memory")["used_memory"])


def usage(client, key: str) -> int:
    return int(client.memory_usage(key, samples=0) or 0)


def grant(index: int, expires: int) -> Grant:
    return Grant(
        ipaddress.ip_address(FIRST_SOURCE + index), "tcp", 22,
        ipaddress.ip_address("203.0.113.1"), expires, f"user{index % 1000:04d}",
    )  # fmt: skip


def percentiles(seconds: list[float], cpu: list[float]) -> dict[str, float]:
    """Wall-clock p50 and p99 of the calls, and the median CPU this process spent in one."""
    cuts = statistics.quantiles(seconds, n=100)
    return {"p50_ms": cuts[49] * 1e3, "p99_ms": cuts[98] * 1e3,
            "client_cpu_ms": statistics.median(cpu) * 1e3}  # fmt: skip


def timed(call, runs: int) -> dict[str, float]:
    """``call()`` prepares one run and returns the operation to time (no argument)."""
    seconds, cpu = [], []
    for _ in range(runs):
        operation = call()
        wall, process = time.perf_counter(), time.process_time()
        operation()
        seconds.append(time.perf_counter() - wall)
        cpu.append(time.process_time() - process)
    return percentiles(seconds, cpu)


def claims(count: int, window: int) -> list[Claim]:
    return [Claim(int.from_bytes(os.urandom(2)) % 4096, os.urandom(16), window)
            for _ in range(count)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="redis://HOST:PORT/DB of a scratch redis-server")
    parser.add_argument("--count", type=int, default=10_000, help="claims, and live grants")
    parser.add_argument("--runs", type=int, default=500, help="round trips timed per size")
    parser.add_argument("--window", type=int, default=30, help="a claim's lifetime, seconds")
    parser.add_argument("--json", action="store_true", help="the results as one JSON object")
    args = parser.parse_args()

    admin = redis_client(args.url, timeout=30.0)
    if admin.dbsize():
        raise SystemExit(f"{args.url}: the database holds keys; use a scratch redis-server")
    claimer = ReplayClaims(redis_client(args.url), GATEWAY)
    bus = GrantBus(redis_client(args.url, timeout=30.0))
    signer = EventSigner(os.urandom(64), GATEWAY)
    results: dict[str, object] = {
        "redis": admin.info("server")["redis_version"], "count": args.count,
        "gateway": GATEWAY,
    }  # fmt: skip
    try:
        before = used_memory(admin)
        made = claims(args.count, args.window)
        for start in range(0, len(made), SLICE):
            claimer.claim(made[start : start + SLICE])
        after_claims = used_memory(admin)
        sample = f"{REPLAY_PREFIX}{made[0].user_id}:{made[0].siv.hex()}"
        results["claim"] = {
            "bytes_each": (after_claims - before) / args.count,
            "memory_usage_of_one_key": usage(admin, sample),
            "key": sample,
        }

        expires = int(time.time()) + 3600
        opens = [grant(i, expires) for i in range(args.count)]
        for start in range(0, len(opens), PUBLISH_BATCH):
            batch = opens[start : start + PUBLISH_BATCH]
            bus.publish_many([(signer.sign("open", g), "open", g) for g in batch])
        after_grants = used_memory(admin)
        live, stream = usage(admin, LIVE), usage(admin, STREAM)
        results["grants"] = {
            "used_memory_bytes_each": (after_grants - after_claims) / args.count,
            "live_bytes_each": live / args.count,
            "stream_bytes_each": stream / args.count,
            "live_entries": admin.hlen(LIVE),
            "stream_entries": admin.xlen(STREAM),
        }

        # A live grant's whole life on the stream (open, close), until the stream is trimmed
        # at its cap: the hash goes back to the grants above.
        total = args.count
        index = args.count
        while total < STREAM_LENGTH + 2 * PUBLISH_BATCH * 8:
            batch = [grant(index + i, expires) for i in range(PUBLISH_BATCH // 2)]
            index += len(batch)
            changes = [(signer.sign("open", g), "open", g) for g in batch]
            changes += [(signer.sign("close", g), "close", g) for g in batch]
            bus.publish_many(changes)
            total += len(changes)
        length, size = admin.xlen(STREAM), usage(admin, STREAM)
        results["stream_at_cap"] = {
            "published": total, "entries": length, "bytes": size, "bytes_each": size / length,
        }  # fmt: skip

        started = time.perf_counter()
        snapshot, *_ = bus.join("sizing")
        results["join"] = {"live_grants": len(snapshot),
                           "ms": (time.perf_counter() - started) * 1e3}  # fmt: skip

        rounds: dict[str, object] = {}
        for size in (1, SLICE):
            for _ in range(20):  # warm: connection made, allocator settled
                claimer.claim(claims(size, args.window))

            def claim_call(size=size):
                batch = claims(size, args.window)
                return lambda: claimer.claim(batch)

            rounds[f"claim_{size}"] = timed(claim_call, args.runs)
        for size in (1, PUBLISH_BATCH):

            def publish_call(size=size):
                nonlocal index
                batch = [grant(index + i, expires) for i in range(size)]
                index += size
                return lambda: bus.publish_many(
                    [(signer.sign("close", g), "close", g) for g in batch]
                )

            rounds[f"publish_{size}"] = timed(publish_call, max(20, args.runs // 5))
        results["round_trips"] = rounds
    finally:
        admin.unlink(LIVE, STREAM, EPOCH)
        found = list(admin.scan_iter(match=f"{REPLAY_PREFIX}*", count=10_000))
        for start in range(0, len(found), 10_000):
            admin.unlink(*found[start : start + 10_000])
    if args.json:
        print(json.dumps(results, indent=2))
        return
    claim, grants, cap = results["claim"], results["grants"], results["stream_at_cap"]
    print(f"redis {results['redis']}, {args.count} of each, gateway name {GATEWAY!r}")
    print(f"claim (kf:replay key with its expiry): {claim['bytes_each']:.0f} B each "
          f"(MEMORY USAGE of one: {claim['memory_usage_of_one_key']} B)")  # fmt: skip
    print(f"live grant (kf:live entry): {grants['live_bytes_each']:.0f} B each")
    print(f"stream entry (kf:grants, opens): {grants['stream_bytes_each']:.0f} B each; "
          f"both together by used_memory: {grants['used_memory_bytes_each']:.0f} B")  # fmt: skip
    print(f"stream at its cap: {cap['entries']} entries after {cap['published']} published, "
          f"{cap['bytes'] / 1e6:.1f} MB, {cap['bytes_each']:.0f} B each")  # fmt: skip
    print(f"join with {results['join']['live_grants']} live grants: "
          f"{results['join']['ms']:.1f} ms")  # fmt: skip
    for name, cut in results["round_trips"].items():
        print(f"{name:12s} p50 {cut['p50_ms']:.3f} ms  p99 {cut['p99_ms']:.3f} ms  "
              f"(client CPU {cut['client_cpu_ms']:.3f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
