"""Backend names -> the classes that implement them, each imported on first use.

The one list of backends: ``knockd_fast.config`` takes the choices of ``grants.backend``
from here, and ``create`` builds the one configured. Adding a backend is its module plus one
line below. Nothing here imports a backend, so reading the config never loads libiptc.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from importlib import metadata
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from knockd_fast.config import GrantSettings
    from knockd_fast.firewall.base import Firewall, FirewallClass

BACKENDS: Mapping[str, str] = MappingProxyType(
    {
        "iptables": "knockd_fast.firewall.iptables:IptablesFirewall",
        "ipset": "knockd_fast.firewall.ipset:IpsetFirewall",
        "nftables": "knockd_fast.firewall.nftables:NftablesFirewall",
        "dry-run": "knockd_fast.firewall.dryrun:DryRunFirewall",
    }
)
NAMES = tuple(BACKENDS)
# Which netfilter front end each backend writes: python-iptables writes the legacy xtables;
# nf_tables is what `nft` and Debian's own `iptables` (iptables-nft) write. None: nothing.
KINDS: Mapping[str, str | None] = MappingProxyType(
    {
        "iptables": "legacy xtables",
        "ipset": "legacy xtables",
        "nftables": "nf_tables",
        "dry-run": None,
    }
)

# A backend's Python requirement whose wrong version imports fine and fails later: the
# ipset backend is written against pyroute2 0.9's IPSet (0.9 rewrote it), and Debian 12's
# python3-pyroute2 is 0.7.2, so its Debian package does not depend on it. Backend ->
# (distribution, lowest, first excluded, a note), as pyproject.toml pins it.
REQUIRES: Mapping[str, tuple[str, tuple[int, ...], tuple[int, ...], str]] = MappingProxyType(
    {"ipset": ("pyroute2", (0, 9, 7), (0, 10), "Debian 12's python3-pyroute2 is 0.7")}
)


def requirement_problem(name: str) -> str | None:
    """Why backend ``name`` cannot run with the installed packages, or None if it can."""
    if name not in REQUIRES:
        return None
    dist, low, high, note = REQUIRES[name]
    low_s, high_s = ".".join(map(str, low)), ".".join(map(str, high))
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        found = "not installed"
    else:
        numbers = tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3])
        if low <= numbers < high:
            return None
        found = f"{version} installed"
    return (
        f"the {name} backend needs {dist} >= {low_s}, < {high_s} ({found}; {note}): "
        f"pip install '{dist}>={low_s},<{high_s}' into the daemon's Python, or use "
        'grants.backend = "nftables" or "iptables"'
    )


def backend_class(name: str) -> FirewallClass:
    """The class of backend ``name`` (its module is imported now); ValueError if unknown,
    FirewallError if the packages it needs are missing or of the wrong version."""
    try:
        module_name, class_name = BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown firewall backend {name!r} (known: {', '.join(NAMES)})") from None
    problem = requirement_problem(name)
    if problem:
        from knockd_fast.firewall.base import FirewallError

        raise FirewallError(problem)
    return getattr(importlib.import_module(module_name), class_name)


def create(settings: GrantSettings) -> Firewall:
    """The backend ``settings.backend`` names, built from the ``[grants]`` settings."""
    return backend_class(settings.backend).from_settings(settings)
