"""Firewall backends: where grants become rules.

``base`` holds the seam (``Grant``, ``GrantChange``, the ``Firewall`` protocol and its
capabilities), ``registry`` the backend names, ``worker`` the thread that applies changes;
one module per backend: ``iptables`` (python-iptables, legacy xtables), ``nftables``
(timeout sets through libnftables) and ``dryrun``
(memory only). The iptables backend is imported on first use, so the dry run and the tests
of it need no libiptc.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knockd_fast.firewall.base import (
    Firewall,
    FirewallBusy,
    FirewallError,
    Grant,
    GrantChange,
    GrantKey,
    WaitsForLock,
    format_comment,
    format_key,
    parse_comment,
)
from knockd_fast.firewall.dryrun import DryRunFirewall
from knockd_fast.firewall.registry import backend_class, create
from knockd_fast.firewall.xtables import DEFAULT_CHAIN

if TYPE_CHECKING:
    from knockd_fast.firewall.iptables import IptablesFirewall

__all__ = [
    "DEFAULT_CHAIN",
    "DryRunFirewall",
    "Firewall",
    "FirewallBusy",
    "FirewallError",
    "Grant",
    "GrantChange",
    "GrantKey",
    "IptablesFirewall",
    "WaitsForLock",
    "backend_class",
    "create",
    "format_comment",
    "format_key",
    "parse_comment",
]


def __getattr__(name: str) -> Any:
    if name == "IptablesFirewall":
        from knockd_fast.firewall.iptables import IptablesFirewall

        return IptablesFirewall
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
