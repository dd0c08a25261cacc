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
from knockd_fast.capture_spec import key_address


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
    engine.open_live(args.iface, timeout_ms=50)
    engine.set_nonblocking()  # wait in select(), where SIGTERM can interrupt
    print("ready", flush=True)
    completions = []
    deadline = time.monotonic() + args.seconds
    while not stop and time.monotonic() < deadline:
        # Wait on the descriptor, as the daemon will, so SIGTERM is handled promptly.
        select.select([engine.fileno()], [], [], 0.05)
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
    with open(args.out, "w") as out:
        json.dump({"completions": completions, "stats": engine.stats()}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
