"""The firewall seam: the grant, the change the daemon asks for, the interface every backend
implements, and the optional capabilities a backend may have.

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

import functools
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Protocol, runtime_checkable
from urllib.parse import quote, unquote

from knock_client.protocol import Action

if TYPE_CHECKING:
    from typing import Self

    from knockd_fast.config import GrantSettings

IPAddress = IPv4Address | IPv6Address
GrantKey = tuple[IPAddress, str, int, IPAddress | None]
"""(source, proto, port, destination): what identifies a grant; the expiry is not part of it."""

PROTOCOLS = ("tcp", "udp")
COMMENT_PREFIX = "knockd-fast"
MAX_COMMENT_BYTES = 255  # xt_comment: 256 bytes with the terminating NUL
MAX_EXPIRES = 2**63 - 1
_ADDRESS_TYPES = (IPv4Address, IPv6Address)

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
        # Every accepted knock makes one: the usual types are checked first, cheaply.
        source, destination = self.source, self.destination
        if type(source) not in _ADDRESS_TYPES:
            source = self._address("source", source)
        if type(destination) not in _ADDRESS_TYPES and destination is not None:
            destination = self._address("destination", destination)
        if destination is not None and destination.version != source.version:
            raise ValueError(
                f"grant source {source} and destination {destination} "
                "are of different address families"
            )
        if self.proto not in PROTOCOLS:
            raise ValueError(f"grant protocol {self.proto!r} is not one of tcp, udp")
        port = self.port if type(self.port) is int else _integer(self.port)
        if port is None or not 1 <= port <= 65535:
            raise ValueError(f"grant port {self.port!r} is not in 1..65535")
        expires = self.expires if type(self.expires) is int else _integer(self.expires)
        if expires is None or not 0 <= expires <= MAX_EXPIRES:
            raise ValueError(f"grant expiry {self.expires!r} is not a unix time in seconds")
        if port is not self.port or expires is not self.expires:
            object.__setattr__(self, "port", port)  # plain ints, also from numpy integers
            object.__setattr__(self, "expires", expires)
        if type(self.user) is not str or not self.user.isprintable():
            raise ValueError(f"grant user {self.user!r} is not a printable name")
        # Quoting makes a character at most 12 bytes (%XX of 4 UTF-8 bytes); most names
        # are far too short to matter, so the comment is only built for long ones.
        if 12 * len(self.user) + 40 > MAX_COMMENT_BYTES and (
            len(format_comment(self).encode()) > MAX_COMMENT_BYTES
        ):
            raise ValueError(f"grant user name {self.user[:40]!r}... is too long for a comment")

    def _address(self, name: str, value: object) -> IPAddress:
        """``value`` (an address, or its text) as the address stored as ``name``."""
        if isinstance(value, str):  # convenience: accept "192.0.2.1", store the address
            address = ip_address(value)
        elif isinstance(value, IPv4Address | IPv6Address):  # a subclass
            address = value
        else:
            raise ValueError(f"grant {name} {value!r} is not an IP address")
        object.__setattr__(self, name, address)
        return address

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
    return f"{COMMENT_PREFIX} user={_quoted(grant.user)} expires={grant.expires}"


@functools.lru_cache(maxsize=4096)
def _quoted(user: str) -> str:
    # A few users make every grant: quote() costs more than the rest of the comment.
    return quote(user, safe=_USER_SAFE)


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


def check_families(families: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    families = tuple(families)
    if not families or not set(families) <= {4, 6} or len(set(families)) != len(families):
        raise ValueError(f"families {families!r}: one or both of 4, 6, each once")
    return families


class GrantChange(NamedTuple):
    """What the daemon asks of the firewall for one accepted knock: open (or extend) or close."""

    action: Action  # knock_client.protocol.Action.OPEN or .CLOSE
    grant: Grant  # for CLOSE only its key counts
    # None: this gateway decided it; else the fleet gateway that did (docs/admin.md, "A
    # fleet of gateways"): applied here, never published again.
    origin: str | None = None


@runtime_checkable
class Firewall(Protocol):
    """Everything the daemon uses of a backend. All methods raise only ``FirewallError``.

    A backend is one module and one line in ``knockd_fast.firewall.registry``; its class
    also has ``from_settings`` (``FirewallClass``). What only some backends can do is one of
    the small capability protocols below, asked with ``isinstance``, never by attribute
    probing.
    """

    name: ClassVar[str]  # the ``grants.backend`` value that selects it
    # Whether grants outlive this process (kernel rules another process, `knockd-fast
    # status`, can read back). False for the dry run, whose grants live in its memory.
    persistent: ClassVar[bool]

    def setup(self) -> None:
        """Create what the grants live in (our chain, set or table) and what makes the kernel
        consult it, if missing; idempotent: commits nothing when all is in place."""

    def grants(self) -> list[Grant]:
        """The live grants, read back from the backend (both families)."""

    def open(self, grant: Grant) -> Grant:
        """Add ``grant``, or extend the grant with the same key to its expiry (and user);
        never shorten one: a grant held until later stays as it is. Returns the grant in
        force."""

    def close(self, key: GrantKey, user: str | None = None) -> bool:
        """Remove the grant with ``key`` if ``user`` holds it (None: whoever does); False if
        there is none of theirs: another user's knock never closes a grant."""

    def reconcile(self, now: int) -> tuple[list[Grant], list[Grant]]:
        """At start: remove expired grants and entries that are no grant; (kept, removed)."""

    def expire(self, now: int) -> list[Grant]:
        """Remove the grants whose expiry has come; returns them."""

    def teardown(self) -> None:
        """Remove everything ``setup`` made (tests, uninstall; not called at daemon stop)."""


class FirewallClass(Protocol):
    """A backend class as the registry sees it: built from the ``[grants]`` settings."""

    def from_settings(self, settings: GrantSettings) -> Self:
        """The backend the daemon and ``status`` use for this configuration."""


@runtime_checkable
class WaitsForLock(Protocol):
    """A backend that waits for a lock shared with other tools (the xtables lock).

    The daemon shortens the wait once it runs, so that another process holding the lock
    stalls the firewall thread (and the expiry sweep) only briefly per change.
    """

    lock_wait: float  # seconds one operation waits for the lock before ``FirewallBusy``


ChangeOutcome = Grant | bool
"""What one change did: the grant in force after an open (as ``Firewall.open`` returns it),
or whether a close removed a grant (as ``Firewall.close`` returns it)."""


@runtime_checkable
class AppliesBatches(Protocol):
    """A backend that carries out many changes as one kernel transaction.

    The firewall thread hands it everything waiting (at most ``MAX_BATCH`` at a time) in one
    call: one commit per judging slice instead of one per grant.
    """

    def apply_batch(self, changes: Sequence[GrantChange]) -> list[ChangeOutcome]:
        """Carry out ``changes`` in order, with the semantics of ``open`` and ``close`` one
        by one, as one transaction; the outcome of each, in order. All or nothing: after a
        ``FirewallError`` the kernel holds what it held before (the thread then retries the
        changes one by one)."""


@runtime_checkable
class SelfHealing(Protocol):
    """A backend that can tell, cheaply, whether what ``setup`` made is still in place.

    Someone may flush the ruleset, destroy our sets or reload firewalld: the firewall thread
    asks every sweep (each second) and logs what was repaired.
    """

    def repair(self) -> list[Grant] | None:
        """None when everything ``setup`` made is in place; otherwise re-create it, re-add
        the live grants this backend knows of (those not expired) and return them."""


MAX_BATCH = 4096  # changes in one transaction: bounds the time one commit holds the kernel
