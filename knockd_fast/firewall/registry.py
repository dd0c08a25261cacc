"""Backend names -> the classes that implement them, each imported on first use.

The one list of backends: ``knockd_fast.config`` takes the choices of ``grants.backend``
from here, and ``create`` builds the one configured. Adding a backend is its module plus one
line below. Nothing here imports a backend, so reading the config never loads libiptc.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
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


def backend_class(name: str) -> FirewallClass:
    """The class of backend ``name`` (its module is imported now); ValueError if unknown."""
    try:
        module_name, class_name = BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown firewall backend {name!r} (known: {', '.join(NAMES)})") from None
    return getattr(importlib.import_module(module_name), class_name)


def create(settings: GrantSettings) -> Firewall:
    """The backend ``settings.backend`` names, built from the ``[grants]`` settings."""
    return backend_class(settings.backend).from_settings(settings)
