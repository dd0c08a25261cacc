"""The iptables backend: python-iptables (``iptc``), i.e. libiptc, the LEGACY xtables.

Which firewall this is (GUIDE section 5). ``iptc`` drives the legacy xtables through
libiptc: its rules show in ``iptables-legacy -S`` / ``ip6tables-legacy -S``, not in
Debian's default ``iptables`` (the nf_tables variant). Both families of hooks are live in
the kernel at once and a packet must pass both: a drop in either wins. So keep the
default-drop rule for the knocked ports and our grants in the same family, that is,
write the drop with ``iptables-legacy`` / ``ip6tables-legacy``. A drop written with the
nft variant would still drop a granted packet. Native nftables support is a later step.

What is in the kernel. A chain (``KNOCKD-FAST`` by default) in the filter table of both
families, an unconditional jump to it as the first rule of each hook (INPUT and/or
FORWARD), and one ACCEPT rule per grant::

    -A KNOCKD-FAST -s 192.0.2.2/32 [-d 192.0.2.1/32] -p tcp -m tcp --dport 22
        -m comment --comment "knockd-fast user=alice expires=1700000000"
        -m time --datestop 2023-11-14T22:13:19 -j ACCEPT

The time match carries the expiry into the kernel: the rule stops matching at expiry even
while the daemon is dead, stuck or retrying a failed change; the daemon's sweep then only
tidies the rule away. xt_time matches through its stop second, so the stop is the grant's
last second, ``expires - 1`` (a grant lives for ``[opened, expires)``); it keeps the date as
32 bits: a grant past 2106 goes without.

How it changes. Every change takes the xtables lock (``/run/xtables.lock``, or
``$XTABLES_LOCKFILE``: the lock ``iptables-legacy`` takes), re-reads the table, edits
libiptc's copy and commits it once. libiptc commits the whole table: without the re-read
a commit would undo what other tools changed since our last read, and the cost of one
commit grows with the number of rules in the whole table. The lock keeps iptables-legacy
out meanwhile. For a tool that ignores the lock: the kernel refuses our commit if the
table's rule count changed meanwhile (EAGAIN), and the operation is redone from a fresh
read; a change that keeps the count (``-R``) would be silently undone, as between any
two libiptc users. Reading (``grants()``) takes no lock.

Rules are found by parsing libiptc's raw entries here (much faster than building iptc
``Rule`` objects, about 0.6 ms per rule), so a rule removed or changed by hand is seen.
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
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING, Any

import iptc
from iptc.ip4tc import IPTCError, ipt_entry, ipt_ip
from iptc.ip6tc import ip6t_entry, ip6t_ip6
from iptc.xtables import XTablesError, xt_align

from knockd_fast.firewall.base import (
    FirewallBusy,
    FirewallError,
    Grant,
    GrantKey,
    check_families,
    format_comment,
    format_key,
    parse_comment,
    sort_key,
)
from knockd_fast.firewall.xtables import DEFAULT_CHAIN, HOOKS, check_chain, check_hooks

if TYPE_CHECKING:
    from knockd_fast.config import GrantSettings

log = logging.getLogger("knockd_fast.firewall")

DEFAULT_LOCK_PATH = "/run/xtables.lock"
_MATCH_HEADER = struct.Struct("=H29sB")  # struct xt_entry_match: size, name, revision
_TCP = struct.Struct("=4H4B")  # struct xt_tcp: spts[2], dpts[2], option, flg_mask, flg_cmp, inv
_UDP = struct.Struct("=4HB")  # struct xt_udp: spts[2], dpts[2], invflags
_COMMENT_BYTES = 256  # struct xt_comment_info
_TIME_STOP = struct.Struct("=I")  # struct xt_time_info's date_stop, after its date_start
_TIME_LIMIT = 2**32  # date_stop is a __u32 of Unix seconds
_PROTO_NUMBERS = {"tcp": 6, "udp": 17}
_PROTO_NAMES = {6: "tcp", 17: "udp"}


@dataclass(frozen=True)
class _Family:
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


def _family(version: int) -> _Family:
    if version == 4:
        ip, off, rule_cls, table_cls = ipt_ip, ipt_entry.ip.offset, iptc.Rule, iptc.Table
        entry, addr_len, tos, proto_flags = ipt_entry, 4, None, 0
    else:
        ip, off, rule_cls, table_cls = ip6t_ip6, ip6t_entry.ipv6.offset, iptc.Rule6, iptc.Table6
        entry, addr_len, proto_flags = ip6t_entry, 16, ip6t_ip6.IP6T_F_PROTO
        tos = off + ip.tos.offset
    return _Family(
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


_FAMILIES = {4: _family(4), 6: _family(6)}


class _Cause(Exception):
    """A failure whose text is the cause part of a FirewallError."""


class _Busy(_Cause):
    """The xtables lock stayed held by another process for the whole wait."""


def _cause(error: BaseException) -> str:
    text = str(error)
    # python-iptables formats libiptc's message as bytes: "...: b'Bad rule (...)'"
    for quote in ("'", '"'):
        text = text.replace(f"b{quote}", "").replace(quote, "")
    return " ".join(text.split()) or type(error).__name__


def _parse(fam: _Family, raw: bytes, target: str | None) -> Grant | str:
    """The grant an entry of our chain holds, or why it is not one of ours."""
    target_offset = _target_offset(fam, raw)
    if target != "ACCEPT":
        return f"target {target or '?'} is not ACCEPT"
    n = fam.addr_len
    full, zero = b"\xff" * n, bytes(n)
    if raw[fam.smsk : fam.smsk + n] != full:
        return "source is not one address"
    source = ip_address(raw[fam.src : fam.src + n])
    dmsk, dst = raw[fam.dmsk : fam.dmsk + n], raw[fam.dst : fam.dst + n]
    if dmsk == full:
        destination: IPv4Address | IPv6Address | None = ip_address(dst)
    elif dmsk == zero and dst == zero:
        destination = None
    else:
        return "destination is not one address"
    if any(raw[fam.ifaces : fam.proto]):
        return "matches an interface"
    if raw[fam.invflags] or raw[fam.flags] != fam.proto_flags:
        return "has inverted or extra address matches"
    if fam.tos is not None and raw[fam.tos]:
        return "matches a traffic class"
    proto = _PROTO_NAMES.get(struct.unpack_from("=H", raw, fam.proto)[0])
    if proto is None:
        return "protocol is not tcp or udp"
    port = comment = date_stop = None
    offset = fam.entry_size
    while offset < target_offset:
        size, name_bytes, revision = _MATCH_HEADER.unpack_from(raw, offset)
        name = name_bytes.split(b"\0", 1)[0].decode("ascii", "replace")
        data = offset + _MATCH_HEADER.size
        if size < _MATCH_HEADER.size or offset + size > target_offset:
            return "has a malformed match"
        if name == proto and revision == 0 and port is None:
            if proto == "tcp":
                sp_lo, sp_hi, dp_lo, dp_hi, *rest = _TCP.unpack_from(raw, data)
            else:
                sp_lo, sp_hi, dp_lo, dp_hi, *rest = _UDP.unpack_from(raw, data)
            if (sp_lo, sp_hi) != (0, 65535) or dp_lo != dp_hi or dp_lo == 0 or any(rest):
                return f"{proto} match is not a single --dport"
            port = dp_lo
        elif name == "time" and revision == 0 and date_stop is None:
            (date_stop,) = _TIME_STOP.unpack_from(raw, data + 4)
        elif name == "comment" and revision == 0 and comment is None:
            text = raw[data : data + _COMMENT_BYTES].split(b"\0", 1)[0]
            comment = parse_comment(text.decode("utf-8", "replace"))
            if comment is None:
                return f"comment {text.decode('utf-8', 'replace')!r} is not a grant's"
        else:
            return f"has an unexpected match {name!r}"
        offset += size
    if port is None:
        return f"has no {proto} --dport match"
    if comment is None:
        return "has no comment"
    user, expires = comment
    # Rules made before the time match have none; one that disagrees was edited by hand.
    if date_stop is not None and 0 < expires <= _TIME_LIMIT and date_stop != expires - 1:
        return f"time match and comment disagree on the expiry ({date_stop + 1} vs {expires})"
    try:
        return Grant(source, proto, port, destination, expires, user)
    except ValueError as error:
        return str(error)


def _target_offset(fam: _Family, raw: bytes) -> int:
    return struct.unpack_from("=H", raw, fam.target_offset)[0]


def _is_jump(fam: _Family, raw: bytes, target: str | None, chain: str) -> bool:
    """Whether an entry is an unconditional ``-j chain``."""
    return (
        target == chain
        and _target_offset(fam, raw) == fam.entry_size
        and not any(raw[: fam.invflags + 1])
    )


def _expires_by(raw: bytes, now: int) -> bool:
    """Cheap pre-filter: whether the entry has our comment with an expiry <= now."""
    start = raw.find(b" expires=")
    if start < 0:
        return False
    digits = raw[start + 9 : raw.find(b"\0", start)]
    return digits.isdigit() and int(digits) <= now


def _entries(table: Any, chain: str) -> Iterator[tuple[bytes, Any]]:
    """(raw bytes, libiptc entry) of each rule of a chain, in order."""
    entry = table.first_rule(chain)
    while entry:
        yield ct.string_at(ct.addressof(entry), entry.next_offset), entry
        entry = table.next_rule(entry)


def _target(table: Any, entry: Any) -> str | None:
    """The target of an entry: ACCEPT, DROP, a chain name, LOG..."""
    name = table.get_target(entry)
    return name.decode() if name else None


def _delete_at(table: Any, chain: str, index: int) -> None:
    """Delete rule ``index`` (0-based) of ``chain`` in libiptc's copy of the table.

    python-iptables binds ``iptc_delete_num_entry`` but has no method for it; deleting by
    number is exact and avoids building an iptc ``Rule`` per deleted entry.
    """
    if table._iptc.iptc_delete_num_entry(chain.encode(), index, table._handle) != 1:
        raise IPTCError(f"can't delete rule {index + 1} of chain {chain}: {table.strerror()}")


class _XtablesLock:
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
                        raise _Busy(
                            f"xtables lock held by another process (waited {self.wait:g} s)"
                        ) from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the lock


class IptablesFirewall:
    """Grants as ACCEPT rules in our own chain of the legacy xtables filter tables.

    ``hooks``: the built-in chains that jump to ours first (INPUT for local services,
    FORWARD for hosts behind this one). ``families``: 4, 6 or both. ``lock_path``: the
    xtables lock file (None: ``$XTABLES_LOCKFILE`` or ``/run/xtables.lock``), waited for
    at most ``lock_wait`` seconds (``WaitsForLock``: the daemon shortens it once started),
    else ``FirewallBusy``. ``retries``: how often an operation is redone when the
    kernel refuses the commit because the table changed meanwhile.
    """

    name = "iptables"
    persistent = True

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
        self._lock = _XtablesLock(lock_path, lock_wait)
        self._retries = retries
        self._fams = [_FAMILIES[version] for version in self.families]
        self._view: dict[GrantKey, Grant] = {}
        self._mutex = threading.RLock()

    @classmethod
    def from_settings(cls, settings: GrantSettings) -> IptablesFirewall:
        return cls(settings.chain, settings.hooks)

    @property
    def lock_wait(self) -> float:
        """Seconds one operation waits for the xtables lock before ``FirewallBusy``."""
        return self._lock.wait

    @lock_wait.setter
    def lock_wait(self, seconds: float) -> None:
        self._lock.wait = float(seconds)

    # -- the interface ------------------------------------------------------------------

    def setup(self) -> None:
        with self._op("setup", lock=True):
            for fam in self._fams:
                self._transaction(fam, lambda table, fam=fam: self._setup(fam, table))

    def grants(self) -> list[Grant]:
        with self._op("read grants", lock=False):
            found: dict[GrantKey, Grant] = {}
            for fam in self._fams:
                table = fam.table()
                table.refresh()
                if table.is_chain(self.chain):
                    for grant in self._scan(fam, table):
                        if isinstance(grant, Grant):
                            _keep_latest(found, grant)
            self._view = found
            return sorted(found.values(), key=sort_key)

    def open(self, grant: Grant) -> Grant:
        what = f"add grant {format_key(grant.key)}"
        fam = self._family_of(grant.source, what)
        with self._op(what, lock=True):
            in_force = self._transaction(fam, lambda table: self._open(fam, table, grant))
            self._view[grant.key] = in_force
            return in_force

    def close(self, key: GrantKey, user: str | None = None) -> bool:
        key = tuple(getattr(key, "key", key))  # a Grant is accepted for its key
        if key[0].version not in self.families:
            return False
        fam = _FAMILIES[key[0].version]
        with self._op(f"remove grant {format_key(key)}", lock=True):
            found = self._transaction(fam, lambda table: self._close(fam, table, key, user))
            if found:
                self._view.pop(key, None)
            return found

    def reconcile(self, now: int) -> tuple[list[Grant], list[Grant]]:
        with self._op("reconcile", lock=True):
            kept: dict[GrantKey, Grant] = {}
            removed: list[Grant] = []
            for fam in self._fams:
                live, gone, junk = self._transaction(
                    fam, lambda table, fam=fam: self._reconcile(fam, table, now)
                )
                kept.update(live)
                removed += gone
                for number, why in junk:
                    log.warning(
                        "reconcile: removed rule %d of chain %s (IPv%d), not a grant: %s",
                        number,
                        self.chain,
                        fam.version,
                        why,
                    )
            self._view = kept
            return sorted(kept.values(), key=sort_key), sorted(removed, key=sort_key)

    def expire(self, now: int) -> list[Grant]:
        """Remove expired grants. Only looks at the kernel when the in-memory view has a
        grant due (so the daemon's periodic sweep is cheap); it then removes every expired
        grant of that family's chain. Due grants are dropped from the view even if their
        rule is gone or was extended behind our back (``grants()`` reads them again)."""
        with self._mutex:
            due = [key for key, grant in self._view.items() if grant.expired(now)]
            if not due:
                return []
            with self._op("expire", lock=True):
                removed: list[Grant] = []
                for fam in self._fams:
                    if any(key[0].version == fam.version for key in due):
                        removed += self._transaction(
                            fam, lambda table, fam=fam: self._expire(fam, table, now)
                        )
                for key in due:
                    del self._view[key]
                for grant in removed:
                    self._view.pop(grant.key, None)
                return sorted(removed, key=sort_key)

    def teardown(self) -> None:
        with self._op("teardown", lock=True):
            for fam in self._fams:
                self._transaction(fam, lambda table, fam=fam: self._teardown(fam, table))
            self._view.clear()

    # -- one family's table: each returns (changed, result) --------------------------------

    def _setup(self, fam: _Family, table: Any) -> tuple[bool, None]:
        changed = False
        if not table.is_chain(self.chain):
            table.create_chain(self.chain)
            changed = True
        for hook in HOOKS:
            jumps = [
                index
                for index, (raw, entry) in enumerate(_entries(table, hook))
                if _is_jump(fam, raw, _target(table, entry), self.chain)
            ]
            wanted = hook in self.hooks
            if jumps == ([0] if wanted else []):
                continue
            for index in reversed(jumps):
                _delete_at(table, hook, index)
            if wanted:
                jump = fam.rule_cls()
                jump.target = iptc.Target(jump, self.chain)
                iptc.Chain(table, hook).insert_rule(jump, 0)
            changed = True
        return changed, None

    def _open(self, fam: _Family, table: Any, grant: Grant) -> tuple[bool, Grant]:
        self._need_chain(fam, table)
        same = self._find(fam, table, grant.key)
        held = max((g for _, g in same), key=lambda g: g.expires, default=None)
        # An open never shortens a grant (nor takes it from its user): the later one stays.
        in_force = grant if held is None or held.expires < grant.expires else held
        if in_force is held and len(same) == 1:
            return False, held
        rule = self._rule(fam, in_force)
        chain = iptc.Chain(table, self.chain)
        if same:  # extend: replace the rule where it is, drop any duplicates
            chain.replace_rule(rule, same[0][0])
            for index, _ in reversed(same[1:]):
                _delete_at(table, self.chain, index)
        else:
            chain.append_rule(rule)
        return True, in_force

    def _close(
        self, fam: _Family, table: Any, key: GrantKey, user: str | None
    ) -> tuple[bool, bool]:
        if not table.is_chain(self.chain):
            return False, False
        # Only the grant's own user may close it (None: whoever asks, e.g. an admin tool).
        same = [i for i, g in self._find(fam, table, key) if user is None or g.user == user]
        for index in reversed(same):
            _delete_at(table, self.chain, index)
        return bool(same), bool(same)

    def _reconcile(self, fam: _Family, table: Any, now: int) -> tuple[bool, Any]:
        """Delete expired grants, rules that are no grant, and all but the latest of
        duplicate keys. Result: (live grants by key, removed grants, [(number, why)])."""
        if not table.is_chain(self.chain):
            return False, ({}, [], [])
        live: dict[GrantKey, tuple[int, Grant]] = {}
        drop: list[int] = []
        gone: list[Grant] = []
        bad: list[tuple[int, str]] = []
        for index, item in enumerate(self._scan(fam, table)):
            if not isinstance(item, Grant):
                drop.append(index)
                bad.append((index + 1, item))
            elif item.expired(now):
                drop.append(index)
                gone.append(item)
            elif item.key in live:
                first_index, first = live[item.key]
                loser_index, loser = (index, item)
                if item.expires > first.expires:
                    loser_index, loser = first_index, first
                    live[item.key] = (index, item)
                drop.append(loser_index)
                gone.append(loser)
            else:
                live[item.key] = (index, item)
        for index in sorted(drop, reverse=True):
            _delete_at(table, self.chain, index)
        return bool(drop), ({key: grant for key, (_, grant) in live.items()}, gone, bad)

    def _expire(self, fam: _Family, table: Any, now: int) -> tuple[bool, list[Grant]]:
        """Delete the expired grants; only rules whose comment says so are parsed."""
        if not table.is_chain(self.chain):
            return False, []
        found = self._scan(fam, table, lambda raw: _expires_by(raw, now))
        drop = [i for i, item in enumerate(found) if isinstance(item, Grant) and item.expired(now)]
        for index in reversed(drop):
            _delete_at(table, self.chain, index)
        return bool(drop), [found[index] for index in drop]

    def _teardown(self, fam: _Family, table: Any) -> tuple[bool, None]:
        if not table.is_chain(self.chain):
            return False, None
        for other in [c.name for c in table.chains if c.name != self.chain]:
            hits = [
                index
                for index, (_, entry) in enumerate(_entries(table, other))
                if _target(table, entry) == self.chain
            ]
            for index in reversed(hits):
                _delete_at(table, other, index)
        table.flush_entries(self.chain)
        table.delete_chain(self.chain)
        return True, None

    # -- helpers ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _op(self, what: str, lock: bool) -> Iterator[None]:
        try:
            with self._mutex, self._lock.hold() if lock else contextlib.nullcontext():
                yield
        except _Busy as error:
            raise FirewallBusy(f"iptables: {what}: {error}") from None
        except _Cause as error:
            raise FirewallError(f"iptables: {what}: {error}") from None
        except (IPTCError, XTablesError, OSError) as error:
            raise FirewallError(f"iptables: {what}: {_cause(error)}") from error

    def _transaction(self, fam: _Family, apply: Callable[[Any], tuple[bool, Any]]) -> Any:
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

    def _scan(
        self, fam: _Family, table: Any, pick: Callable[[bytes], bool] | None = None
    ) -> list[Grant | str | None]:
        """Each rule of our chain parsed (a Grant, or why not), or None where ``pick``
        says the raw entry is not worth parsing."""
        return [
            _parse(fam, raw, _target(table, entry)) if pick is None or pick(raw) else None
            for raw, entry in _entries(table, self.chain)
        ]

    def _find(self, fam: _Family, table: Any, key: GrantKey) -> list[tuple[int, Grant]]:
        """(index, grant) of the grants with ``key`` in our chain (parsing only same-source
        rules)."""
        where, packed = slice(fam.src, fam.src + fam.addr_len), key[0].packed
        found = self._scan(fam, table, lambda raw: raw[where] == packed)
        return [(index, item) for index, item in enumerate(found) if _has_key(item, key)]

    def _need_chain(self, fam: _Family, table: Any) -> None:
        if not table.is_chain(self.chain):
            raise _Cause(
                f"chain {self.chain} is missing from the IPv{fam.version} filter table "
                "(setup() not called, or removed by hand)"
            )

    def _family_of(self, address: IPv4Address | IPv6Address, what: str) -> _Family:
        if address.version not in self.families:
            raise FirewallError(
                f"iptables: {what}: IPv{address.version} is not enabled "
                f"(families {', '.join(map(str, self.families))})"
            )
        return _FAMILIES[address.version]

    def _rule(self, fam: _Family, grant: Grant) -> Any:
        rule = fam.rule_cls()
        rule.src = f"{grant.source}/{fam.bits}"
        if grant.destination is not None:
            rule.dst = f"{grant.destination}/{fam.bits}"
        rule.protocol = grant.proto
        rule.create_match(grant.proto).dport = str(grant.port)
        rule.create_match("comment").comment = format_comment(grant)
        if 0 < grant.expires <= _TIME_LIMIT:
            last = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(grant.expires - 1))
            rule.create_match("time").datestop = last  # UTC: xt_time's default
        rule.target = iptc.Target(rule, "ACCEPT")
        rule.final_check()
        return rule


def _has_key(item: Grant | str, key: GrantKey) -> bool:
    return isinstance(item, Grant) and item.key == key


def _keep_latest(found: dict[GrantKey, Grant], grant: Grant) -> None:
    if grant.key not in found or grant.expires > found[grant.key].expires:
        found[grant.key] = grant
