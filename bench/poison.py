#!/usr/bin/env python3
"""Blind digit poisoning: attack packets per knock -> share of genuine knocks accepted.

    python bench/poison.py [--trials 40] [--ks 0,3,10,...] [--quick]

The attacker knows the victim's address and the layout and sees none of its packets. It
sprays SYNs from the victim's address at a steady rate, each from a random unprivileged
source port, in one of two strategies: ``spread`` (a random digit of a random segment) or
``segment`` (random digits of segment 0 only: three hits from the knock's port ahead of
the genuine digit then drop it, the cheapest denial a blind attacker has). "K packets per
knock" is how many of them fall in the knock's window: from ``knock_timeout`` before the
genuine knock's first packet to its last (earlier ones cannot share its partial knock).
The genuine knock is what the client sends: 34 shuffled SYNs from one random source port,
0.1 ms apart.

Each trial is judged by the real pipeline: the Cython engine reads the capture file (one
per grouping and K, trials 60 s apart so they never meet), and every completion goes
through ``verdict.judge`` with the victim's key; a trial counts when the genuine message
is accepted. Both groupings are measured: ``address+port`` (the default) and ``address``.
Writes bench/results/poison-<time>.json and a PNG plot. A measurement, never a test.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import machine_info, pyplot, write_json  # noqa: E402

from knock_client.protocol import Action, Knock, KnockLayout, Proto, seal  # noqa: E402
from knockd_fast import frames  # noqa: E402
from knockd_fast.candidates import candidate_messages  # noqa: E402
from knockd_fast.capture_spec import GROUP_BY, LINKTYPE_ETHERNET, key_address  # noqa: E402
from knockd_fast.completions import completions  # noqa: E402
from knockd_fast.config import User  # noqa: E402
from knockd_fast.pcapfile import CaptureWriter  # noqa: E402
from knockd_fast.verdict import judge  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VICTIM, SERVER = IPv4Address("192.0.2.10"), IPv4Address("198.51.100.20")
KEY = bytes(range(64))
USER = User(7, "victim", KEY, Path("victim.key"), frozenset({(22, "tcp")}), None)
LAYOUT = KnockLayout()
SEGMENTS = 34  # digits of an IPv4 message at 8 bits
KNOCK_TIMEOUT = 10.0  # the daemon's default
TRIAL_SPACING_US = 60_000_000  # trials never share a partial knock
KNOCK_GAP_US = 100  # between a knock's packets: a burst, as the client sends it
KS = (0, 3, 10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 65_536, 131_072, 262_144)
QUICK_KS = (0, 3, 30, 300, 3_000, 30_000)
T0 = 1_800_000_000
_TCP = struct.Struct("!HHIIBBHHH")


def tcp_syn(sport: int, dport: int) -> bytes:
    return _TCP.pack(sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)


STRATEGIES = ("spread", "segment")


def build(path: Path, k: int, trials: int, rng: random.Random, strategy: str) -> list[bytes]:
    """The capture file of ``trials`` knocks under ``k`` attack packets each; the messages."""
    prefix = frames.ethernet(frames.ipv4(VICTIM, SERVER, frames.PROTO_TCP, tcp_syn(1, 1)))[:34]
    window_us = int(KNOCK_TIMEOUT * 1e6)
    messages = []
    with CaptureWriter(path, LINKTYPE_ETHERNET) as writer:
        for trial in range(trials):
            start = trial * TRIAL_SPACING_US + window_us + 1
            message = seal(Knock(Action.OPEN, Proto.TCP, 22, T0, VICTIM, 7, trial), KEY)
            messages.append(message)
            ports = LAYOUT.ports_for(message)
            rng.shuffle(ports)
            sport = rng.randrange(1024, 65536)
            packets = [
                (start + n * KNOCK_GAP_US, prefix + tcp_syn(sport, p)) for n, p in enumerate(ports)
            ]
            end = packets[-1][0]
            for _ in range(k):
                when = rng.randrange(start - window_us, end + 1)
                segment = 0 if strategy == "segment" else rng.randrange(SEGMENTS)
                digit = rng.randrange(LAYOUT.segment_size)
                dport = LAYOUT.base_port + segment * LAYOUT.segment_size + digit
                packets.append((when, prefix + tcp_syn(rng.randrange(1024, 65536), dport)))
            packets.sort(key=lambda item: item[0])
            for when, data in packets:
                sec, usec = divmod(when, 1_000_000)
                writer.write(T0 + sec, usec, data)
    return messages


def accepted(path: Path, messages: list[bytes], group_by: str) -> tuple[int, dict[str, int]]:
    """Genuine knocks accepted by engine + verdict over ``path``; the engine's counters."""
    from knockd_fast._capture_c import CaptureEngine

    engine = CaptureEngine(
        LAYOUT, knock_timeout=KNOCK_TIMEOUT, destinations=[SERVER], group_by=group_by
    )
    engine.open_file(str(path))
    wanted, got = set(messages), set()
    while True:
        count = engine.dispatch()
        for completion in completions(engine.drain()):
            if key_address(completion.source) != VICTIM:
                continue
            # Packet time; the window below keeps every trial fresh.
            now = int(completion.captured_at)
            verdict = judge(
                candidate_messages(completion, LAYOUT.digit_bits),
                VICTIM,
                SERVER,
                now,
                {7: USER},
                3600,
                lambda _user, _siv, _sent: False,
            )
            if verdict.accepted and verdict.message in wanted:
                got.add(verdict.message)
        if count == 0:
            break
    engine.close()
    return len(got), engine.stats()


def plot(result: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    styles = {"address+port": ("o-", "s-"), "address": ("o--", "s--")}
    for group_by in GROUP_BY:
        for strategy, style in zip(STRATEGIES, styles[group_by], strict=True):
            rows = [
                r for r in result["rows"] if (r["group_by"], r["strategy"]) == (group_by, strategy)
            ]
            ax.plot(
                [max(r["k"], 1) for r in rows],
                [r["accepted_share"] for r in rows],
                style,
                label=f'group_by = "{group_by}", attack {strategy}',
            )
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.axvline(2**16, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("blind attack packets per knock (from the victim's address; 0 plotted at 1)")
    ax.set_ylabel("share of genuine knocks accepted")
    ax.set_title("Blind digit poisoning, Cython engine + verdict")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def measure(
    directory: Path, group_by: str, strategy: str, k: int, trials: int, rng: random.Random
) -> dict:
    path = directory / f"poison-{k}.pcap"
    started = time.monotonic()
    messages = build(path, k, trials, rng, strategy)
    count, stats = accepted(path, messages, group_by)
    path.unlink()
    print(
        f"{group_by:>13} {strategy:>7} K={k:>7}: {count:>3}/{trials} accepted (conflicts "
        f"{stats['conflicts']}, dropped alternatives {stats['alternatives_dropped']}, "
        f"evictions {stats['evictions']})",
        flush=True,
    )
    return {
        "group_by": group_by,
        "strategy": strategy,
        "k": k,
        "trials": trials,
        "accepted": count,
        "accepted_share": count / trials,
        "alternatives_dropped": stats["alternatives_dropped"],
        "conflicts": stats["conflicts"],
        "evictions": stats["evictions"],
        "packets": stats["packets"],
        "seconds": round(time.monotonic() - started, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--ks", type=lambda t: [int(x) for x in t.split(",")], default=None)
    parser.add_argument("--quick", action="store_true", help=f"K in {QUICK_KS}, 10 trials")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    args = parser.parse_args(argv)
    ks = args.ks or (QUICK_KS if args.quick else KS)
    trials = 10 if args.quick else args.trials
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kf-poison-") as directory:
        for group_by in GROUP_BY:
            for strategy in STRATEGIES:
                for k in ks:
                    # Past the point where address grouping accepts nothing, only the
                    # default grouping is worth the packets.
                    if group_by != GROUP_BY[0] and k > 3_000:
                        continue
                    rows.append(measure(Path(directory), group_by, strategy, k, trials, rng))
    result = {
        "benchmark": "poison",
        "timestamp": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "settings": {
            "trials": trials,
            "knock_timeout": KNOCK_TIMEOUT,
            "knock_gap_us": KNOCK_GAP_US,
            "source_ports": "1024..65535, uniform, per knock (client) and per packet (attacker)",
            "seed": args.seed,
        },
        "rows": rows,
        "machine": machine_info(),
    }
    out = write_json("poison", result, args.out)
    png = out.with_suffix(".png")
    if plot(result, png):
        print(f"wrote {png}", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
