"""What the backends that write the legacy xtables share: python-iptables (``iptc``) plumbing.

The iptables backend (a rule per grant) and the ipset backend (a rule per set, grants in
the sets) both keep our chain (``KNOCKD-FAST`` by default) in the filter table of each
family, with an unconditional jump to it as the first rule of each hook (INPUT and/or
FORWARD). ``XtablesBackend`` holds that part: the chain and the jumps (``_setup``,
``_teardown``, ``_in_place``), the xtables lock, and the transaction (re-read the table,
edit libiptc's copy, commit once, redo if the kernel refused because the table changed).

Which firewall this is (GUIDE section 5): ``iptc`` drives the legacy xtables through
libiptc; its rules show in ``iptables-legacy -S``, not in Debian's default ``iptables``
(the nf_tables variant). A packet must pass both: keep the default-drop rule for the
knocked ports in the legacy tables too.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, ClassVar

import iptc
from iptc.ip4tc import IPTCError, ipt_entry, ipt_ip
from iptc.ip6tc import ip6t_entry, ip6t_ip6
from iptc.xtables import XTablesError, xt_align

from knockd_fast.firewall.base import FirewallBusy, FirewallError, check_families
from knockd_fast.firewall.xtables import DEFAULT_CHAIN, HOOKS, check_chain, check_hooks

log = logging.getLogger("knockd_fast.firewall")

DEFAULT_LOCK_PATH = "/run/xtables.lock"


@dataclass(frozen=True)
class Family:
    """Where the fields of one family's ``ipt_entry`` / ``ip6t_entry`` are."""

    version: int
    table_cls: Any
    rule_cls: Any
    bits: int
    addr_len: int
    src: int
    dst: int
    smsk: int
    dmsk: int
    ifaces: int  # start of iniface, outiface and their masks
    proto: int
    flags: int
    invflags: int
    tos: int | None
    proto_flags: int  # the value of `flags` in a rule with `-p tcp|udp` and nothing else
    target_offset: int  # where the entry's own target_offset field is
    entry_size: int

    def table(self) -> Any:
        return self.table_cls(self.table_cls.FILTER, autocommit=False)


def _family(version: int) -> Family:
    if version == 4:
        ip, off, rule_cls, table_cls = ipt_ip, ipt_entry.ip.offset, iptc.Rule, iptc.Table
        entry, addr_len, tos, proto_flags = ipt_entry, 4, None, 0
    else:
        ip, off, rule_cls, table_cls = ip6t_ip6, ip6t_entry.ipv6.offset, iptc.Rule6, iptc.Table6
        entry, addr_len, proto_flags = ip6t_entry, 16, ip6t_ip6.IP6T_F_PROTO
        tos = off + ip.tos.offset
    return Family(
        version=version,
        table_cls=table_cls,
        rule_cls=rule_cls,
        bits=addr_len * 8,
        addr_len=addr_len,
        src=off + ip.src.offset,
        dst=off + ip.dst.offset,
        smsk=off + ip.smsk.offset,
        dmsk=off + ip.dmsk.offset,
        ifaces=off + ip.iniface.offset,
        proto=off + ip.proto.offset,
        flags=off + ip.flags.offset,
        invflags=off + ip.invflags.offset,
        tos=tos,
        proto_flags=proto_flags,
        target_offset=entry.target_offset.offset,
        entry_size=xt_align(ct.sizeof(entry)),
    )


FAMILIES = {4: _family(4), 6: _family(6)}


class Cause(Exception):
    """A failure whose text is the cause part of a FirewallError."""


class Busy(Cause):
    """The xtables lock stayed held by another process for the whole wait."""


def cause(error: BaseException) -> str:
    text = str(error)
    # python-iptables formats libiptc's message as bytes: "...: b'Bad rule (...)'"
    for quote in ("'", '"'):
        text = text.replace(f"b{quote}", "").replace(quote, "")
    return " ".join(text.split()) or type(error).__name__


def target_offset(fam: Family, raw: bytes) -> int:
    return struct.unpack_from("=H", raw, fam.target_offset)[0]


def is_jump(fam: Family, raw: bytes, target: str | None, chain: str) -> bool:
    """Whether an entry is an unconditional ``-j chain``."""
    return (
        target == chain
        and target_offset(fam, raw) == fam.entry_size
        and not any(raw[: fam.invflags + 1])
    )


def entries(table: Any, chain: str) -> Iterator[tuple[bytes, Any]]:
    """(raw bytes, libiptc entry) of each rule of a chain, in order."""
    entry = table.first_rule(chain)
    while entry:
        yield ct.string_at(ct.addressof(entry), entry.next_offset), entry
        entry = table.next_rule(entry)


def target_of(table: Any, entry: Any) -> str | None:
    """The target of an entry: ACCEPT, DROP, a chain name, LOG..."""
    name = table.get_target(entry)
    return name.decode() if name else None


def delete_at(table: Any, chain: str, index: int) -> None:
    """Delete rule ``index`` (0-based) of ``chain`` in libiptc's copy of the table.

    python-iptables binds ``iptc_delete_num_entry`` but has no method for it; deleting by
    number is exact and avoids building an iptc ``Rule`` per deleted entry.
    """
    if table._iptc.iptc_delete_num_entry(chain.encode(), index, table._handle) != 1:
        raise IPTCError(f"can't delete rule {index + 1} of chain {chain}: {table.strerror()}")


class XtablesLock:
    """The lock ``iptables -w`` takes: flock on a file shared by all xtables tools."""

    def __init__(self, path: str | os.PathLike[str], wait: float) -> None:
        self.path = os.fspath(path)
        self.wait = wait

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + self.wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise Busy(
                            f"xtables lock held by another process (waited {self.wait:g} s)"
                        ) from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the lock


class XtablesBackend:
    """Our chain in the filter table of each family and the jumps to it from the hooks.

    ``hooks``: the built-in chains that jump to ours first (INPUT for local services,
    FORWARD for hosts behind this one). ``families``: 4, 6 or both. ``lock_path``: the
    xtables lock file (None: ``$XTABLES_LOCKFILE`` or ``/run/xtables.lock``), waited for
    at most ``lock_wait`` seconds (``WaitsForLock``: the daemon shortens it once started),
    else ``FirewallBusy``. ``retries``: how often an operation is redone when the
    kernel refuses the commit because the table changed meanwhile.

    A subclass names itself (``name``, the prefix of its errors) and says, with
    ``_static_rules``, whether the chain holds a fixed list of rules (the ipset backend's)
    or rules of its own making that ``_setup`` leaves alone (None: the iptables backend's).
    """

    name: ClassVar[str]

    def __init__(
        self,
        chain: str = DEFAULT_CHAIN,
        hooks: tuple[str, ...] = ("INPUT",),
        *,
        families: tuple[int, ...] = (4, 6),
        lock_path: str | os.PathLike[str] | None = None,
        lock_wait: float = 5.0,
        retries: int = 3,
    ) -> None:
        self.chain = check_chain(chain)
        self.hooks = check_hooks(hooks)
        self.families = check_families(families)
        if lock_path is None:
            lock_path = os.environ.get("XTABLES_LOCKFILE") or DEFAULT_LOCK_PATH
        self._lock = XtablesLock(lock_path, lock_wait)
        self._retries = retries
        self._fams = [FAMILIES[version] for version in self.families]
        self._mutex = threading.RLock()

    @property
    def lock_wait(self) -> float:
        """Seconds one operation waits for the xtables lock before ``FirewallBusy``."""
        return self._lock.wait

    @lock_wait.setter
    def lock_wait(self, seconds: float) -> None:
        self._lock.wait = float(seconds)

    def _static_rules(self, fam: Family) -> list[Any] | None:
        """The iptc rules our chain holds, exactly and in order; None: not ours to fix."""
        return None

    # -- one family's table: each returns (changed, result) --------------------------------

    def _setup(self, fam: Family, table: Any) -> tuple[bool, None]:
        """Create the chain (and its static rules) and put the jumps first, if missing."""
        changed = False
        if not table.is_chain(self.chain):
            table.create_chain(self.chain)
            changed = True
        wanted_rules = self._static_rules(fam)
        if wanted_rules is not None:
            chain = iptc.Chain(table, self.chain)
            if chain.rules != wanted_rules:
                table.flush_entries(self.chain)
                for rule in wanted_rules:
                    chain.append_rule(rule)
                changed = True
        for hook in HOOKS:
            jumps = [
                index
                for index, (raw, entry) in enumerate(entries(table, hook))
                if is_jump(fam, raw, target_of(table, entry), self.chain)
            ]
            wanted = hook in self.hooks
            if jumps == ([0] if wanted else []):
                continue
            for index in reversed(jumps):
                delete_at(table, hook, index)
            if wanted:
                jump = fam.rule_cls()
                jump.target = iptc.Target(jump, self.chain)
                iptc.Chain(table, hook).insert_rule(jump, 0)
            changed = True
        return changed, None

    def _in_place(self, fam: Family, table: Any) -> bool:
        """Cheap check of what ``_setup`` makes: the chain, its static rules, and each
        hook's first rule the jump to it (a stale jump lower down is left to ``setup``)."""
        if not table.is_chain(self.chain):
            return False
        wanted_rules = self._static_rules(fam)
        if wanted_rules is not None and iptc.Chain(table, self.chain).rules != wanted_rules:
            return False
        for hook in self.hooks:
            first = next(entries(table, hook), None)
            if first is None or not is_jump(fam, first[0], target_of(table, first[1]), self.chain):
                return False
        return True

    def _teardown(self, fam: Family, table: Any) -> tuple[bool, None]:
        if not table.is_chain(self.chain):
            return False, None
        for other in [c.name for c in table.chains if c.name != self.chain]:
            hits = [
                index
                for index, (_, entry) in enumerate(entries(table, other))
                if target_of(table, entry) == self.chain
            ]
            for index in reversed(hits):
                delete_at(table, other, index)
        table.flush_entries(self.chain)
        table.delete_chain(self.chain)
        return True, None

    # -- helpers ---------------------------------------------------------------------------

    def _chains_in_place(self) -> bool:
        """Whether every family's chain and jumps are in place (reads, takes no lock)."""
        for fam in self._fams:
            table = fam.table()
            table.refresh()
            if not self._in_place(fam, table):
                return False
        return True

    @contextlib.contextmanager
    def _op(self, what: str, lock: bool) -> Iterator[None]:
        try:
            with self._mutex, self._lock.hold() if lock else contextlib.nullcontext():
                yield
        except Busy as error:
            raise FirewallBusy(f"{self.name}: {what}: {error}") from None
        except Cause as error:
            raise FirewallError(f"{self.name}: {what}: {error}") from None
        except (IPTCError, XTablesError, OSError) as error:
            raise FirewallError(f"{self.name}: {what}: {cause(error)}") from error

    def _transaction(self, fam: Family, apply: Callable[[Any], tuple[bool, Any]]) -> Any:
        """Re-read the table, let ``apply`` edit libiptc's copy, commit once if it changed."""
        for attempt in range(self._retries + 1):
            table = fam.table()
            table.refresh()
            changed, result = apply(table)
            if changed:
                try:
                    table.commit()
                except IPTCError as error:
                    if "temporarily unavailable" in str(error) and attempt < self._retries:
                        log.debug("IPv%d table changed during our commit; redoing", fam.version)
                        continue
                    raise
            return result
        raise AssertionError("unreachable")

    def _need_chain(self, fam: Family, table: Any) -> None:
        if not table.is_chain(self.chain):
            raise Cause(
                f"chain {self.chain} is missing from the IPv{fam.version} filter table "
                "(setup() not called, or removed by hand)"
            )

    def _family_of(self, address: IPv4Address | IPv6Address, what: str) -> Family:
        if address.version not in self.families:
            raise FirewallError(
                f"{self.name}: {what}: IPv{address.version} is not enabled "
                f"(families {', '.join(map(str, self.families))})"
            )
        return FAMILIES[address.version]
