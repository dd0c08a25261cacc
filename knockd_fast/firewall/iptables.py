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

import logging
import struct
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING, Any

import iptc

from knock_client.protocol import Action
from knockd_fast.firewall.base import (
    ChangeOutcome,
    Grant,
    GrantChange,
    GrantKey,
    format_comment,
    format_key,
    parse_comment,
    sort_key,
)
from knockd_fast.firewall.libiptc import (
    FAMILIES,
    Family,
    XtablesBackend,
    delete_at,
    entries,
    target_of,
    target_offset,
)

if TYPE_CHECKING:
    from knockd_fast.config import GrantSettings

log = logging.getLogger("knockd_fast.firewall")

_MATCH_HEADER = struct.Struct("=H29sB")  # struct xt_entry_match: size, name, revision
_TCP = struct.Struct("=4H4B")  # struct xt_tcp: spts[2], dpts[2], option, flg_mask, flg_cmp, inv
_UDP = struct.Struct("=4HB")  # struct xt_udp: spts[2], dpts[2], invflags
_COMMENT_BYTES = 256  # struct xt_comment_info
_TIME_STOP = struct.Struct("=I")  # struct xt_time_info's date_stop, after its date_start
_TIME_LIMIT = 2**32  # date_stop is a __u32 of Unix seconds
_PROTO_NUMBERS = {"tcp": 6, "udp": 17}
_PROTO_NAMES = {6: "tcp", 17: "udp"}


def _parse(fam: Family, raw: bytes, target: str | None) -> Grant | str:
    """The grant an entry of our chain holds, or why it is not one of ours."""
    end = target_offset(fam, raw)
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
    while offset < end:
        size, name_bytes, revision = _MATCH_HEADER.unpack_from(raw, offset)
        name = name_bytes.split(b"\0", 1)[0].decode("ascii", "replace")
        data = offset + _MATCH_HEADER.size
        if size < _MATCH_HEADER.size or offset + size > end:
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


def _expires_by(raw: bytes, now: int) -> bool:
    """Cheap pre-filter: whether the entry has our comment with an expiry <= now."""
    start = raw.find(b" expires=")
    if start < 0:
        return False
    digits = raw[start + 9 : raw.find(b"\0", start)]
    return digits.isdigit() and int(digits) <= now


class IptablesFirewall(XtablesBackend):
    """Grants as ACCEPT rules in our own chain of the legacy xtables filter tables.

    The chain, the jumps, the lock and its wait: ``libiptc.XtablesBackend`` (the arguments
    are its). Its ``apply_batch`` (``AppliesBatches``) carries out many changes in one
    libiptc commit per family; its ``repair`` (``SelfHealing``) re-creates the chain and
    jumps and re-adds the grants it knows of when someone removed them.
    """

    name = "iptables"
    persistent = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._view: dict[GrantKey, Grant] = {}

    @classmethod
    def from_settings(cls, settings: GrantSettings) -> IptablesFirewall:
        return cls(settings.chain, settings.hooks)

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
        fam = FAMILIES[key[0].version]
        with self._op(f"remove grant {format_key(key)}", lock=True):
            found = self._transaction(fam, lambda table: self._close(fam, table, key, user))
            held = self._view.get(key)
            # Also when the rule was gone already: a grant closed by its user must not come
            # back with the next repair.
            if found or (held is not None and (user is None or held.user == user)):
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

    def apply_batch(self, changes: Sequence[GrantChange]) -> list[ChangeOutcome]:
        """``open`` and ``close`` one by one, as one libiptc commit per family (a table is
        committed whole, so each family's changes are one kernel transaction).

        The outcomes come from the rules read once, under the lock, before anything is
        changed (each change sees those before it); then each family's table is edited
        and committed once. If the second family's commit fails, the first family's rules
        are put back as they were (a compensating commit) before the error is raised.
        Rule order within the chain may differ from one-by-one (ACCEPT rules: it does not
        matter); what the chain holds does not.
        """
        for change in changes:
            if change.action == Action.OPEN:
                self._family_of(change.grant.source, f"add grant {format_key(change.grant.key)}")
        with self._op(f"apply a batch of {len(changes)} changes", lock=True):
            wanted = [fam for fam in self._fams if any(_in(fam, c) for c in changes)]
            plans: dict[int, tuple[list[ChangeOutcome | None], dict, dict]] = {}
            outcomes: list[ChangeOutcome | None] = [None] * len(changes)
            done: list[tuple[Family, dict]] = []
            try:
                for fam in wanted:
                    mine = [(i, c) for i, c in enumerate(changes) if _in(fam, c)]
                    before, after = self._transaction(
                        fam, lambda table, fam=fam, mine=mine: self._batch(fam, table, mine, plans)
                    )
                    done.append((fam, before))
                    for index, outcome in plans[fam.version][0]:
                        outcomes[index] = outcome
                    for key, grant in after.items():
                        if grant is None:
                            self._view.pop(key, None)
                        else:
                            self._view[key] = grant
            except Exception:
                for committed, before in done:
                    self._undo(committed, before)
                raise
            # None left: closes of a family not enabled, which hold nothing
            return [False if outcome is None else outcome for outcome in outcomes]

    def repair(self) -> list[Grant] | None:
        """Cheap check (each sweep): the chain and each hook's jump first, and the chain not
        empty while grants are live. Else: ``setup`` and the live grants written back, in
        one commit per family. Reads each family's table (proportional to its size)."""
        with self._mutex:
            now = time.time()
            live = {k: g for k, g in self._view.items() if g.expires > now}
            with self._op("check the chain", lock=False):
                intact = True
                for fam in self._fams:
                    table = fam.table()
                    table.refresh()
                    has = any(k[0].version == fam.version for k in live)
                    if not self._in_place(fam, table) or (has and not table.first_rule(self.chain)):
                        intact = False
            if intact:
                return None
            self.setup()
            with self._op("re-add the live grants", lock=True):
                for fam in self._fams:
                    mine = {k: g for k, g in live.items() if k[0].version == fam.version}
                    if mine:
                        self._transaction(
                            fam, lambda table, fam=fam, mine=mine: self._write(fam, table, mine)
                        )
            return sorted(live.values(), key=sort_key)

    # -- one family's table: each returns (changed, result) --------------------------------

    def _open(self, fam: Family, table: Any, grant: Grant) -> tuple[bool, Grant]:
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
                delete_at(table, self.chain, index)
        else:
            append_grant_rule(table, self.chain, rule)
        return True, in_force

    def _close(self, fam: Family, table: Any, key: GrantKey, user: str | None) -> tuple[bool, bool]:
        if not table.is_chain(self.chain):
            return False, False
        # Only the grant's own user may close it (None: whoever asks, e.g. an admin tool).
        same = [i for i, g in self._find(fam, table, key) if user is None or g.user == user]
        for index in reversed(same):
            delete_at(table, self.chain, index)
        return bool(same), bool(same)

    def _reconcile(self, fam: Family, table: Any, now: int) -> tuple[bool, Any]:
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
            delete_at(table, self.chain, index)
        return bool(drop), ({key: grant for key, (_, grant) in live.items()}, gone, bad)

    def _expire(self, fam: Family, table: Any, now: int) -> tuple[bool, list[Grant]]:
        """Delete the expired grants; only rules whose comment says so are parsed."""
        if not table.is_chain(self.chain):
            return False, []
        found = self._scan(fam, table, lambda raw: _expires_by(raw, now))
        drop = [i for i, item in enumerate(found) if isinstance(item, Grant) and item.expired(now)]
        for index in reversed(drop):
            delete_at(table, self.chain, index)
        return bool(drop), [found[index] for index in drop]

    def _batch(
        self, fam: Family, table: Any, mine: list[tuple[int, GrantChange]], plans: dict
    ) -> tuple[bool, tuple[dict, dict]]:
        """Work out the outcome of each change from the rules in force, then write the
        end state of each key touched. Result: (state before, state after) by key."""
        self._need_chain(fam, table)
        keys = {change.grant.key for _, change in mine}
        held = self._held(fam, table, keys)
        before = {key: held.get(key) for key in keys}
        state = dict(before)
        results: list[tuple[int, ChangeOutcome]] = []
        for index, change in mine:
            g, current = change.grant, state[change.grant.key]
            if change.action == Action.CLOSE:
                ours = current is not None and (g.user is None or current.user == g.user)
                if ours:
                    state[g.key] = None
                results.append((index, ours))
            elif current is None or current.expires < g.expires:
                state[g.key] = g
                results.append((index, g))
            else:
                results.append((index, current))
        plans[fam.version] = (results, before, state)
        changed, _ = self._write(fam, table, state)
        return changed, (before, state)

    def _held(self, fam: Family, table: Any, keys: set[GrantKey]) -> dict[GrantKey, Grant]:
        """The grant in force for each of ``keys`` (the latest of duplicates)."""
        where = slice(fam.src, fam.src + fam.addr_len)
        sources = {key[0].packed for key in keys}
        found: dict[GrantKey, Grant] = {}
        for item in self._scan(fam, table, lambda raw: raw[where] in sources):
            if isinstance(item, Grant) and item.key in keys:
                _keep_latest(found, item)
        return found

    def _write(
        self, fam: Family, table: Any, state: dict[GrantKey, Grant | None]
    ) -> tuple[bool, None]:
        """Make the rules of each key in ``state`` exactly its grant (or none): replace in
        place where a rule is, then delete the rest (from the bottom), then append."""
        self._need_chain(fam, table)
        where = slice(fam.src, fam.src + fam.addr_len)
        sources = {key[0].packed for key in state}
        found: dict[GrantKey, list[tuple[int, Grant]]] = {}
        for index, item in enumerate(self._scan(fam, table, lambda raw: raw[where] in sources)):
            if isinstance(item, Grant) and item.key in state:
                found.setdefault(item.key, []).append((index, item))
        chain = iptc.Chain(table, self.chain)
        drop: list[int] = []
        append: list[Grant] = []
        replaced = False
        for key, grant in state.items():
            rules = found.get(key, [])
            if grant is None:
                drop += [index for index, _ in rules]
            elif not rules:
                append.append(grant)
            elif [g for _, g in rules] != [grant]:
                chain.replace_rule(self._rule(fam, grant), rules[0][0])
                drop += [index for index, _ in rules[1:]]
                replaced = True
        for index in sorted(drop, reverse=True):
            delete_at(table, self.chain, index)
        for grant in append:
            append_grant_rule(table, self.chain, self._rule(fam, grant))
        return bool(replaced or drop or append), None

    def _undo(self, fam: Family, before: dict[GrantKey, Grant | None]) -> None:
        """Put the rules of the keys a committed batch touched back as they were."""
        try:
            self._transaction(fam, lambda table: self._write(fam, table, before))
        except Exception as error:  # the batch's own error is the one to raise
            log.error("iptables: cannot undo a batch in the IPv%d table: %s", fam.version, error)
            return
        for key, grant in before.items():
            if grant is None:
                self._view.pop(key, None)
            else:
                self._view[key] = grant

    def _scan(
        self, fam: Family, table: Any, pick: Callable[[bytes], bool] | None = None
    ) -> list[Grant | str | None]:
        """Each rule of our chain parsed (a Grant, or why not), or None where ``pick``
        says the raw entry is not worth parsing."""
        return [
            _parse(fam, raw, target_of(table, entry)) if pick is None or pick(raw) else None
            for raw, entry in entries(table, self.chain)
        ]

    def _find(self, fam: Family, table: Any, key: GrantKey) -> list[tuple[int, Grant]]:
        """(index, grant) of the grants with ``key`` in our chain (parsing only same-source
        rules)."""
        where, packed = slice(fam.src, fam.src + fam.addr_len), key[0].packed
        found = self._scan(fam, table, lambda raw: raw[where] == packed)
        return [(index, item) for index, item in enumerate(found) if _has_key(item, key)]

    def _rule(self, fam: Family, grant: Grant) -> Any:
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
        return rule


def append_grant_rule(table: Any, chain: str, rule: Any) -> None:
    """Append a rule built by ``_rule`` to ``chain`` without python-iptables' final_check():
    it re-parses every option through shlex, 60 % of the 0.83 ms a rule costs (what a batch
    of a thousand grants spends most on), and none of our matches (tcp/udp, comment, time)
    has a final check that changes its entry; the kernel checks each entry at commit.
    (``Chain.replace_rule``, for extensions, never calls it either.)"""
    table.append_entry(chain, rule.rule)


def _in(fam: Family, change: GrantChange) -> bool:
    return change.grant.source.version == fam.version


def _has_key(item: Grant | str, key: GrantKey) -> bool:
    return isinstance(item, Grant) and item.key == key


def _keep_latest(found: dict[GrantKey, Grant], grant: Grant) -> None:
    if grant.key not in found or grant.expires > found[grant.key].expires:
        found[grant.key] = grant
