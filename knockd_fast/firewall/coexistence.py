"""Whether the host's active firewall and the configured backend are of one kind.

The kernel runs two netfilter front ends side by side: the legacy xtables (what
python-iptables and `iptables-legacy` write) and nf_tables (what `nft`, firewalld and
Debian's own `iptables`, iptables-nft, write). A packet must pass both, so an accept in one
never overrides a drop in the other: a backend of one kind on a host whose firewall is the
other one grants ports that the host's own rules still drop. ``check-config`` and the start
of ``run`` say so (docs/admin.md, "Which backend").

Reading needs CAP_NET_ADMIN for nf_tables; without it (or without libnftables) the answer
is "unknown" and nothing is said.
"""

from __future__ import annotations

from pathlib import Path

from .registry import KINDS

# /proc/self/net, not its /proc/net symlink: the unit's ProcSubset=pid hides the latter.
LEGACY_TABLE_FILES = {
    "ip": Path("/proc/self/net/ip_tables_names"),
    "ip6": Path("/proc/self/net/ip6_tables_names"),
}


def legacy_tables() -> list[str]:
    """The legacy xtables tables in use in this network namespace, e.g. ``["ip filter"]``."""
    found = []
    for family, path in LEGACY_TABLE_FILES.items():
        try:
            names = path.read_text().split()
        except OSError:  # the module is not loaded: no legacy table at all
            continue
        found += [f"{family} {name}" for name in sorted(names)]
    return found


def nf_tables(ours: str | None = None) -> list[str] | None:
    """The nf_tables tables in this namespace (``"inet firewalld"``), ours (``inet OURS``)
    left out; None when they cannot be read (no libnftables, no CAP_NET_ADMIN)."""
    try:
        from .libnftables import OUTPUT_TERSE, Nft, NftError
    except ImportError:
        return None
    try:
        nft = Nft(OUTPUT_TERSE)
    except (NftError, OSError):
        return None
    try:
        listing = nft.run([{"list": {"tables": {}}}])
    except NftError:
        return None
    finally:
        nft.close()
    tables = [item["table"] for item in listing if "table" in item]
    return sorted(
        f"{t['family']} {t['name']}"
        for t in tables
        if not (ours is not None and t["family"] == "inet" and t["name"] == ours)
    )


def mismatch(backend: str, nft_table: str | None = None) -> str | None:
    """A one-line warning when the host has tables of the other kind than ``backend``
    writes; None when they agree, the backend writes nothing, or the host cannot be read."""
    kind = KINDS.get(backend)
    if kind is None:
        return None
    if kind == "legacy xtables":
        other, found = "nf_tables", nf_tables()
        advice = 'use backend = "nftables"'
    else:
        other, found = "legacy xtables", legacy_tables()
        advice = 'write your rules with nft, or use backend = "iptables"'
    if not found:
        return None
    return (
        f'grants.backend = "{backend}" writes {kind} rules, but this host also has '
        f"{other} tables ({', '.join(found)}): the kernel runs both, and a drop there still "
        f'drops what a grant accepts; {advice} (docs/admin.md, "Which backend")'
    )
