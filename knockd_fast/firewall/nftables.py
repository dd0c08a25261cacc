"""The nftables backend: grants as elements of kernel sets with timeouts, through libnftables.

What is in the kernel (``table`` is ``knockd_fast`` by default, family ``inet``)::

    table inet knockd_fast {
        set grants4  { type ipv4_addr . inet_proto . inet_service; flags timeout; }
        set grants4d { type ipv4_addr . inet_proto . inet_service . ipv4_addr; flags timeout; }
        set grants6  { type ipv6_addr . inet_proto . inet_service; flags timeout; }
        set grants6d { type ipv6_addr . inet_proto . inet_service . ipv6_addr; flags timeout; }
        chain input {      # and "forward" when grants.hooks has FORWARD
            type filter hook input priority filter - 10; policy accept;
            ip saddr . meta l4proto . th dport @grants4 accept
            ip saddr . meta l4proto . th dport . ip daddr @grants4d accept
            (the same for ip6)
            # protect mode only (grants.protect = ["22/tcp", ...]):
            ct state established,related accept
            meta l4proto tcp th dport 22 drop
        }
    }

One element per grant: ``source . proto . port`` (in ``grantsN``) or ``source . proto . port .
destination`` (in ``grantsNd``), with ``timeout`` = the seconds left (at least 1, rounded
down: the kernel closes the port no later than the grant's expiry, also while the daemon is
dead) and ``comment`` = ``format_comment(grant)`` (user and absolute expiry, so a restarted
daemon or ``status`` reads the grants back). nft allows 128 bytes of comment
(``MAX_COMMENT_BYTES``): the config refuses a user name too long for it.

An accept in one base chain does not override a drop in another base chain of the same
hook: every base chain must accept. So either the daemon owns the drop (protect mode: our
chain drops the protected ports unless a set holds the packet), or the admin's own ruleset
references our sets (sets-only mode, ``nft_sets_only``: only the sets are made, in the table
``nft_table`` names, which may be the admin's own ``inet`` table; sets cannot be referenced
from another table).

How it changes. Writes go through one libnftables context, reads through another; each
``open``/``close`` is one transaction, ``apply_batch`` one for the lot. The backend keeps a
view of the grants it holds (read back at ``reconcile``/``grants``) and decides from it,
so an open never reads the kernel: its cost does not grow with the number of grants.
A new grant is one ``add``. Extending one deletes and re-adds its element in one
transaction (re-adding an existing element refreshes its timeout only from Linux 6.12; 6.1
ignores it). Each delete is preceded by an add of the same key, so it cannot fail if the
kernel has already timed the element out: ``add; delete; add`` replaces on every kernel.

``repair`` lists our table without elements (terse) once a sweep and compares it with what
``setup`` makes, by the comments on our rules and the sets' types; when it differs (``nft
flush ruleset``, a firewalld reload) the table is rebuilt in one transaction with the live
grants. Expiry needs no kernel work: the kernel drops timed-out elements itself; ``expire``
only drops them from the view.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from knock_client.protocol import Action
from knockd_fast.addresses import address_text
from knockd_fast.firewall.base import (
    PROTOCOLS,
    ChangeOutcome,
    FirewallError,
    Grant,
    GrantChange,
    GrantKey,
    check_families,
    format_comment,
    format_key,
    parse_comment,
    sort_key,
)
from knockd_fast.firewall.libnftables import OUTPUT_TERSE, Nft, NftError
from knockd_fast.firewall.xtables import check_hooks

if TYPE_CHECKING:
    from knockd_fast.config import GrantSettings

log = logging.getLogger("knockd_fast.firewall")

DEFAULT_TABLE = "knockd_fast"
DEFAULT_PRIORITY = -10  # "filter - 10": before iptables-nft's and firewalld's filter chains
MAX_COMMENT_BYTES = 128  # nft refuses longer element comments (NFTNL_UDATA_COMMENT_MAXLEN)
FAMILY = "inet"
RULE_TAG = "knockd-fast"  # every rule we make carries a comment starting with it
_HOOK_CHAINS = {"INPUT": ("input", "input"), "FORWARD": ("forward", "forward")}
_ADDR = {4: ("ip", "ipv4_addr"), 6: ("ip6", "ipv6_addr")}
_NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,30}")


def check_table(name: str) -> str:
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"nftables table name {name!r}: 1..31 characters of A-Z a-z 0-9 _, a letter first"
        )
    return name


def check_priority(priority: int) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"nftables priority {priority!r} is not an integer")
    if not -1000 <= priority <= 1000:
        raise ValueError(f"nftables priority {priority}: must be in -1000..1000")
    return priority


def check_protect(protect: Iterable[tuple[int, str]]) -> tuple[tuple[int, str], ...]:
    items = tuple((int(port), str(proto)) for port, proto in protect)
    for port, proto in items:
        if proto not in PROTOCOLS or not 1 <= port <= 65535:
            raise ValueError(f"protected port {port}/{proto}: a port 1..65535 and tcp or udp")
    if len(set(items)) != len(items):
        raise ValueError("a protected port is listed twice")
    return items


def comment_fits(user: str) -> bool:
    """Whether the element comment of a grant by ``user`` fits nft's 128 bytes (whatever
    the expiry)."""
    probe = Grant("192.0.2.1", "tcp", 1, None, 2**63 - 1, user)
    return len(format_comment(probe).encode()) <= MAX_COMMENT_BYTES


def set_name(family: int, bound: bool) -> str:
    """The set of one family's grants: ``grants4``, or ``grants4d`` bound to a destination."""
    return f"grants{family}{'d' if bound else ''}"


_UNTOUCHED = object()  # a key the changes planned so far leave as the view has it


def _key_value(key: GrantKey) -> dict[str, Any]:
    source, proto, port, destination = key
    parts: list[Any] = [address_text(source), proto, port]
    if destination is not None:
        parts.append(address_text(destination))
    return {"concat": parts}


def _timeout(grant: Grant, now: float) -> int:
    """Seconds left, rounded down, at least 1 (nft timeouts are relative)."""
    return max(1, int(grant.expires - now))


class NftablesFirewall:
    """Grants as elements of timeout sets in our own nftables table (family ``inet``).

    ``hooks``: INPUT (this host) and/or FORWARD (hosts behind it): a base chain each.
    ``families``: 4, 6 or both. ``protect``: (port, proto) pairs our chains drop unless
    granted. ``sets_only``: make only the sets (no chains), for a ruleset of the admin's
    own that references them. ``priority``: of our base chains. ``clock``: for timeouts.
    """

    name = "nftables"
    persistent = True

    def __init__(
        self,
        table: str = DEFAULT_TABLE,
        hooks: tuple[str, ...] = ("INPUT",),
        *,
        families: tuple[int, ...] = (4, 6),
        protect: Iterable[tuple[int, str]] = (),
        sets_only: bool = False,
        priority: int = DEFAULT_PRIORITY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.table = check_table(table)
        self.hooks = check_hooks(hooks)
        self.families = check_families(families)
        self.protect = check_protect(protect)
        self.sets_only = bool(sets_only)
        if self.sets_only and self.protect:
            raise ValueError("protect and sets_only exclude each other")
        self.priority = check_priority(priority)
        self.clock = clock
        try:
            self._write = Nft()
            self._read = Nft()
        except NftError as error:
            raise FirewallError(f"nftables: {error}") from None
        self._view: dict[GrantKey, Grant] = {}
        self._mutex = threading.RLock()

    @classmethod
    def from_settings(cls, settings: GrantSettings) -> NftablesFirewall:
        return cls(
            settings.nft_table,
            settings.hooks,
            protect=settings.protect,
            sets_only=settings.nft_sets_only,
            priority=settings.nft_priority,
        )

    # -- the interface ------------------------------------------------------------------

    def setup(self) -> None:
        with self._mutex:
            if self._intact():
                return
            live = self._merge(self._read_kernel(), self.clock())
            self._rebuild(live, "setup")
            self._view = {g.key: g for g in live}

    def repair(self) -> list[Grant] | None:
        with self._mutex:
            if self._intact():
                return None
            now = self.clock()
            live = self._merge(self._read_kernel(), now)
            self._rebuild(live, "repair")
            self._view = {g.key: g for g in live}
            return sorted(live, key=sort_key)

    def grants(self) -> list[Grant]:
        with self._mutex:
            found, _ = self._scan()
            self._view = found
            return sorted(found.values(), key=sort_key)

    def open(self, grant: Grant) -> Grant:
        what = f"add grant {format_key(grant.key)}"
        return self._commit([GrantChange(Action.OPEN, grant)], what)[0]

    def close(self, key: GrantKey, user: str | None = None) -> bool:
        key = tuple(getattr(key, "key", key))  # a Grant is accepted for its key
        if key[0].version not in self.families:
            return False
        change = GrantChange(Action.CLOSE, Grant(key[0], key[1], key[2], key[3], 0, user or ""))
        return self._commit([change], f"remove grant {format_key(key)}", any_user=user is None)[0]

    def apply_batch(self, changes: Sequence[GrantChange]) -> list[ChangeOutcome]:
        return self._commit(list(changes), f"a batch of {len(changes)} changes")

    def reconcile(self, now: int) -> tuple[list[Grant], list[Grant]]:
        with self._mutex:
            found, junk = self._scan(keep_expired=True)
            removed = [g for g in found.values() if g.expired(now)]
            elements = _Elements(self.table)
            for grant in removed:
                self._delete(grant.key, elements)
            for set_, value, why in junk:
                log.warning(
                    "reconcile: removed element %s of set %s, not a grant: %s",
                    value,
                    set_,
                    why,
                )
                elements.add("add", set_, value)  # the delete cannot fail if it timed out
                elements.add("delete", set_, value)
            if elements.commands:
                self._run(self._write, elements.commands, "reconcile")
            self._view = {k: g for k, g in found.items() if not g.expired(now)}
            return sorted(self._view.values(), key=sort_key), sorted(removed, key=sort_key)

    def expire(self, now: int) -> list[Grant]:
        """The kernel removed timed-out elements itself: drop them from the view."""
        with self._mutex:
            gone = [g for g in self._view.values() if g.expired(now)]
            for grant in gone:
                del self._view[grant.key]
            return sorted(gone, key=sort_key)

    def teardown(self) -> None:
        with self._mutex:
            table = {"family": FAMILY, "name": self.table}
            if self.sets_only:
                commands = []
                for set_def in self._set_defs():
                    commands += [{"add": {"set": set_def}}, {"delete": {"set": _ref(set_def)}}]
            else:  # add first: deleting a table that is not there would fail
                commands = [{"add": {"table": table}}, {"delete": {"table": table}}]
            self._run(self._write, commands, "teardown")
            self._view.clear()

    # -- changes ----------------------------------------------------------------------

    def _commit(
        self, changes: list[GrantChange], what: str, any_user: bool = False
    ) -> list[ChangeOutcome]:
        """Plan ``changes`` against a copy of the view, run them as one transaction, and
        take the new view only when the kernel took it all."""
        with self._mutex:
            now = self.clock()
            # What the changes do to the view, applied only once the kernel took them all
            # (None: removed). No copy of the view: its size must not cost an open anything.
            overlay: dict[GrantKey, Grant | None] = {}
            elements = _Elements(self.table)
            outcomes: list[ChangeOutcome] = []
            for change in changes:
                grant = change.grant
                if grant.family not in self.families:
                    raise FirewallError(
                        f"nftables: {what}: {format_key(grant.key)}: IPv{grant.family} is not "
                        f"enabled (families {', '.join(map(str, self.families))})"
                    )
                key = grant.key
                held = overlay.get(key, _UNTOUCHED)
                if held is _UNTOUCHED:
                    held = self._view.get(key)
                if held is not None and held.expired(now):
                    held = None  # the kernel has timed it out (our timeouts round down)
                if change.action == Action.CLOSE:
                    # Only the grant's own user may close it (any_user: an admin tool).
                    if held is None or not (any_user or held.user == grant.user):
                        outcomes.append(False)
                        continue
                    self._delete(key, elements)
                    overlay[key] = None
                    outcomes.append(True)
                    continue
                # An open never shortens a grant (nor takes it from its user).
                if held is not None and held.expires >= grant.expires:
                    outcomes.append(held)
                    continue
                comment = format_comment(grant)
                if len(comment.encode()) > MAX_COMMENT_BYTES:
                    raise FirewallError(
                        f"nftables: {what}: {format_key(grant.key)}: user name too long for "
                        f"an element comment ({MAX_COMMENT_BYTES} bytes)"
                    )
                if held is not None:
                    # Extend: delete and add again. A re-add alone would not refresh the
                    # timeout before Linux 6.12 (6.1 ignores it); the delete is preceded by
                    # an add so that it cannot fail if the kernel timed the element out.
                    self._delete(key, elements)
                self._add(grant, now, elements, comment)
                overlay[key] = grant
                outcomes.append(grant)
            if elements.commands:
                self._run(self._write, elements.commands, what)
            for key, value in overlay.items():
                if value is None:
                    self._view.pop(key, None)
                else:
                    self._view[key] = value
            return outcomes

    @staticmethod
    def _add(
        grant: Grant, now: float, elements: _Elements, comment: str | None = None
    ) -> None:
        elem = {
            "val": _key_value(grant.key),
            "timeout": _timeout(grant, now),
            "comment": format_comment(grant) if comment is None else comment,
        }
        elements.add("add", set_name(grant.family, grant.destination is not None), {"elem": elem})

    @staticmethod
    def _delete(key: GrantKey, elements: _Elements) -> None:
        """Remove ``key``'s element; added first (timeout 1 s), so that the delete cannot
        fail if the kernel timed the element out meanwhile."""
        set_ = set_name(key[0].version, key[3] is not None)
        value = _key_value(key)
        elements.add("add", set_, {"elem": {"val": value, "timeout": 1}})
        elements.add("delete", set_, value)

    # -- what setup makes -----------------------------------------------------------------

    def _set_defs(self) -> list[dict[str, Any]]:
        defs = []
        for family in self.families:
            for bound in (False, True):
                addr = _ADDR[family][1]
                types = [addr, "inet_proto", "inet_service"] + ([addr] if bound else [])
                defs.append(
                    {
                        "family": FAMILY,
                        "table": self.table,
                        "name": set_name(family, bound),
                        "type": types,
                        "flags": ["timeout"],
                    }
                )
        return defs

    def _chain_defs(self) -> list[tuple[dict[str, Any], list[tuple[str, list[Any]]]]]:
        """Each base chain and its rules, as (comment, expressions)."""
        if self.sets_only:
            return []
        rules: list[tuple[str, list[Any]]] = []
        for family in self.families:
            proto = _ADDR[family][0]
            for bound in (False, True):
                parts: list[Any] = [
                    {"payload": {"protocol": proto, "field": "saddr"}},
                    {"meta": {"key": "l4proto"}},
                    {"payload": {"protocol": "th", "field": "dport"}},
                ]
                if bound:
                    parts.append({"payload": {"protocol": proto, "field": "daddr"}})
                name = set_name(family, bound)
                match = {"match": {"op": "==", "left": {"concat": parts}, "right": f"@{name}"}}
                rules.append((f"{RULE_TAG} {name}", [match, {"accept": None}]))
        if self.protect:
            state = {"ct": {"key": "state"}}
            known = ["established", "related"]
            established = {"match": {"op": "in", "left": state, "right": known}}
            rules.append((f"{RULE_TAG} established", [established, {"accept": None}]))
            l4proto = {"meta": {"key": "l4proto"}}
            for port, proto in self.protect:
                rules.append(
                    (
                        f"{RULE_TAG} protect {port}/{proto}",
                        [
                            {"match": {"op": "==", "left": l4proto, "right": proto}},
                            {
                                "match": {
                                    "op": "==",
                                    "left": {"payload": {"protocol": "th", "field": "dport"}},
                                    "right": port,
                                }
                            },
                            {"drop": None},
                        ],
                    )
                )
        chains = []
        for hook in self.hooks:
            chain_name, hook_name = _HOOK_CHAINS[hook]
            chain = {
                "family": FAMILY,
                "table": self.table,
                "name": chain_name,
                "type": "filter",
                "hook": hook_name,
                "prio": self.priority,
                "policy": "accept",
            }
            chains.append((chain, rules))
        return chains

    def _rebuild(self, grants: list[Grant], what: str) -> None:
        """Make everything ``setup`` makes, with ``grants`` in the sets, in one transaction."""
        table = {"family": FAMILY, "name": self.table}
        commands: list[dict[str, Any]] = [{"add": {"table": table}}]
        if not self.sets_only:  # the whole table is ours: start it afresh
            commands += [{"delete": {"table": table}}, {"add": {"table": table}}]
        # In sets-only mode the table may be the admin's, whose rules may reference our
        # sets: an "add" of a set that is there as defined changes nothing.
        commands += [{"add": {"set": set_def}} for set_def in self._set_defs()]
        for chain, rules in self._chain_defs():
            commands.append({"add": {"chain": chain}})
            for comment, expr in rules:
                rule = {**_ref(chain, "chain"), "expr": expr, "comment": comment}
                commands.append({"add": {"rule": rule}})
        now = self.clock()
        elements = _Elements(self.table)
        for grant in grants:
            if not grant.expired(int(now)):
                if self.sets_only:  # the element may still be there: replace it
                    self._delete(grant.key, elements)
                self._add(grant, now, elements)
        self._run(self._write, commands + elements.commands, what)

    def _expected(self) -> tuple:
        sets = sorted((d["name"], tuple(d["type"]), ("timeout",)) for d in self._set_defs())
        chains = sorted(
            (c["name"], c["hook"], c["prio"], c["policy"], tuple(comment for comment, _ in rules))
            for c, rules in self._chain_defs()
        )
        return tuple(sets), tuple(chains)

    def _intact(self) -> bool:
        """Whether our table holds what ``setup`` makes: one terse listing (no elements)."""
        self._read.set_flags(OUTPUT_TERSE)
        try:
            # The whole ruleset, terse: "list table" would fetch every element of our sets
            # (0.9 s at 50,000), a terse ruleset listing fetches none (0.3 ms).
            items = self._read.run([{"list": {"ruleset": None}}])
        except NftError as error:
            raise FirewallError(f"nftables: check our table: {error}") from None
        sets, chains, rules = [], {}, {}
        ours = {d["name"] for d in self._set_defs()}
        for item in items:
            (body,) = item.values()
            if not isinstance(body, dict) or body.get("table", body.get("name")) != self.table:
                continue
            if body.get("family") != FAMILY:
                continue
            if "set" in item and (not self.sets_only or item["set"]["name"] in ours):
                s = item["set"]
                sets.append((s["name"], tuple(_listify(s["type"])), tuple(s.get("flags", ()))))
            elif "chain" in item:
                c = item["chain"]
                chains[c["name"]] = (c.get("hook"), c.get("prio"), c.get("policy"))
                rules.setdefault(c["name"], [])
            elif "rule" in item:
                r = item["rule"]
                rules.setdefault(r["chain"], []).append(r.get("comment", ""))
        if self.sets_only:
            return tuple(sorted(sets)) == self._expected()[0]
        found = sorted((name, *chains[name], tuple(rules.get(name, []))) for name in chains)
        return (tuple(sorted(sets)), tuple(found)) == self._expected()

    # -- reading the kernel ---------------------------------------------------------------

    def _read_kernel(self) -> list[Grant]:
        try:
            found, _ = self._scan(keep_expired=True)
        except FirewallError:
            return []
        return list(found.values())

    def _merge(self, kernel: list[Grant], now: float) -> list[Grant]:
        """The kernel's grants and the view's, the later of each key, not expired."""
        merged: dict[GrantKey, Grant] = {}
        for grant in [*kernel, *self._view.values()]:
            if grant.expired(int(now)):
                continue
            held = merged.get(grant.key)
            if held is None or grant.expires > held.expires:
                merged[grant.key] = grant
        return list(merged.values())

    def _scan(self, keep_expired: bool = False) -> tuple[dict[GrantKey, Grant], list]:
        """Our sets' elements: (grants by key, [(set, value, why) of elements that are no
        grant]). A missing set holds nothing."""
        found: dict[GrantKey, Grant] = {}
        junk: list[tuple[str, Any, str]] = []
        now = int(self.clock())
        self._read.set_flags(0)
        for set_def in self._set_defs():
            name = set_def["name"]
            try:
                items = self._read.run([{"list": {"set": _ref(set_def)}}])
            except NftError as error:
                if "No such file or directory" in str(error):
                    continue
                raise FirewallError(f"nftables: read set {name}: {error}") from None
            for item in items:
                for elem in item.get("set", {}).get("elem", []):
                    parsed = _parse_elem(elem)
                    if isinstance(parsed, str):
                        value = elem
                        if isinstance(elem, dict) and isinstance(elem.get("elem"), dict):
                            value = elem["elem"].get("val", elem)
                        junk.append((name, value, parsed))
                    elif keep_expired or not parsed.expired(now):
                        held = found.get(parsed.key)
                        if held is None or parsed.expires > held.expires:
                            found[parsed.key] = parsed
        return found, junk

    def _run(self, ctx: Nft, commands: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
        try:
            return ctx.run(commands)
        except NftError as error:
            raise FirewallError(f"nftables: {what}: {error}") from None


class _Elements:
    """Element changes in the order given, as libnftables commands: each run of one verb on
    one set is one command of all its elements. The same transaction, and a burst of grants
    costs libnftables and the JSON encoder about half what a command per element did."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.commands: list[dict[str, Any]] = []
        self._run: tuple[str, str] | None = None
        self._elems: list[Any] = []

    def add(self, verb: str, set_: str, elem: Any) -> None:
        """``verb`` ("add" or "delete") ``elem`` in set ``set_``, after what came before."""
        if self._run != (verb, set_):
            self._run, self._elems = (verb, set_), []
            element = {"family": FAMILY, "table": self.table, "name": set_, "elem": self._elems}
            self.commands.append({verb: {"element": element}})
        self._elems.append(elem)


def _ref(obj: dict[str, Any], key: str = "name") -> dict[str, Any]:
    """family, table and name of a set or chain definition (``key``: what to call the name)."""
    return {"family": obj["family"], "table": obj["table"], key: obj["name"]}


def _listify(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _parse_elem(elem: Any) -> Grant | str:
    """The grant one listed element holds, or why it is not one of ours."""
    if not isinstance(elem, dict) or "elem" not in elem:
        return "has no comment"
    body = elem["elem"]
    value = body.get("val")
    parts = value.get("concat") if isinstance(value, dict) else None
    if not isinstance(parts, list) or len(parts) not in (3, 4):
        return f"value {value!r} is not source . proto . port [. destination]"
    comment = parse_comment(str(body.get("comment", "")))
    if comment is None:
        return f"comment {body.get('comment')!r} is not a grant's"
    user, expires = comment
    destination = parts[3] if len(parts) == 4 else None
    try:
        return Grant(parts[0], parts[1], parts[2], destination, expires, user)
    except (ValueError, TypeError) as error:
        return str(error)
