"""The ipset backend: grants are entries with timeouts in kernel sets; a few static rules.

What is in the kernel. Per family (``N`` = ``grants.ipset_name``, ``knockd-fast`` by
default), two sets with timeout and comment support, sized by ``grants.ipset_maxelem``::

    N-v4      hash:ip,port,ip   source, proto:port, destination   (a grant bound to an address)
    N-v4-any  hash:ip,port      source, proto:port                (Grant.destination None)

and in our chain (``KNOCKD-FAST``, jumped to first from the hooks, as the iptables backend
does it: ``libiptc.XtablesBackend``), written with python-iptables, exactly::

    -A KNOCKD-FAST -m set --match-set N-v4 src,dst,dst -j ACCEPT
    -A KNOCKD-FAST -m set --match-set N-v4-any src,dst -j ACCEPT

The daemon always binds a grant to the destination its knock went to, so the ``-any`` set
only holds grants made by other tools through this class (``destination=None``).

A grant is one entry, added through pyroute2's ipset netlink API with the grant's
remaining seconds as its timeout and ``format_comment(grant)`` (user and absolute expiry) as
its comment, read back by ``grants()``. The kernel removes the entry at its timeout (it
stops matching at once, even while the daemon is dead); ``expire`` deletes what is due and
drops it from the view. The timeout is rounded up to whole seconds, so the entry ends
within a second after the grant's expiry, never before; a grant longer than ipset's
largest timeout (2,147,483 s, about 24 days) gets none and is removed by the sweep.

Extending re-adds the entry with ``exclusive=False`` (NLM_F_EXCL off: the kernel replaces
the entry's timeout, on every kernel from 6.1 up) and the comment again (pyroute2 sends no
comment unless given one, and the kernel then clears it).

Changes cost one netlink round trip each and do not depend on how many grants are live.
They decide from the backend's view of the sets (read at ``setup``, ``grants`` and
``reconcile``), checked against the kernel where the view may be stale: an add of a key
the view does not hold is exclusive (an entry already there makes the view re-read).

Batches. ipset has no transactions over netlink: ``apply_batch`` applies the changes one by
one, remembering what each replaced, and on any failure puts every entry it touched back as
it was, in reverse order, before raising (a crash in the middle leaves the changes made so
far, each a complete grant or none). A batch trusts the view: anything the view did not
expect (an entry that is there or gone behind its back) aborts it, and the worker then goes
one by one, where each change re-reads what it needs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any

import iptc
from pyroute2 import IPSet
from pyroute2.ipset import PortEntry
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.ipset import IPSET_FLAG_LIST_HEADER

from knock_client.protocol import Action
from knockd_fast.firewall.base import (
    ChangeOutcome,
    FirewallError,
    Grant,
    GrantChange,
    GrantKey,
    format_comment,
    format_key,
    parse_comment,
    sort_key,
)
from knockd_fast.firewall.libiptc import Family, XtablesBackend
from knockd_fast.firewall.xtables import DEFAULT_CHAIN

if TYPE_CHECKING:
    from knockd_fast.config import GrantSettings

log = logging.getLogger("knockd_fast.firewall")

DEFAULT_SET_NAME = "knockd-fast"
DEFAULT_MAXELEM = 65_536  # ipset's own default
MAX_TIMEOUT = 2_147_483  # IPSET_MAX_TIMEOUT: (UINT_MAX >> 1) / MSEC_PER_SEC
IPSET_ERR_EXIST = 4103  # add: already added; del: not added
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_PROTO_NUMBERS = {"tcp": 6, "udp": 17}
_PROTO_NAMES = {6: "tcp", 17: "udp"}
_BOUND, _ANY = "hash:ip,port,ip", "hash:ip,port"
_ADDR = {4: "IPSET_ATTR_IPADDR_IPV4", 6: "IPSET_ATTR_IPADDR_IPV6"}


def set_names(name: str, version: int) -> tuple[str, str]:
    """(the set of grants bound to a destination, the set of grants to any address)."""
    return f"{name}-v{version}", f"{name}-v{version}-any"


class _Surprise(Exception):
    """The kernel held something the view did not expect (in a batch: abort it)."""


class IpsetFirewall(XtablesBackend):
    """Grants as entries of ipset sets; our chain holds one ACCEPT rule per set.

    ``set_name``: the sets' common prefix (``N-v4``, ``N-v4-any``, ``N-v6``, ``N-v6-any``);
    ``maxelem``: the most entries one set holds (an add past it fails). The other
    arguments are ``libiptc.XtablesBackend``'s. ``clock`` gives unix seconds (the
    remaining time of each grant, for its entry's timeout).
    """

    name = "ipset"
    persistent = True

    def __init__(
        self,
        chain: str = DEFAULT_CHAIN,
        hooks: tuple[str, ...] = ("INPUT",),
        *,
        set_name: str = DEFAULT_SET_NAME,
        maxelem: int = DEFAULT_MAXELEM,
        clock: Any = time.time,
        **kwargs: Any,
    ) -> None:
        super().__init__(chain, hooks, **kwargs)
        self.set_name = set_name
        self.maxelem = maxelem
        self._clock = clock
        self._view: dict[GrantKey, Grant] = {}
        self._local = threading.local()  # one netlink socket per thread

    @classmethod
    def from_settings(cls, settings: GrantSettings) -> IpsetFirewall:
        return cls(
            settings.chain,
            settings.hooks,
            set_name=settings.ipset_name,
            maxelem=settings.ipset_maxelem,
        )

    # -- the interface ------------------------------------------------------------------

    def setup(self) -> None:
        with self._op("setup", lock=True):
            for fam in self._fams:
                names = set_names(self.set_name, fam.version)
                for name, stype in zip(names, (_BOUND, _ANY), strict=True):
                    self._create(fam, name, stype)
                self._transaction(fam, lambda table, fam=fam: self._setup(fam, table))

    def grants(self) -> list[Grant]:
        with self._op("read grants", lock=False):
            found: dict[GrantKey, Grant] = {}
            for fam in self._fams:
                for grant, _ in self._read(fam):
                    if isinstance(grant, Grant):
                        found[grant.key] = grant
            self._view = found
            return sorted(found.values(), key=sort_key)

    def open(self, grant: Grant) -> Grant:
        what = f"add grant {format_key(grant.key)}"
        self._family_of(grant.source, what)
        with self._op(what, lock=False):
            try:
                return self._open(grant, [])
            except _Surprise:  # an entry the view did not know of: read the family again
                self._refresh(grant.family)
                return self._open(grant, [])

    def close(self, key: GrantKey, user: str | None = None) -> bool:
        key = tuple(getattr(key, "key", key))  # a Grant is accepted for its key
        if key[0].version not in self.families:
            return False
        with self._op(f"remove grant {format_key(key)}", lock=False):
            try:
                return self._close(key, user, [])
            except _Surprise:
                self._refresh(key[0].version)
                return self._close(key, user, [])

    def apply_batch(self, changes: Sequence[GrantChange]) -> list[ChangeOutcome]:
        """The changes one by one, undone in reverse on any failure (see the module)."""
        for change in changes:
            if change.action == Action.OPEN:
                self._family_of(change.grant.source, f"add grant {format_key(change.grant.key)}")
        with self._op(f"apply a batch of {len(changes)} changes", lock=False):
            view = dict(self._view)
            undo: list[tuple[GrantKey, Grant | None]] = []
            try:
                outcomes: list[ChangeOutcome] = []
                for change in changes:
                    g = change.grant
                    if change.action == Action.CLOSE:
                        closes = g.family in self.families
                        outcomes.append(closes and self._close(g.key, g.user, undo))
                    else:
                        outcomes.append(self._open(g, undo))
                return outcomes
            except (_Surprise, NetlinkError, OSError) as error:
                self._undo(undo)
                self._view = view
                if isinstance(error, _Surprise):
                    raise FirewallError(f"ipset: apply a batch: {error}") from None
                raise

    def reconcile(self, now: int) -> tuple[list[Grant], list[Grant]]:
        with self._op("reconcile", lock=False):
            kept: dict[GrantKey, Grant] = {}
            removed: list[Grant] = []
            for fam in self._fams:
                for item, (name, entry, etype) in self._read(fam):
                    if isinstance(item, Grant) and not item.expired(now):
                        kept[item.key] = item
                        continue
                    self._del(name, entry, etype, fam.version)
                    if isinstance(item, Grant):
                        removed.append(item)
                    else:
                        log.warning("reconcile: removed an entry of set %s, not a grant: %s",
                                    name, item)  # fmt: skip
            self._view = kept
            return sorted(kept.values(), key=sort_key), sorted(removed, key=sort_key)

    def expire(self, now: int) -> list[Grant]:
        """Drop the grants whose expiry has come from the view and return them. The kernel
        removes their entries itself (within the second after); they are deleted here too,
        so that the sets hold what the view says (and for grants with no kernel timeout)."""
        with self._mutex:
            due = [grant for grant in self._view.values() if grant.expired(now)]
            if not due:
                return []
            with self._op("expire", lock=False):
                for grant in due:
                    self._del(*self._entry(grant.key), grant.family)
                    del self._view[grant.key]
            return sorted(due, key=sort_key)

    def repair(self) -> list[Grant] | None:
        """Cheap check (each sweep): our four sets exist, each holds at least as many
        entries as the view has live grants in it, and the chain, its two rules and the
        jumps are in place. Else: ``setup`` and every live grant of the view added again."""
        with self._mutex:
            now = self._clock()
            live = [g for g in self._view.values() if g.expires > now]
            with self._op("check the sets and the chain", lock=False):
                if self._sets_hold(live) and self._chains_in_place():
                    return None
            self.setup()
            with self._op("re-add the live grants", lock=False):
                for grant in live:
                    self._add(grant, exclusive=False)
            return sorted(live, key=sort_key)

    def teardown(self) -> None:
        with self._op("teardown", lock=True):
            for fam in self._fams:
                self._transaction(fam, lambda table, fam=fam: self._teardown(fam, table))
                for name in set_names(self.set_name, fam.version):
                    with contextlib.suppress(NetlinkError):  # not there: nothing to remove
                        self._ipset().destroy(name)
            self._view.clear()

    # -- the changes (``undo`` collects (key, what the kernel held before)) -------------

    def _open(self, grant: Grant, undo: list) -> Grant:
        held = self._view.get(grant.key)
        if held is not None and held.expires >= grant.expires:
            # an open never shortens a grant (nor takes it from its user), if it is there
            name, entry, etype = self._entry(grant.key)
            if self._ipset().test(name, entry, family=_AF[grant.family], etype=etype):
                return held
            held = None  # removed behind our back: add it as new
            self._view.pop(grant.key, None)
        self._add(grant, exclusive=held is None)
        undo.append((grant.key, held))
        self._view[grant.key] = grant
        return grant

    def _close(self, key: GrantKey, user: str | None, undo: list) -> bool:
        held = self._view.get(key)
        name, entry, etype = self._entry(key)
        if held is None:
            if self._ipset().test(name, entry, family=_AF[key[0].version], etype=etype):
                raise _Surprise(f"set {name} holds {format_key(key)}, unknown to the view")
            return False
        if user is not None and held.user != user:
            return False  # only the grant's own user may close it
        gone = self._del(name, entry, etype, key[0].version)
        self._view.pop(key, None)
        if not gone:
            return False  # gone already (its timeout, or by hand)
        undo.append((key, held))
        return True

    def _undo(self, undo: list[tuple[GrantKey, Grant | None]]) -> None:
        for key, before in reversed(undo):
            try:
                if before is None:
                    self._del(*self._entry(key), key[0].version)
                else:
                    self._add(before, exclusive=False)
            except (NetlinkError, OSError) as error:
                log.error("ipset: cannot undo a batch's change of %s: %s", format_key(key), error)

    # -- the kernel ---------------------------------------------------------------------

    def _ipset(self) -> IPSet:
        sock = getattr(self._local, "ipset", None)
        if sock is None:
            sock = self._local.ipset = IPSet()
        return sock

    def _entry(self, key: GrantKey) -> tuple[str, tuple, str]:
        """(set name, pyroute2 entry, etype) of a grant's key."""
        source, proto, port, destination = key
        bound, any_set = set_names(self.set_name, source.version)
        port_entry = PortEntry(port, _PROTO_NUMBERS[proto])
        if destination is None:
            return any_set, (str(source), port_entry), "ip,port"
        return bound, (str(source), port_entry, str(destination)), "ip,port,ip"

    def _timeout(self, grant: Grant) -> int:
        """The entry's timeout: the grant's remaining seconds, rounded up (at least 1); 0
        (none) past ipset's largest."""
        remaining = math.ceil(grant.expires - self._clock())
        return 0 if remaining > MAX_TIMEOUT else max(1, remaining)

    def _add(self, grant: Grant, exclusive: bool) -> None:
        name, entry, etype = self._entry(grant.key)
        try:
            self._ipset().add(
                name,
                entry,
                family=_AF[grant.family],
                etype=etype,
                exclusive=exclusive,
                timeout=self._timeout(grant),
                comment=format_comment(grant),  # always: an add without one clears it
            )
        except NetlinkError as error:
            if exclusive and error.code == IPSET_ERR_EXIST:
                raise _Surprise(f"set {name} holds {format_key(grant.key)} already") from None
            raise

    def _del(self, name: str, entry: tuple, etype: str, version: int) -> bool:
        """Delete one entry; False if it was not there."""
        try:
            self._ipset().delete(name, entry, family=_AF[version], etype=etype)
        except NetlinkError as error:
            if error.code == IPSET_ERR_EXIST:
                return False
            raise
        return True

    def _create(self, fam: Family, name: str, stype: str) -> None:
        header = self._header(name)
        if header is None:
            self._ipset().create(
                name,
                stype=stype,
                family=_AF[fam.version],
                timeout=0,  # timeout support; an entry without one stays
                comment=True,
                maxelem=self.maxelem,
            )
            return
        kind, family, data = header
        if (kind, family) != (stype, _AF[fam.version]) or not data.get("IPSET_ATTR_CADT_FLAGS"):
            raise FirewallError(
                f"ipset: setup: set {name} exists but is not a {stype} set of IPv{fam.version} "
                "with timeout and comment support (remove it, or set grants.ipset_name)"
            )
        if data.get("IPSET_ATTR_MAXELEM") != self.maxelem:
            log.warning(
                "ipset: set %s holds at most %s entries, not grants.ipset_maxelem = %d: a set "
                "cannot be resized; `knockd-fast` re-creates it after `ipset destroy %s`",
                name,
                data.get("IPSET_ATTR_MAXELEM"),
                self.maxelem,
                name,
            )

    def _header(self, name: str) -> tuple[str, int, dict[str, Any]] | None:
        """(type, family, header data) of a set; None if there is no such set."""
        try:
            messages = list(self._ipset().list(name, flags=IPSET_FLAG_LIST_HEADER))
        except NetlinkError as error:
            if error.code == 2:  # ENOENT
                return None
            raise
        if not messages:
            return None
        msg = messages[0]
        data = dict((attr[0], attr[1]) for attr in msg.get_attr("IPSET_ATTR_DATA")["attrs"])
        return msg.get_attr("IPSET_ATTR_TYPENAME"), msg.get_attr("IPSET_ATTR_FAMILY"), data

    def _sets_hold(self, live: list[Grant]) -> bool:
        """Whether each set exists and counts at least the view's live grants in it (the
        kernel's count also has entries past their timeout not yet collected)."""
        wanted: dict[str, int] = {}
        for grant in live:
            name = self._entry(grant.key)[0]
            wanted[name] = wanted.get(name, 0) + 1
        for fam in self._fams:
            for name in set_names(self.set_name, fam.version):
                header = self._header(name)
                if header is None or header[2].get("IPSET_ATTR_ELEMENTS", 0) < wanted.get(name, 0):
                    return False
        return True

    def _read(self, fam: Family) -> Iterator[tuple[Grant | str, tuple[str, tuple, str]]]:
        """Each entry of the family's sets: (its grant or why it is not one, its address)."""
        for name in set_names(self.set_name, fam.version):
            if self._header(name) is None:
                continue
            for msg in self._ipset().list(name):
                adt = msg.get_attr("IPSET_ATTR_ADT")
                if adt is None:
                    continue
                for data in adt.get_attrs("IPSET_ATTR_DATA"):
                    yield self._parse(fam, name, data)

    def _parse(self, fam: Family, name: str, data: Any) -> tuple[Grant | str, tuple]:
        source = ip_address(data.get_attr("IPSET_ATTR_IP_FROM").get_attr(_ADDR[fam.version]))
        port = data.get_attr("IPSET_ATTR_PORT_FROM")
        proto_number = data.get_attr("IPSET_ATTR_PROTO")
        dest_attr = data.get_attr("IPSET_ATTR_IP2")
        destination = None
        if dest_attr is not None:
            destination = ip_address(dest_attr.get_attr(_ADDR[fam.version]))
        port_entry = PortEntry(port, proto_number)
        if destination is None:
            where = (name, (str(source), port_entry), "ip,port")
        else:
            where = (name, (str(source), port_entry, str(destination)), "ip,port,ip")
        proto = _PROTO_NAMES.get(proto_number)
        text = data.get_attr("IPSET_ATTR_COMMENT") or ""
        comment = parse_comment(text)
        if proto is None:
            return f"{source} {port}: protocol {proto_number} is not tcp or udp", where
        if comment is None:
            return f"{source} {port}/{proto}: comment {text!r} is not a grant's", where
        try:
            return Grant(source, proto, port, destination, comment[1], comment[0]), where
        except ValueError as error:
            return str(error), where

    def _refresh(self, version: int) -> None:
        """Read one family's sets again into the view."""
        fam = next(f for f in self._fams if f.version == version)
        self._view = {k: g for k, g in self._view.items() if k[0].version != version}
        for grant, _ in self._read(fam):
            if isinstance(grant, Grant):
                self._view[grant.key] = grant

    def _static_rules(self, fam: Family) -> list[Any]:
        rules = []
        names = set_names(self.set_name, fam.version)
        for name, directions in zip(names, ("src,dst,dst", "src,dst"), strict=True):
            rule = fam.rule_cls()
            rule.create_match("set").match_set = [name, directions]
            rule.target = iptc.Target(rule, "ACCEPT")
            rules.append(rule)
        return rules

    @contextlib.contextmanager
    def _op(self, what: str, lock: bool) -> Iterator[None]:
        try:
            with super()._op(what, lock):
                yield
        except NetlinkError as error:
            raise FirewallError(f"ipset: {what}: {error}") from error
