"""``knockd-fast status``: whether the daemon runs, and the live grants a backend holds."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .decisions import iso_time
from .firewall.base import Grant


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
