"""Run the capture engine live on an interface and report what it completed (a test helper).

    ip netns exec NS python tests/live_capture.py --iface IF --out FILE [--dest ADDR ...]

Prints "ready" once the handle is active; on SIGTERM (or after --seconds) writes one JSON
object to FILE: {"completions": [{kind, family, source, destination, message}], "stats": {}}.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import sys
import time

from knock_client.protocol import KnockLayout
from knockd_fast._capture import CaptureEngine
from knockd_fast.capture_spec import BLOCK_TIMEOUT_MS, key_address


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iface", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dest", action="append", default=[])
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()

    stop = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    engine = CaptureEngine(KnockLayout(), destinations=args.dest)
    engine.open_live(args.iface)
    engine.set_nonblocking()  # wait in select(), where SIGTERM can interrupt
    print("ready", flush=True)
    completions = []

    def read() -> None:
        engine.dispatch()
        for record in engine.drain():
            completions.append(
                {
                    "kind": int(record["kind"]),
                    "family": int(record["family"]),
                    "source": str(key_address(bytes(record["source"]))),
                    "destination": str(key_address(bytes(record["destination"]))),
                    "message": bytes(record["message"][: record["length"]]).hex(),
                }
            )

    deadline = time.monotonic() + args.seconds
    while not stop and time.monotonic() < deadline:
        # Wait on the descriptor, as the daemon does, so SIGTERM is handled promptly.
        select.select([engine.fileno()], [], [], 0.05)
        read()
    # The packets sent just before SIGTERM may sit in a block the kernel has not handed
    # over yet: it does so BLOCK_TIMEOUT_MS after the block's first packet.
    time.sleep(2 * BLOCK_TIMEOUT_MS / 1000)
    read()
    with open(args.out, "w") as out:
        json.dump({"completions": completions, "stats": engine.stats()}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
