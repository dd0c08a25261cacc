"""Per-user caps: the judge's view of each user's live grants and recent accepted messages.

A user may hold at most ``max_grants`` live grants and have at most
``max_knocks_per_minute`` messages accepted in any 60 s (their own settings, or
``[limits]``). Without them one key opened 3,000 grants for 3,000 claimed-and-spoofed
addresses, and their firewall changes held up everyone else's.

The view is the judge's own, kept from the changes it hands to the firewall, the grants
read back at start and the grants' expiry; it never asks the firewall. It errs towards
counting too much: a grant another user's longer open took over, or one the firewall
failed to add, stays in the count until its expiry. Only a close that a full firewall
queue dropped leaves a grant in the firewall that is no longer counted, until its expiry.
Pure: every call is given its time.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from knock_client.protocol import Action

from .config import User
from .firewall.base import Grant, GrantChange, GrantKey

RATE_SECONDS = 60  # the window of max_knocks_per_minute
WARN_SECONDS = 60  # at most one cap warning per user this often


@dataclass(eq=False)
class _Account:
    """One user's live grants (key -> expires) and accepted messages of the last minute."""

    grants: dict[GrantKey, int] = field(default_factory=dict)
    # (second, messages accepted in it), oldest first: at most 60 entries whatever the cap.
    seconds: collections.deque[list[int]] = field(default_factory=collections.deque)
    accepted: int = 0  # the sum over ``seconds``
    warned_at: float = -math.inf


class Limits:
    """Who holds which grants until when, and who sent how much lately; by user name (as
    the firewall's grants carry it)."""

    def __init__(self, grants: Iterable[Grant] = ()) -> None:
        self._accounts: dict[str, _Account] = {}
        for grant in grants:  # read back from the firewall at start
            self._account(grant.user).grants[grant.key] = grant.expires

    def _account(self, name: str) -> _Account:
        account = self._accounts.get(name)
        if account is None:
            account = self._accounts[name] = _Account()
        return account

    def admit(self, user: User, change: GrantChange, now: float) -> str | None:
        """Count ``change`` (of an authentic, fresh, allowed message of ``user``) against the
        user's caps: why it would take the user past one, as a decision's detail (then
        nothing is counted); else None, and it is counted as accepted and handed on."""
        grant = change.grant
        account = self._accounts.get(grant.user)
        if account is None:
            account = self._accounts[grant.user] = _Account()
        second = int(now)
        seconds = account.seconds
        _forget_seconds(account, second - RATE_SECONDS)
        if account.accepted >= user.max_knocks_per_minute:
            return (
                f"max_knocks_per_minute {user.max_knocks_per_minute} reached for "
                f"{user.name!r}: {account.accepted} accepted in the last {RATE_SECONDS} s"
            )
        grants = account.grants
        key = grant.key
        closing = change.action == Action.CLOSE
        held = grants.get(key)
        # Only a new grant counts against max_grants: extending a held one or closing never.
        if not closing and held is None and len(grants) >= user.max_grants:
            _forget_expired(account, second)  # only here: the count costs nothing below it
            if len(grants) >= user.max_grants:
                return (
                    f"max_grants {user.max_grants} reached for {user.name!r}: "
                    f"{len(grants)} live grants"
                )
        if seconds and seconds[-1][0] >= second:
            seconds[-1][1] += 1  # a capture time a little behind counts as the last
        else:
            seconds.append([second, 1])
        account.accepted += 1
        if closing:
            if held is not None:
                del grants[key]
        elif held is None or grant.expires > held:  # as the firewall does: never shortened
            grants[key] = grant.expires
        return None

    def first_warning(self, name: str, now: float) -> bool:
        """Whether a cap hit of user ``name`` at ``now`` is the first in ``WARN_SECONDS``
        (then it is logged as a warning; the others only in the decision log)."""
        account = self._account(name)
        if now - account.warned_at < WARN_SECONDS:
            return False
        account.warned_at = now
        return True

    def live_grants(self, name: str, now: float) -> list[Grant]:
        """The grants user ``name`` holds at ``now``, as far as this view knows."""
        account = self._accounts.get(name)
        if account is None:
            return []
        _forget_expired(account, int(now))
        return [
            Grant(source, proto, port, destination, expires, name)
            for (source, proto, port, destination), expires in account.grants.items()
        ]

    def revoke(self, users: Mapping[int, User], now: float) -> list[tuple[Grant, str]]:
        """The live grants ``users`` (a new configuration) no longer entitle, each with why
        ("user removed", "port no longer allowed"); they leave this view at once."""
        by_name = {user.name: user for user in users.values()}
        revoked: list[tuple[Grant, str]] = []
        for name in list(self._accounts):
            user = by_name.get(name)
            for grant in self.live_grants(name, now):
                if user is None:
                    revoked.append((grant, "user removed"))
                elif not user.allows(grant.port, grant.proto):
                    revoked.append((grant, "port no longer allowed"))
                    del self._accounts[name].grants[grant.key]
            if user is None:
                del self._accounts[name]
        return revoked


def _forget_seconds(account: _Account, before: int) -> None:
    """Drop the accepted messages of seconds up to ``before`` (out of the window)."""
    seconds = account.seconds
    while seconds and seconds[0][0] <= before:
        account.accepted -= seconds.popleft()[1]


def _forget_expired(account: _Account, now: int) -> None:
    """Drop the grants whose expiry has come (``Grant.expired``: ``expires <= now``)."""
    gone = [key for key, expires in account.grants.items() if expires <= now]
    for key in gone:
        del account.grants[key]
