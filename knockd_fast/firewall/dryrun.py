"""A firewall that only pretends: grants live in memory, every action is logged.

Used by ``knockd-fast replay`` and by the ``dry-run`` backend. It follows the same rules
as the iptables backend (same keys, same expiry test, same results), so a replay shows
what the daemon would have done. ``actions`` keeps the last ``history`` log lines.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from knock_client.protocol import Action
from knockd_fast.firewall.base import (
    ChangeOutcome,
    FirewallError,
    Grant,
    GrantChange,
    GrantKey,
    check_families,
    format_key,
    sort_key,
)
from knockd_fast.firewall.xtables import DEFAULT_CHAIN, check_chain, check_hooks

if TYPE_CHECKING:
    from knockd_fast.config import GrantSettings

log = logging.getLogger("knockd_fast.firewall")


class DryRunFirewall:
    """Same interface as ``IptablesFirewall``; touches nothing outside this object."""

    name = "dry-run"
    persistent = False

    def __init__(
        self,
        chain: str = DEFAULT_CHAIN,
        hooks: tuple[str, ...] = ("INPUT",),
        *,
        families: tuple[int, ...] = (4, 6),
        history: int = 1000,
        logger: logging.Logger | None = None,
        level: int = logging.INFO,
    ) -> None:
        self.chain = check_chain(chain)
        self.hooks = check_hooks(hooks)
        self.families = check_families(families)
        self.actions: collections.deque[str] = collections.deque(maxlen=history)
        self._log = logger or log
        self._level = level  # the daemon logs each action itself, and passes DEBUG
        self._grants: dict[GrantKey, Grant] = {}
        # (expires, key) of every grant held, as a heap: expire() looks at the due ones only
        # (entries of grants since extended or closed are skipped when they come up).
        self._expiries: list[tuple[int, int, GrantKey]] = []  # the count orders equal times:
        self._pushed = itertools.count()  # keys (addresses of two families, None) do not
        # Inside apply_batch: each changed key's grant before the batch (None: none), so a
        # failed batch is undone without copying every grant held.
        self._journal: dict[GrantKey, Grant | None] | None = None
        self._ready = False

    @classmethod
    def from_settings(cls, settings: GrantSettings) -> DryRunFirewall:
        """The daemon's dry run: its firewall worker logs every change, so the dry run's
        own lines go to debug, and it keeps no history."""
        return cls(settings.chain, settings.hooks, history=0, level=logging.DEBUG)

    def _say(self, text: str) -> None:
        self.actions.append(text)
        self._log.log(self._level, "dry-run: would %s", text)

    def _saying(self) -> bool:
        # The daemon keeps no history and logs at debug: then skip building the text.
        return bool(self.actions.maxlen) or self._log.isEnabledFor(self._level)

    def setup(self) -> None:
        if not self._ready:
            self._say(f"create chain {self.chain} and jump to it from {', '.join(self.hooks)}")
            self._ready = True

    def grants(self) -> list[Grant]:
        return sorted(self._grants.values(), key=sort_key)

    def open(self, grant: Grant) -> Grant:
        if grant.family not in self.families:
            raise FirewallError(
                f"dry-run: add grant {format_key(grant.key)}: IPv{grant.family} is not enabled"
            )
        held = self._grants.get(grant.key)
        if held is not None and held.expires >= grant.expires:
            return held  # an open never shortens a grant (nor takes it from its user)
        if self._journal is not None:
            self._journal.setdefault(grant.key, held)
        self._grants[grant.key] = grant
        heapq.heappush(self._expiries, (grant.expires, next(self._pushed), grant.key))
        if self._saying():
            self._say(f"{'extend' if held else 'add'} grant {grant}")
        return grant

    def close(self, key: GrantKey, user: str | None = None) -> bool:
        key = tuple(getattr(key, "key", key))  # a Grant is accepted for its key
        held = self._grants.get(key)
        if held is None or (user is not None and held.user != user):
            return False  # only the grant's own user may close it
        if self._journal is not None:
            self._journal.setdefault(key, held)
        del self._grants[key]
        self._say(f"remove grant {held}")
        return True

    def apply_batch(self, changes: Sequence[GrantChange]) -> list[ChangeOutcome]:
        """The changes one by one, all or nothing (as a kernel transaction would be)."""
        journal = self._journal = {}
        try:
            return [
                self.close(change.grant.key, change.grant.user)
                if change.action == Action.CLOSE
                else self.open(change.grant)
                for change in changes
            ]
        except FirewallError:
            for key, grant in journal.items():
                if grant is None:
                    self._grants.pop(key, None)
                else:
                    self._grants[key] = grant
                    heapq.heappush(self._expiries, (grant.expires, next(self._pushed), key))
            raise
        finally:
            self._journal = None

    def reconcile(self, now: int) -> tuple[list[Grant], list[Grant]]:
        removed = self.expire(now)
        return self.grants(), removed

    def expire(self, now: int) -> list[Grant]:
        due: dict[GrantKey, Grant] = {}
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            expires, _, key = heapq.heappop(expiries)
            held = self._grants.get(key)
            if held is not None and held.expires == expires:  # else extended, or gone
                due[key] = held
        gone = sorted(due.values(), key=sort_key)
        for grant in gone:
            del self._grants[grant.key]
            self._say(f"remove expired grant {grant}")
        return gone

    def teardown(self) -> None:
        self._grants.clear()
        self._expiries.clear()
        self._ready = False
        self._say(f"remove the jumps to {self.chain} and the chain")
