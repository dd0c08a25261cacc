"""Firewall backends: where grants become rules.

``Firewall`` is the interface the daemon uses; ``IptablesFirewall`` (python-iptables,
legacy xtables) and ``DryRunFirewall`` (memory only) implement it. The iptables backend
is imported on first use, so the dry run and the tests of it need no libiptc.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knockd_fast.firewall.base import (
    DEFAULT_CHAIN,
    Firewall,
    FirewallBusy,
    FirewallError,
    Grant,
    GrantKey,
    format_comment,
    format_key,
    parse_comment,
)
from knockd_fast.firewall.dryrun import DryRunFirewall

if TYPE_CHECKING:
    from knockd_fast.firewall.iptables import IptablesFirewall

__all__ = [
    "DEFAULT_CHAIN",
    "DryRunFirewall",
    "Firewall",
    "FirewallBusy",
    "FirewallError",
    "Grant",
    "GrantKey",
    "IptablesFirewall",
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


def create(backend: str, chain: str = DEFAULT_CHAIN, hooks=("INPUT",), **options: Any) -> Firewall:
    """The backend named in the config (``grants.backend``): "iptables" or "dry-run"."""
    if backend == "iptables":
        from knockd_fast.firewall.iptables import IptablesFirewall

        return IptablesFirewall(chain, tuple(hooks), **options)
    if backend == "dry-run":
        return DryRunFirewall(chain, tuple(hooks), **options)
    raise ValueError(f"unknown firewall backend {backend!r}")
