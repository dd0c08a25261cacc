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

A grant is one entry, added over netlink (``ipset_netlink``: our encoder of ipset's add,
del and test on a raw socket; pyroute2's ``IPSet`` creates, lists and destroys the sets)
with the grant's remaining seconds as its timeout and ``format_comment(grant)`` (user and
absolute expiry) as its comment, read back by ``grants()``. The kernel removes the entry
at its timeout (it stops matching at once, even while the daemon is dead); ``expire``
deletes what is due and drops it from the view. The timeout is rounded up to whole
seconds, so the entry ends within a second after the grant's expiry, never before; a grant
longer than ipset's largest timeout (2,147,483 s, about 24 days) gets none and is removed
by the sweep.

Extending re-adds the entry with NLM_F_EXCL off (the kernel replaces the entry's timeout,
on every kernel from 6.1 up) and the comment again (an add without one clears it).

A change costs one netlink round trip and does not depend on how many grants are live.
Changes decide from the backend's view of the sets (read at ``setup``, ``grants`` and
``reconcile``), checked against the kernel where the view may be stale: an add of a key
the view does not hold is exclusive (an entry already there makes the view re-read).

Batches. ipset has no transactions over netlink: ``apply_batch`` decides the changes one by
one from the view, as single changes would, and sends their messages together, many per
``sendmsg`` (``_Pipe``; the kernel answers each, in order). It remembers what each change
replaced, and on any failure puts every entry it touched back as it was, in reverse order,
before raising, naming the change that failed (a crash in the middle leaves the changes
made so far, each a complete grant or none). No two messages of one send touch the same
entry, so the ones after a failed message, which the kernel still applies, are undone
exactly as the ones before it. A batch trusts the view: anything the view did not expect
(an entry that is there or gone behind its back) aborts it, and the worker then goes one
by one, where each change re-reads what it needs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any

import iptc
from pyroute2 import IPSet
from pyroute2.ipset import _IPSetError  # the texts of ipset's error codes (errcode.c)
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
from knockd_fast.firewall.ipset_netlink import (
    IPSET_CMD_ADD,
    IPSET_CMD_DEL,
    IPSET_CMD_TEST,
    NLM_F_EXCL,
    IpsetSocket,
    Request,
    body,
    entry_extensions,
    entry_key,
    set_prefix,
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
IPSET_ERR_HASH_FULL = 4352  # IPSET_ERR_TYPE_SPECIFIC: the hash types' first own code
_TYPE_ERRORS = {IPSET_ERR_HASH_FULL: "Hash is full, cannot add more elements"}  # errcode.c
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_PROTO_NUMBERS = {"tcp": 6, "udp": 17}
_PROTO_NAMES = {6: "tcp", 17: "udp"}
_BOUND, _ANY = "hash:ip,port,ip", "hash:ip,port"
_ADDR = {4: "IPSET_ATTR_IPADDR_IPV4", 6: "IPSET_ATTR_IPADDR_IPV6"}
Entry = tuple[str, bytes]  # (set name, the entry's key attributes: ipset_netlink.entry_key)


def set_names(name: str, version: int) -> tuple[str, str]:
    """(the set of grants bound to a destination, the set of grants to any address)."""
    return f"{name}-v{version}", f"{name}-v{version}-any"


class _Surprise(Exception):
    """The kernel held something the view did not expect (in a batch: abort it)."""


def _kernel_error(code: int, cmd: int) -> NetlinkError:
    """pyroute2's error (and its text) for an ipset error code; a set type's own codes it
    has no text for (the one we meet: a full set)."""
    return _IPSetError(code, msg=_TYPE_ERRORS.get(code), cmd=cmd)


def _refused(code: int, cmd: int, what: str) -> NetlinkError:
    """The kernel's error for one message, with the change it was for (``_op`` says it)."""
    error = _kernel_error(code, cmd)
    error.what = what  # type: ignore[attr-defined]
    return error


class _Pipe:
    """Requests on their way to the kernel, each with what to do with its answer.

    ``put`` queues one; the queue goes out in one ``sendmsg`` when it is a chunk, when a
    request names an entry already queued (so that in one send no two messages touch the
    same entry: the kernel goes on after a failed message, and what it did after it is
    then undone exactly), and at ``flush``. ``eager`` sends each at once (single changes:
    their caller updates the view only after the kernel's answer). The answers run in
    order; the first one that raises is raised after all of the send's have run (so that
    every success is in the undo list), and nothing more is sent.
    """

    def __init__(self, sock: IpsetSocket, eager: bool = False) -> None:
        self._sock = sock
        self._eager = eager
        self._queue: list[Request] = []
        self._then: list[Callable[[int], None]] = []
        self._entries: set[Entry] = set()

    def put(self, entry: Entry, request: Request, then: Callable[[int], None]) -> None:
        if entry in self._entries or len(self._queue) >= self._sock.chunk:
            self.flush()
        self._queue.append(request)
        self._then.append(then)
        self._entries.add(entry)
        if self._eager:
            self.flush()

    def ask(self, entry: Entry, request: Request) -> int:
        """Send ``request`` with what is queued, now; its answer's code."""
        answer: list[int] = []
        self.put(entry, request, answer.append)
        self.flush()
        return answer[0]

    def flush(self) -> None:
        if not self._queue:
            return
        queue, then = self._queue, self._then
        self._queue, self._then, self._entries = [], [], set()
        failure: BaseException | None = None
        for code, answer in zip(self._sock.exchange(queue), then, strict=True):
            try:
                answer(code)
            except (_Surprise, NetlinkError) as error:
                failure = failure or error
        if failure is not None:
            raise failure


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
        self._local = threading.local()  # netlink sockets: one of each per thread
        self._prefixes: dict[str, bytes] = {}  # set name -> its requests' first attributes

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
                return self._open(grant, [], self._pipe(eager=True))
            except _Surprise:  # an entry the view did not know of: read the family again
                self._refresh(grant.family)
                return self._open(grant, [], self._pipe(eager=True))

    def close(self, key: GrantKey, user: str | None = None) -> bool:
        key = tuple(getattr(key, "key", key))  # a Grant is accepted for its key
        if key[0].version not in self.families:
            return False
        with self._op(f"remove grant {format_key(key)}", lock=False):
            try:
                return self._close(key, user, [], self._pipe(eager=True))[0]
            except _Surprise:
                self._refresh(key[0].version)
                return self._close(key, user, [], self._pipe(eager=True))[0]

    def apply_batch(self, changes: Sequence[GrantChange]) -> list[ChangeOutcome]:
        """The changes decided one by one, their messages sent together, all undone in
        reverse on any failure (see the module)."""
        for change in changes:
            grant = change.grant
            if change.action == Action.OPEN and grant.family not in self.families:
                self._family_of(grant.source, f"add grant {format_key(grant.key)}")  # raises
        with self._op(f"apply a batch of {len(changes)} changes", lock=False):
            # What the view held before, of each key the batch changes: no copy of it all,
            # whose size would cost every batch.
            before: dict[GrantKey, Grant | None] = {}
            undo: list[tuple[GrantKey, Grant | None]] = []
            try:
                pipe = self._pipe()
                outcomes: list[Grant | list[bool]] = []
                for change in changes:
                    g = change.grant
                    if change.action == Action.CLOSE:
                        if g.family not in self.families:
                            outcomes.append([False])
                            continue
                        outcomes.append(self._close(g.key, g.user, undo, pipe, before))
                    else:
                        outcomes.append(self._open(g, undo, pipe, before))
                pipe.flush()
                # a close's outcome is its cell, filled in by the kernel's answer
                return [out if isinstance(out, Grant) else out[0] for out in outcomes]
            except (_Surprise, NetlinkError, OSError) as error:
                self._undo(undo)
                for key, held in before.items():
                    if held is None:
                        self._view.pop(key, None)
                    else:
                        self._view[key] = held
                if isinstance(error, _Surprise):
                    raise FirewallError(f"ipset: apply a batch: {error}") from None
                raise

    def reconcile(self, now: int) -> tuple[list[Grant], list[Grant]]:
        with self._op("reconcile", lock=False):
            kept: dict[GrantKey, Grant] = {}
            removed: list[Grant] = []
            pipe = self._pipe()
            for fam in self._fams:
                # the whole listing first: no deletes in the middle of the kernel's dump
                for item, (name, entry) in list(self._read(fam)):
                    if isinstance(item, Grant) and not item.expired(now):
                        kept[item.key] = item
                        continue
                    self._del(pipe, (name, entry))
                    if isinstance(item, Grant):
                        removed.append(item)
                    else:
                        log.warning("reconcile: removed an entry of set %s, not a grant: %s",
                                    name, item)  # fmt: skip
            pipe.flush()
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
                pipe = self._pipe()
                for grant in due:
                    self._del(pipe, self._entry(grant.key))
                pipe.flush()  # on a failure the view keeps them all: the next expire retries
                for grant in due:
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
                pipe = self._pipe()
                for grant in live:
                    self._add(pipe, grant, exclusive=False)
                pipe.flush()
            return sorted(live, key=sort_key)

    def teardown(self) -> None:
        with self._op("teardown", lock=True):
            for fam in self._fams:
                self._transaction(fam, lambda table, fam=fam: self._teardown(fam, table))
                for name in set_names(self.set_name, fam.version):
                    with contextlib.suppress(NetlinkError):  # not there: nothing to remove
                        self._ipset().destroy(name)
            self._view.clear()

    # -- the changes (``undo`` collects (key, what the kernel held before), in the order of
    # the kernel's answers; ``pipe`` takes their messages) --------------------------------

    def _open(self, grant: Grant, undo: list, pipe: _Pipe, before: dict | None = None) -> Grant:
        held = self._view.get(grant.key)
        if before is not None and grant.key not in before:
            before[grant.key] = held
        if held is not None and held.expires >= grant.expires:
            # an open never shortens a grant (nor takes it from its user), if it is there
            if self._test(pipe, self._entry(grant.key)):
                return held
            held = None  # removed behind our back: add it as new
            self._view.pop(grant.key, None)
        self._add(pipe, grant, exclusive=held is None,
                  then=lambda: undo.append((grant.key, held)))  # fmt: skip
        self._view[grant.key] = grant
        return grant

    def _close(
        self, key: GrantKey, user: str | None, undo: list, pipe: _Pipe, before: dict | None = None
    ) -> list[bool]:
        """Whether the grant was closed, as a cell the kernel's answer fills in (in a
        batch, when its send goes out). ``before`` (a batch's) takes what the view held."""
        held = self._view.get(key)
        if before is not None and key not in before:
            before[key] = held
        entry = self._entry(key)
        if held is None:
            if self._test(pipe, entry):
                raise _Surprise(f"set {entry[0]} holds {format_key(key)}, unknown to the view")
            return [False]
        if user is not None and held.user != user:
            return [False]  # only the grant's own user may close it
        self._view.pop(key, None)
        closed = [True]

        def gone(deleted: bool) -> None:
            closed[0] = deleted  # False: gone already (its timeout, or by hand)
            if deleted:
                undo.append((key, held))

        self._del(pipe, entry, then=gone, what=f"remove grant {format_key(key)}")
        return closed

    def _undo(self, undo: list[tuple[GrantKey, Grant | None]]) -> None:
        pipe = self._pipe()
        for key, before in reversed(undo):

            def failed(error: NetlinkError, key: GrantKey = key) -> None:
                log.error("ipset: cannot undo a batch's change of %s: %s", format_key(key), error)

            if before is None:
                self._del(pipe, self._entry(key), failed=failed)
            else:
                self._add(pipe, before, exclusive=False, failed=failed)
        try:
            pipe.flush()
        except OSError as error:
            log.error("ipset: cannot undo a batch: %s", error)

    # -- the kernel ---------------------------------------------------------------------

    def _ipset(self) -> IPSet:
        """pyroute2's ipset socket of this thread: create, list, destroy."""
        sock = getattr(self._local, "ipset", None)
        if sock is None:
            sock = self._local.ipset = IPSet()
        return sock

    def _pipe(self, eager: bool = False) -> _Pipe:
        """A pipe on this thread's raw socket: add, del, test (``ipset_netlink``)."""
        sock = getattr(self._local, "netlink", None)
        if sock is None:
            sock = self._local.netlink = IpsetSocket()
        return _Pipe(sock, eager)

    def _entry(self, key: GrantKey) -> Entry:
        """(set name, the entry's key attributes) of a grant's key."""
        source, proto, port, destination = key
        bound, any_set = set_names(self.set_name, source.version)
        name = any_set if destination is None else bound
        return name, entry_key(source, port, _PROTO_NUMBERS[proto], destination)

    def _body(self, name: str, data: bytes) -> bytes:
        """A request's attributes for set ``name`` (the set's part built once)."""
        prefix = self._prefixes.get(name)
        if prefix is None:
            protocol = self._local.netlink.protocol
            prefix = self._prefixes[name] = set_prefix(protocol, name)
        return body(prefix, data)

    def _timeout(self, grant: Grant) -> int:
        """The entry's timeout: the grant's remaining seconds, rounded up (at least 1); 0
        (none) past ipset's largest."""
        remaining = math.ceil(grant.expires - self._clock())
        return 0 if remaining > MAX_TIMEOUT else max(1, remaining)

    def _add(
        self,
        pipe: _Pipe,
        grant: Grant,
        exclusive: bool,
        then: Callable[[], None] | None = None,
        failed: Callable[[NetlinkError], None] | None = None,
    ) -> None:
        """Add (or with ``exclusive`` off, replace) a grant's entry; ``then`` once done."""
        name, key = entry = self._entry(grant.key)
        # always the comment: an add without one clears it
        data = key + entry_extensions(self._timeout(grant), format_comment(grant))
        request = (IPSET_CMD_ADD, NLM_F_EXCL if exclusive else 0, self._body(name, data))

        def answer(code: int) -> None:
            if code == 0:
                if then is not None:
                    then()
            elif exclusive and code == IPSET_ERR_EXIST:
                raise _Surprise(f"set {name} holds {format_key(grant.key)} already")
            elif failed is not None:
                failed(_kernel_error(code, IPSET_CMD_ADD))
            else:
                raise _refused(code, IPSET_CMD_ADD, f"add grant {format_key(grant.key)}")

        pipe.put(entry, request, answer)

    def _del(
        self,
        pipe: _Pipe,
        entry: Entry,
        then: Callable[[bool], None] | None = None,
        failed: Callable[[NetlinkError], None] | None = None,
        what: str = "remove an entry",
    ) -> None:
        """Delete one entry; ``then(False)`` if it was not there (NLM_F_EXCL: the kernel
        says so instead of ignoring it)."""
        name, key = entry
        request = (IPSET_CMD_DEL, NLM_F_EXCL, self._body(name, key))

        def answer(code: int) -> None:
            if code in (0, IPSET_ERR_EXIST):
                if then is not None:
                    then(code == 0)
            elif failed is not None:
                failed(_kernel_error(code, IPSET_CMD_DEL))
            else:
                raise _refused(code, IPSET_CMD_DEL, what)

        pipe.put(entry, request, answer)

    def _test(self, pipe: _Pipe, entry: Entry) -> bool:
        """Whether the set holds the entry (now: what ``pipe`` holds goes out first)."""
        name, key = entry
        code = pipe.ask(entry, (IPSET_CMD_TEST, 0, self._body(name, key)))
        if code not in (0, IPSET_ERR_EXIST):
            raise _refused(code, IPSET_CMD_TEST, f"test {name}")
        return code == 0

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

    def _read(self, fam: Family) -> Iterator[tuple[Grant | str, Entry]]:
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

    def _parse(self, fam: Family, name: str, data: Any) -> tuple[Grant | str, Entry]:
        source = ip_address(data.get_attr("IPSET_ATTR_IP_FROM").get_attr(_ADDR[fam.version]))
        port = data.get_attr("IPSET_ATTR_PORT_FROM")
        proto_number = data.get_attr("IPSET_ATTR_PROTO")
        dest_attr = data.get_attr("IPSET_ATTR_IP2")
        destination = None
        if dest_attr is not None:
            destination = ip_address(dest_attr.get_attr(_ADDR[fam.version]))
        where = (name, entry_key(source, port, proto_number, destination))
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
            with super()._op(what, lock):  # an OSError becomes a FirewallError there
                try:
                    yield
                except OSError:  # our netlink socket's too (answers lost: ENOBUFS, timeout):
                    sock = getattr(self._local, "netlink", None)
                    if sock is not None:  # the next change starts on a fresh socket
                        sock.close()
                        self._local.netlink = None
                    raise
        except NetlinkError as error:
            change = getattr(error, "what", None)  # the change a batch's error was for
            where = f"{what}: {change}" if change and change != what else what
            raise FirewallError(f"ipset: {where}: {error}") from error
