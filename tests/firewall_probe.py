"""Drive a firewall backend inside a network namespace (a helper script, not a test file).

    ip netns exec NS python tests/firewall_probe.py run < spec.json
    ip netns exec NS python tests/firewall_probe.py bench --sizes 10 1000 10000

``run`` reads {"backend", "chain", "hooks", "families", "lock_wait", "ops"} (and, for the
ipset backend, "set_name" and "maxelem") as JSON on
stdin, applies the ops in order to one firewall object (so its in-memory view lives
across them) and prints one JSON line: a list with {"ok": result} or {"error": text}
per op. Ops: ["setup"], ["teardown"], ["grants"], ["open", grant], ["close", key],
["reconcile", now], ["expire", now], ["batch", [[action, grant], ...]] (apply_batch),
["repair"], ["sleep", seconds], ["sh", argv] to run a command in between
(e.g. ``iptables-legacy -D ...`` by hand), and ["race", argv, op] to run a command in
the middle of an op (between its re-read and its commit). Grants and keys are JSON.

``bench`` times ``open()`` with N live grants (IPv4) and prints JSON.

Refuses to touch the iptables backend in the host's own network namespace.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from ipaddress import ip_address
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from knock_client.protocol import Action  # noqa: E402
from knockd_fast.firewall import DryRunFirewall, FirewallError, Grant, GrantChange  # noqa: E402


def grant_to_json(grant: Grant) -> dict[str, Any]:
    return {
        "source": str(grant.source),
        "proto": grant.proto,
        "port": grant.port,
        "destination": None if grant.destination is None else str(grant.destination),
        "expires": grant.expires,
        "user": grant.user,
    }


def grant_from_json(data: dict[str, Any]) -> Grant:
    dest = data.get("destination")
    return Grant(
        ip_address(data["source"]),
        data["proto"],
        data["port"],
        None if dest is None else ip_address(dest),
        data["expires"],
        data["user"],
    )


def key_from_json(data: dict[str, Any]) -> tuple:
    dest = data.get("destination")
    return (
        ip_address(data["source"]),
        data["proto"],
        data["port"],
        None if dest is None else ip_address(dest),
    )


def _listing(grants: list[Grant]) -> list[dict[str, Any]]:
    return [grant_to_json(grant) for grant in grants]


def run_ops(fw: Any, ops: list[list[Any]]) -> list[dict[str, Any]]:
    """Apply ``ops`` to ``fw``; one {"ok": ...} or {"error": ...} per op."""
    results: list[dict[str, Any]] = []
    for op, *args in ops:
        try:
            if op in ("setup", "teardown"):
                value = getattr(fw, op)()
            elif op == "grants":
                value = _listing(fw.grants())
            elif op == "open":  # the grant in force afterwards
                value = grant_to_json(fw.open(grant_from_json(args[0])))
            elif op == "close":  # [key] closes whoever holds it; [key, user] only the user's
                value = fw.close(key_from_json(args[0]), *args[1:])
            elif op == "reconcile":
                kept, removed = fw.reconcile(args[0])
                value = {"kept": _listing(kept), "removed": _listing(removed)}
            elif op == "expire":
                value = _listing(fw.expire(args[0]))
            elif op == "batch":  # [[action, grant], ...] -> the outcomes, as open/close give them
                changes = [GrantChange(Action[a.upper()], grant_from_json(g)) for a, g in args[0]]
                value = [
                    grant_to_json(o) if isinstance(o, Grant) else o
                    for o in fw.apply_batch(changes)
                ]
            elif op == "repair":
                restored = fw.repair()
                value = None if restored is None else _listing(restored)
            elif op == "commits":  # libiptc commits so far (both families)
                value = COMMITS[0]
            elif op == "sleep":
                time.sleep(args[0])
            elif op == "sh":
                done = subprocess.run(args[0], capture_output=True, text=True)
                value = {"rc": done.returncode, "out": done.stdout, "err": done.stderr}
            elif op == "race":
                value = _race(fw, *args)
            else:
                raise ValueError(f"unknown op {op!r}")
        except FirewallError as error:
            results.append({"error": str(error)})
        else:
            results.append({"ok": value})
    return results


def _race(fw: Any, argv: list[str], inner: list[Any]) -> dict[str, Any]:
    """Run ``inner`` with ``argv`` run once in the middle of its first table edit: after
    the backend re-read the table, before it commits (iptables backend only)."""
    original, done = fw._transaction, []

    def transaction(fam: Any, apply: Any) -> Any:
        def racing(table: Any) -> Any:
            result = apply(table)
            if not done:
                done.append(subprocess.run(argv, capture_output=True, text=True))
            return result

        return original(fam, racing)

    fw._transaction = transaction
    try:
        (result,) = run_ops(fw, [inner])
    finally:
        del fw._transaction
    return {"inner": result, "rc": done[0].returncode, "err": done[0].stderr.strip()}


COMMITS = [0]


def _count_commits() -> None:
    """Count libiptc commits (the op "commits"): python-iptables' Table(6).commit wrapped."""
    import iptc

    for cls in (iptc.Table, iptc.Table6):
        if "commit" not in cls.__dict__:  # Table6 inherits Table's
            continue
        original = cls.commit

        def commit(self: Any, original: Any = original) -> Any:
            COMMITS[0] += 1
            return original(self)

        cls.commit = commit


def _in_named_netns() -> bool:
    """Whether this process runs in a namespace made by ``ip netns add`` (not the host's)."""
    found = subprocess.run(["ip", "netns", "identify", str(os.getpid())], capture_output=True)
    return found.returncode == 0 and bool(found.stdout.strip())


def make_firewall(spec: dict[str, Any]) -> Any:
    options = {
        "chain": spec.get("chain", "KNOCKD-FAST"),
        "hooks": tuple(spec.get("hooks", ["INPUT"])),
        "families": tuple(spec.get("families", [4, 6])),
    }
    if spec.get("backend", "iptables") == "dry-run":
        return DryRunFirewall(**options)
    if not _in_named_netns():
        raise SystemExit("firewall_probe: refusing to run in the host's network namespace")
    _count_commits()
    if spec.get("backend") == "ipset":
        from knockd_fast.firewall.ipset import IpsetFirewall

        extra = {k: spec[k] for k in ("set_name", "maxelem") if k in spec}
        return IpsetFirewall(**options, **extra, lock_wait=spec.get("lock_wait", 5.0))
    from knockd_fast.firewall.iptables import IptablesFirewall

    return IptablesFirewall(**options, lock_wait=spec.get("lock_wait", 5.0))


def _populate(n: int, expires: int) -> None:
    """N grants from 198.18.0.0/15 in one iptables-legacy-restore (fast, one commit)."""
    lines = ["*filter"]
    for i in range(n):
        source = ip_address("198.18.0.0") + i
        lines.append(
            f"-A KNOCKD-FAST -s {source}/32 -p tcp -m tcp --dport 22 -m comment "
            f'--comment "knockd-fast user=bench expires={expires}" -j ACCEPT'
        )
    lines.append("COMMIT\n")
    subprocess.run(
        ["iptables-legacy-restore", "--noflush"], input="\n".join(lines), text=True, check=True
    )


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def bench(sizes: list[int], repeat: int) -> dict[str, Any]:
    fw = make_firewall({"families": [4]})
    expires = int(time.time()) + 86400
    out: dict[str, Any] = {}
    for n in sizes:
        fw.teardown()
        fw.setup()
        _populate(n, expires)
        t0 = time.perf_counter()
        listed = fw.grants()
        t_grants = time.perf_counter() - t0
        assert len(listed) == n, (len(listed), n)
        t0 = time.perf_counter()
        fw.reconcile(int(time.time()))
        t_reconcile = time.perf_counter() - t0
        adds, extends, closes = [], [], []
        for r in range(repeat):
            fresh = Grant(ip_address("203.0.113.1") + r, "tcp", 22, None, expires, "bench")
            t0 = time.perf_counter()
            fw.open(fresh)
            adds.append(time.perf_counter() - t0)
            old = listed[(n // 2 + r) % n]
            t0 = time.perf_counter()
            fw.open(Grant(old.source, "tcp", 22, None, expires + 60, "bench"))
            extends.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fw.close(fresh.key)
            closes.append(time.perf_counter() - t0)
        out[str(n)] = {
            "open_new_ms": _median_ms(adds),
            "open_extend_ms": _median_ms(extends),
            "close_ms": _median_ms(closes),
            "grants_ms": round(t_grants * 1000, 1),
            "reconcile_ms": round(t_reconcile * 1000, 1),
        }
    fw.teardown()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run")
    timing = sub.add_parser("bench")
    timing.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10000])
    timing.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    if args.command == "bench":
        print(json.dumps(bench(args.sizes, args.repeat)))
        return 0
    spec = json.load(sys.stdin)
    print(json.dumps(run_ops(make_firewall(spec), spec["ops"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
