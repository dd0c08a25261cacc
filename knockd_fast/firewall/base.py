"""The firewall interface every backend implements, and the grant it deals in.

A grant lets one source address reach one port (tcp or udp) until a unix time, on any
local address or on one destination address. Its identity, ``Grant.key``, leaves the
expiry out: opening the same key again extends the grant instead of adding a second one.

A grant counts as expired once ``expires <= now``: it lives for ``[opened, expires)``.

Backends keep grants where the kernel (or, for the dry run, memory) keeps them, and tag
each rule with a comment ``knockd-fast user=NAME expires=UNIX`` (``format_comment``), so
that a restarted daemon reads its live grants back from the rules (``parse_comment``).
The user name is percent-encoded in the comment: the config allows any printable name,
an iptables comment is one word-safe line of at most 255 bytes.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Protocol, runtime_checkable
from urllib.parse import quote, unquote

IPAddress = IPv4Address | IPv6Address
GrantKey = tuple[IPAddress, str, int, IPAddress | None]
"""(source, proto, port, destination): what identifies a grant; the expiry is not part of it."""

PROTOCOLS = ("tcp", "udp")
HOOKS = ("INPUT", "FORWARD")
DEFAULT_CHAIN = "KNOCKD-FAST"
COMMENT_PREFIX = "knockd-fast"
MAX_COMMENT_BYTES = 255  # xt_comment: 256 bytes with the terminating NUL
MAX_EXPIRES = 2**63 - 1

_CHAIN_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,28}")
_RESERVED_CHAINS = frozenset(
    {"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING", "ACCEPT", "DROP", "RETURN", "QUEUE"}
)
_COMMENT_PATTERN = re.compile(rf"{COMMENT_PREFIX} user=(\S*) expires=(0|[1-9][0-9]{{0,18}})")
# Kept as they are (quote() also keeps A-Z a-z 0-9 _ . - ~). Not "'": python-iptables
# re-parses match options through shlex (final_check), which mangles it to "\\'".
_USER_SAFE = "@+:,;=/!$&()*"


class FirewallError(Exception):
    """A firewall operation failed; ``str()`` is one line: backend, operation and cause.

    For example ``iptables: add grant 198.51.100.7 22/tcp: xtables lock held by another
    process (waited 5.0 s)``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class FirewallBusy(FirewallError):
    """The firewall is locked by another process (the xtables lock) past our wait.

    Retrying later may succeed; repairing anything will not help.
    """


@dataclass(frozen=True)
class Grant:
    """One opened port for one source, until ``expires`` (unix seconds)."""

    source: IPAddress
    proto: str  # "tcp" | "udp"
    port: int
    destination: IPAddress | None  # None = any local address
    expires: int  # unix seconds
    user: str  # user name, for the comment

    def __post_init__(self) -> None:
        for name in ("source", "destination"):
            value = getattr(self, name)
            if isinstance(value, str):  # convenience: accept "192.0.2.1", store the address
                object.__setattr__(self, name, ip_address(value))
            elif not (value is None and name == "destination") and not isinstance(
                value, IPv4Address | IPv6Address
            ):
                raise ValueError(f"grant {name} {value!r} is not an IP address")
        if self.destination is not None and self.destination.version != self.source.version:
            raise ValueError(
                f"grant source {self.source} and destination {self.destination} "
                "are of different address families"
            )
        if self.proto not in PROTOCOLS:
            raise ValueError(f"grant protocol {self.proto!r} is not one of tcp, udp")
        port, expires = _integer(self.port), _integer(self.expires)
        if port is None or not 1 <= port <= 65535:
            raise ValueError(f"grant port {self.port!r} is not in 1..65535")
        if expires is None or not 0 <= expires <= MAX_EXPIRES:
            raise ValueError(f"grant expiry {self.expires!r} is not a unix time in seconds")
        object.__setattr__(self, "port", port)  # a plain int, also from a numpy integer
        object.__setattr__(self, "expires", expires)
        if not isinstance(self.user, str) or not self.user.isprintable():
            raise ValueError(f"grant user {self.user!r} is not a printable name")
        # Quoting makes a character at most 12 bytes (%XX of 4 UTF-8 bytes); most names
        # are far too short to matter, so the comment is only built for long ones.
        if 12 * len(self.user) + 40 > MAX_COMMENT_BYTES and (
            len(format_comment(self).encode()) > MAX_COMMENT_BYTES
        ):
            raise ValueError(f"grant user name {self.user[:40]!r}... is too long for a comment")

    @property
    def key(self) -> GrantKey:
        return (self.source, self.proto, self.port, self.destination)

    @property
    def family(self) -> int:
        """4 or 6."""
        return self.source.version

    def expired(self, now: int) -> bool:
        return self.expires <= now

    def __str__(self) -> str:
        return f"{format_key(self.key)} user={self.user} expires={self.expires}"


def _integer(value: object) -> int | None:
    """``value`` as a plain int if it is an integer (numpy's too), but not a bool."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def format_key(key: GrantKey) -> str:
    """``198.51.100.7 22/tcp``, or ``198.51.100.7 -> 192.0.2.1 22/tcp`` with a destination."""
    source, proto, port, destination = key
    to = f" -> {destination}" if destination is not None else ""
    return f"{source}{to} {port}/{proto}"


def sort_key(grant: Grant) -> tuple:
    """Stable order for listings: family, source, protocol, port, destination."""
    dest = grant.destination
    return (
        grant.family,
        grant.source,
        grant.proto,
        grant.port,
        dest is not None,
        dest or grant.source,
    )


def format_comment(grant: Grant) -> str:
    """The rule comment that carries a grant's user and expiry."""
    return f"{COMMENT_PREFIX} user={quote(grant.user, safe=_USER_SAFE)} expires={grant.expires}"


def parse_comment(text: str) -> tuple[str, int] | None:
    """(user, expires) from a comment written by ``format_comment``; None if it is not one."""
    match = _COMMENT_PATTERN.fullmatch(text)
    if match is None:
        return None
    try:
        user = unquote(match.group(1), errors="strict")
    except UnicodeDecodeError:
        return None
    if not user.isprintable():
        return None
    return user, int(match.group(2))


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


def check_families(families: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    families = tuple(families)
    if not families or not set(families) <= {4, 6} or len(set(families)) != len(families):
        raise ValueError(f"families {families!r}: one or both of 4, 6, each once")
    return families


@runtime_checkable
class Firewall(Protocol):
    """What the daemon needs from a backend. All methods raise only ``FirewallError``."""

    def setup(self) -> None:
        """Create our chain (IPv4 and IPv6) and a jump to it at the top of each hook, if
        missing; idempotent."""

    def grants(self) -> list[Grant]:
        """The grants in our chain, read back from the backend (both families)."""

    def open(self, grant: Grant) -> None:
        """Add ``grant``, or replace the expiry (and user) of the grant with the same key."""

    def close(self, key: GrantKey) -> bool:
        """Remove the grant with ``key``; False if there is none."""

    def reconcile(self, now: int) -> tuple[list[Grant], list[Grant]]:
        """At start: remove expired grants and unparsable rules in our chain; (kept, removed)."""

    def expire(self, now: int) -> list[Grant]:
        """Remove the grants whose expiry has come; returns them."""

    def teardown(self) -> None:
        """Remove the jumps and our chain (tests, uninstall; not called at daemon stop)."""
