"""Names in the legacy xtables: our chain and the built-in chains (hooks) that jump to it.

The iptables backend's rules, which the dry run imitates; ``knockd_fast.config`` checks
``grants.chain`` and ``grants.hooks`` with them before anything starts.
"""

from __future__ import annotations

import re

HOOKS = ("INPUT", "FORWARD")
DEFAULT_CHAIN = "KNOCKD-FAST"

_CHAIN_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,28}")  # xtables: 29 bytes with the NUL
_RESERVED_CHAINS = frozenset(
    {"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING", "ACCEPT", "DROP", "RETURN", "QUEUE"}
)


def check_chain(chain: str) -> str:
    if not isinstance(chain, str) or not _CHAIN_PATTERN.fullmatch(chain):
        raise ValueError(f"chain name {chain!r}: 1..28 characters of A-Z a-z 0-9 _ -")
    if chain in _RESERVED_CHAINS:
        raise ValueError(f"chain name {chain!r} is a built-in chain or target")
    return chain


def check_hooks(hooks: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    hooks = tuple(hooks)
    if not hooks or any(hook not in HOOKS for hook in hooks) or len(set(hooks)) != len(hooks):
        raise ValueError(f"hooks {hooks!r}: one or both of INPUT, FORWARD, each once")
    return hooks
