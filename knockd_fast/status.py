"""``knockd-fast status``: the live grants a backend holds, as lines for a person."""

from __future__ import annotations

from collections.abc import Iterable

from .decisions import iso_time
from .firewall.base import Grant


def describe_grants(grants: Iterable[Grant], now: float) -> list[str]:
    """One line per grant, soonest expiry first, with the time it has left."""
    lines = []
    for grant in sorted(grants, key=lambda g: g.expires):
        left = max(0, grant.expires - int(now))
        where = f" -> {grant.destination}" if grant.destination else ""
        lines.append(
            f"{grant.source}{where} {grant.port}/{grant.proto} user={grant.user} "
            f"expires in {left // 60}m{left % 60:02d}s ({iso_time(grant.expires)})"
        )
    return lines
