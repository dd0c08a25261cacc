"""Drive a firewall backend inside a network namespace (a helper script, not a test file).

    ip netns exec NS python tests/firewall_probe.py run < spec.json

``run`` reads {"backend", "chain", "hooks", "families", "lock_wait", "ops"} (and for
"nftables": "table", "protect" [[port, proto], ...], "sets_only", "priority"; for "ipset":
"set_name" and "maxelem") as JSON on
stdin, applies the ops in order to one firewall object (so its in-memory view lives
across them) and prints one JSON line: a list with {"ok": result} or {"error": text}
per op. Ops: ["setup"], ["teardown"], ["grants"], ["open", grant], ["close", key],
["reconcile", now], ["expire", now], ["repair"], ["batch", [[action, grant], ...]],
["commits"] (libiptc commits so far), ["sleep", seconds], ["sh", argv] to run a command in between
(e.g. ``iptables-legacy -D ...`` by hand), and ["race", argv, op] to run a command in
the middle of an op (between its re-read and its commit). Grants and keys are JSON.

bench/firewall_latency.py measures the backends (it builds them from a config).

Refuses to touch the iptables backend in the host's own network namespace.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from ipaddress import ip_address
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import netns  # noqa: E402  (this script's own folder: the namespace helper)

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
            elif op == "repair":  # the grants re-added, or None when all was in place
                restored = fw.repair()
                value = None if restored is None else _listing(restored)
            elif op == "batch":  # [[action, grant], ...]: "open" or "close" (grant or key)
                changes = [_change(*item) for item in args[0]]
                value = [
                    grant_to_json(out) if isinstance(out, Grant) else out
                    for out in fw.apply_batch(changes)
                ]
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


def _change(action: str, data: dict[str, Any]) -> GrantChange:
    if action == "open":
        return GrantChange(Action.OPEN, grant_from_json(data))
    full = {"expires": 0, "user": "", **data}
    return GrantChange(Action.CLOSE, grant_from_json(full))


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


def make_firewall(spec: dict[str, Any]) -> Any:
    options = {
        "chain": spec.get("chain", "KNOCKD-FAST"),
        "hooks": tuple(spec.get("hooks", ["INPUT"])),
        "families": tuple(spec.get("families", [4, 6])),
    }
    if spec.get("backend", "iptables") == "dry-run":
        return DryRunFirewall(**options)
    if not netns.in_named_namespace():
        raise SystemExit("firewall_probe: refusing to run in the host's network namespace")
    _count_commits()
    if spec.get("backend") == "ipset":
        from knockd_fast.firewall.ipset import IpsetFirewall

        extra = {k: spec[k] for k in ("set_name", "maxelem") if k in spec}
        return IpsetFirewall(**options, **extra, lock_wait=spec.get("lock_wait", 5.0))
    if spec.get("backend") == "nftables":
        from knockd_fast.firewall.nftables import NftablesFirewall

        return NftablesFirewall(
            spec.get("table", "knockd_fast"),
            options["hooks"],
            families=options["families"],
            protect=[tuple(item) for item in spec.get("protect", [])],
            sets_only=spec.get("sets_only", False),
            priority=spec.get("priority", -10),
        )
    from knockd_fast.firewall.iptables import IptablesFirewall

    return IptablesFirewall(**options, lock_wait=spec.get("lock_wait", 5.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    spec = json.load(sys.stdin)
    print(json.dumps(run_ops(make_firewall(spec), spec["ops"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
