"""``knockd-fast status``: whether the daemon runs, the live grants a backend holds, and the
counters the daemon last published (``metrics.prom`` in the state directory)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .decisions import iso_time
from .firewall.base import Grant

if TYPE_CHECKING:
    from .metrics import Published

# Counters older than this while the daemon runs: its loop has not turned for a while (it
# rewrites them every metrics.FILE_SECONDS).
STALE_SECONDS = 20


def _soonest_first(grants: Iterable[Grant], now: float) -> list[tuple[Grant, int]]:
    """Each grant with the seconds it has left at ``now``, soonest expiry first."""
    return [
        (grant, max(0, grant.expires - int(now)))
        for grant in sorted(grants, key=lambda g: g.expires)
    ]


def describe_grants(grants: Iterable[Grant], now: float) -> list[str]:
    """One line per grant, soonest expiry first, with the time it has left."""
    lines = []
    for grant, left in _soonest_first(grants, now):
        where = f" -> {grant.destination}" if grant.destination else ""
        lines.append(
            f"{grant.source}{where} {grant.port}/{grant.proto} user={grant.user} "
            f"expires in {left // 60}m{left % 60:02d}s ({iso_time(grant.expires)})"
        )
    return lines


def grants_json(grants: Iterable[Grant], now: float) -> list[dict[str, object]]:
    """``describe_grants`` as JSON objects, soonest expiry first."""
    return [
        {
            "source": str(grant.source),
            "destination": str(grant.destination) if grant.destination else None,
            "port": grant.port,
            "proto": grant.proto,
            "user": grant.user,
            "expires": iso_time(grant.expires),
            "seconds_left": left,
        }
        for grant, left in _soonest_first(grants, now)
    ]


def running_line(
    pid: int | None, unknown: str | None, state_dir: Path, backend: str, grants: bool
) -> str:
    """The first line: whether a daemon holds the state directory's lock, and what that
    means for the grants listed after it."""
    where = f"state directory {state_dir}, backend {backend}"
    if unknown is not None:
        return f"knockd-fast: cannot tell whether it runs ({where}): {unknown}"
    if pid is not None:
        return f"knockd-fast runs (pid {pid or 'unknown'}; {where})"
    # Every persistent backend ends a grant in the kernel at its expiry (a time match, a
    # set timeout), daemon or not; what stops is judging knocks and tidying up.
    after = (
        ": no knock is judged; the kernel still ends each grant below at its expiry"
        if grants
        else ": no knock is judged"
    )
    return f"knockd-fast is not running ({where}){after}"


def counters_lines(published: Published | None, path: Path, now: float, running: bool) -> list[str]:
    """The daemon's counters as its last ``metrics.prom`` has them: per interface, the
    judging and the firewall; or why there are none."""
    from .metrics import FILE_SECONDS

    if published is None:
        if running:
            return [f"counters: none yet (the daemon writes {path} every {FILE_SECONDS:.0f} s)"]
        return []
    age = max(0, int(now - published.time))
    if not running:
        when = f"the last the daemon wrote, at {iso_time(published.time)}"
    elif age > STALE_SECONDS:
        when = f"at {iso_time(published.time)}, {age} s old: the daemon's loop may be stuck"
    else:
        when = f"at {iso_time(published.time)} ({age} s ago)"
    lines = [f"counters {when}:"]
    for counters in published.interfaces:
        state = "captured" if counters.up else "LOST (retried every second)"
        lines.append(
            f"  {counters.interface}: {state}, {counters.packets} packets read, "
            f"{counters.dropped_by_kernel} dropped by the kernel, "
            f"{counters.dropped_by_interface} by the interface, "
            f"{counters.completions} messages"
        )
    verdicts: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for (verdict, reason), count in published.decisions.items():
        verdicts[verdict] = verdicts.get(verdict, 0) + count
        if verdict != "accepted":
            rejected[reason] = rejected.get(reason, 0) + count
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(rejected.items()))
    lines.append(
        f"  judged {sum(verdicts.values())}: accepted {verdicts.get('accepted', 0)}, rejected "
        f"{sum(rejected.values())}{f' ({reasons})' if reasons else ''}; backlog {published.backlog}"
        + ("; replay cache in memory only (see the log)" if published.replay_degraded else "")
    )
    changes = ", ".join(f"{change} {count}" for change, count in published.grant_changes.items())
    lines.append(
        f"  firewall {published.backend}: {published.grants} live grants; {changes}; "
        f"{published.firewall_failures} failures"
    )
    fleet = published.fleet
    if fleet is not None:
        claims, events = fleet["claims"], fleet["events"]
        state = "reached" if fleet["up"] else "UNREACHABLE (see the log)"
        lines.append(
            f"  fleet as gateway {fleet['gateway']}: redis {state}; claims new "
            f"{claims.get('new', 0)}, taken elsewhere {claims.get('taken', 0)}, late "
            f"{claims.get('unsent', 0)}; changes published {events.get('published', 0)}, "
            f"applied {events.get('applied', 0)}, rejected {events.get('rejected', 0)}; "
            f"{fleet['outages']} outages"
        )
    return lines


def counters_json(published: Published | None, now: float) -> dict[str, object] | None:
    """``counters_lines`` as one JSON object (None: no counters published)."""
    if published is None:
        return None
    return {
        "time": iso_time(published.time),
        "seconds_old": max(0, int(now - published.time)),
        "interfaces": [
            {
                "interface": c.interface,
                "up": c.up,
                "packets": c.packets,
                "dropped_by_kernel": c.dropped_by_kernel,
                "dropped_by_interface": c.dropped_by_interface,
                "completions": c.completions,
            }
            for c in published.interfaces
        ],
        "decisions": [
            {"verdict": verdict, "reason": reason, "count": count}
            for (verdict, reason), count in sorted(published.decisions.items())
        ],
        "backlog": published.backlog,
        "grants": published.grants,
        "grant_changes": dict(published.grant_changes),
        "firewall_failures": published.firewall_failures,
        "replay_degraded": published.replay_degraded,
        "fleet": published.fleet,
    }
