"""Per-user caps (knockd_fast.limits), as the judge applies them to real sealed messages.

Each knock here is an SPA completion record built from a message sealed with the user's
key, judged by ``Judge.decide`` with a replay cache in memory: the same path as live
knocks, without a capture. The clock is the decision time given to each call.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import numpy as np
import pytest

from knock_client.keys import write_key_file
from knock_client.protocol import Action, Knock, Proto, seal
from knockd_fast.capture_spec import COMPLETION_DTYPE, KIND_SPA, address_key
from knockd_fast.completions import Completion, completion_of
from knockd_fast.config import load_config
from knockd_fast.firewall.base import Grant
from knockd_fast.judging import Judge
from knockd_fast.replay import ReplayCache

NOW = 1_795_771_200
SERVER = ipaddress.IPv4Address("192.0.2.1")
KEYS = {7: bytes(range(64)), 8: bytes(range(64, 128))}
NAMES = {7: "alice", 8: "bob"}


def address(n: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address("198.18.0.0") + n


@pytest.fixture
def judge_for(tmp_path: Path):
    """judge_for(limits="", alice="") -> a Judge over a config with alice (7) and bob (8),
    both allowed 22/tcp and 443/tcp; ``limits`` and ``alice`` add lines to [limits] and to
    alice's entry."""

    def make(limits: str = "", alice: str = "", grants: tuple[Grant, ...] = ()) -> Judge:
        users = ""
        for user_id, name in NAMES.items():
            write_key_file(tmp_path / f"{name}.key", KEYS[user_id], overwrite=True)
            users += (
                f'[[users]]\nid = {user_id}\nname = "{name}"\nkey_file = "{name}.key"\n'
                'allow = ["22/tcp", "443/tcp"]\n' + (alice + "\n" if name == "alice" else "")
            )
        (tmp_path / "config.toml").write_text(
            f'[capture]\ninterface = "eth0"\n[limits]\n{limits}\n'
            f'[state]\ndirectory = "{tmp_path / "state"}"\n{users}'
        )
        return Judge(load_config(tmp_path / "config.toml"), ReplayCache(None), grants)

    return make


class Sender:
    """Seals one user's messages: each new (a fresh salt), dated ``when``."""

    def __init__(self, user_id: int) -> None:
        self.user_id = user_id
        self.salt = 0

    def message(
        self, source: ipaddress.IPv4Address, when: int, action: Action = Action.OPEN, port=22
    ) -> bytes:
        self.salt += 1
        knock = Knock(action, Proto.TCP, port, when, source, self.user_id, self.salt)
        return seal(knock, KEYS[self.user_id])


def record(message: bytes, source: ipaddress.IPv4Address) -> Completion:
    """The SPA completion the capture makes of ``message`` from ``source``."""
    found = np.zeros(1, dtype=COMPLETION_DTYPE)[0]
    found["kind"], found["family"], found["length"] = KIND_SPA, 4, len(message)
    found["source"] = list(address_key(source))
    found["destination"] = list(address_key(SERVER))
    found["message"][: len(message)] = list(message)
    return completion_of(found)


def knock(judge: Judge, sender: Sender, source, when: int = NOW, **fields):  # noqa: ANN001, ANN201
    """Seal, capture and judge one message at ``when``: (decision, change)."""
    return judge.decide(record(sender.message(source, when, **fields), source), when)


def test_a_user_at_max_grants_is_refused_as_limit_and_another_user_still_opens(
    judge_for,
) -> None:
    judge = judge_for()
    alice, bob = Sender(7), Sender(8)
    outcomes = [knock(judge, alice, address(n)) for n in range(20)]
    assert [d.reason for d, _ in outcomes] == ["ok"] * 16 + ["limit"] * 4
    refused, change = outcomes[16]
    assert (refused.verdict, refused.user, change) == ("rejected", "alice", None)
    assert refused.detail == "max_grants 16 reached for 'alice': 16 live grants"
    decision, change = knock(judge, bob, address(100))
    assert decision.accepted and change is not None and change.grant.user == "bob"


def test_extending_a_held_grant_and_closing_one_are_never_refused_by_max_grants(
    judge_for,
) -> None:
    judge = judge_for(limits="max_grants = 2")
    alice = Sender(7)
    for n in range(2):
        assert knock(judge, alice, address(n))[0].accepted
    assert knock(judge, alice, address(2))[0].reason == "limit"
    assert knock(judge, alice, address(0))[0].accepted  # the same grant, extended
    assert knock(judge, alice, address(5), action=Action.CLOSE)[0].accepted  # none held
    assert knock(judge, alice, address(1), action=Action.CLOSE)[0].accepted
    decision, change = knock(judge, alice, address(2))  # the close freed a place
    assert decision.accepted and change.action == Action.OPEN


def test_an_expired_grant_frees_its_place(judge_for) -> None:
    judge = judge_for(limits="max_grants = 1")
    alice = Sender(7)
    _, change = knock(judge, alice, address(0))
    expires = change.grant.expires
    assert expires == NOW + 300
    assert knock(judge, alice, address(1), when=expires - 1)[0].reason == "limit"
    assert knock(judge, alice, address(1), when=expires)[0].accepted  # expires <= now: gone


def test_max_knocks_per_minute_counts_every_accepted_message_in_any_60_seconds(
    judge_for,
) -> None:
    judge = judge_for(limits="max_knocks_per_minute = 3")
    alice = Sender(7)
    source = address(0)
    times = [NOW, NOW + 20, NOW + 40]  # an open, its extension, a close: three messages
    actions = [Action.OPEN, Action.OPEN, Action.CLOSE]
    for when, action in zip(times, actions, strict=True):
        assert knock(judge, alice, source, when, action=action)[0].accepted
    refused, change = knock(judge, alice, source, NOW + 59)
    assert (refused.reason, change) == ("limit", None)
    assert refused.detail == (
        "max_knocks_per_minute 3 reached for 'alice': 3 accepted in the last 60 s"
    )
    assert knock(judge, alice, source, NOW + 60)[0].accepted  # the first left the window
    assert knock(judge, alice, source, NOW + 61)[0].reason == "limit"
    assert knock(judge, Sender(8), source, NOW + 61)[0].accepted  # bob has his own count


def test_a_refused_message_is_not_remembered_and_counts_nothing(judge_for) -> None:
    """Refused, a message is not used up (as no rejected one is): the replay cache and the
    count stay as they were, and the same message is accepted once there is room."""
    judge = judge_for(limits="max_grants = 1\nmax_knocks_per_minute = 3")
    alice = Sender(7)
    knock(judge, alice, address(0))  # accepted message 1
    message = alice.message(address(1), NOW)
    remembered = len(judge.replay)
    for _ in range(10):
        assert judge.decide(record(message, address(1)), NOW)[0].reason == "limit"
    assert len(judge.replay) == remembered
    assert knock(judge, alice, address(0), NOW + 1, action=Action.CLOSE)[0].accepted  # 2
    decision, change = judge.decide(record(message, address(1)), NOW + 2)  # 3: not 13
    assert decision.accepted and change.grant.source == address(1)
    assert judge.decide(record(message, address(1)), NOW + 3)[0].reason == "replay"


def test_replays_and_forgeries_cost_the_victim_nothing(judge_for) -> None:
    """An attacker resending the victim's captured message from the victim's address, or
    sending garbage and messages under the victim's id: none of it reaches the caps."""
    judge = judge_for(limits="max_knocks_per_minute = 2")
    alice = Sender(7)
    message = alice.message(address(0), NOW)
    assert judge.decide(record(message, address(0)), NOW)[0].accepted
    forged = bytearray(alice.message(address(0), NOW))
    forged[-1] ^= 1
    for _ in range(100):
        assert judge.decide(record(message, address(0)), NOW)[0].reason == "replay"
        assert judge.decide(record(bytes(forged), address(0)), NOW)[0].reason == "authentication"
    assert knock(judge, alice, address(0), NOW + 1)[0].accepted  # the second of two


def test_a_users_own_caps_override_the_defaults_for_that_user_only(judge_for) -> None:
    judge = judge_for(limits="max_grants = 3", alice="max_grants = 1")
    alice, bob = Sender(7), Sender(8)
    assert [knock(judge, alice, address(n))[0].reason for n in range(2)] == ["ok", "limit"]
    assert [knock(judge, bob, address(n))[0].reason for n in range(4)] == ["ok"] * 3 + ["limit"]


def test_grants_read_back_at_start_count_against_their_users_caps(judge_for) -> None:
    live = [Grant(address(n), "tcp", 22, SERVER, NOW + 100, "alice") for n in range(2)]
    expired = Grant(address(9), "tcp", 22, SERVER, NOW - 1, "alice")  # not counted
    held = (*live, expired)
    judge = judge_for(limits="max_grants = 3", grants=held)
    alice = Sender(7)
    assert [knock(judge, alice, address(10 + n))[0].reason for n in range(2)] == ["ok", "limit"]
    assert knock(judge, alice, address(0))[0].accepted  # extends a grant read back


def test_a_cap_hit_is_a_warning_at_most_once_a_minute_per_user(judge_for, caplog) -> None:
    judge = judge_for(limits="max_grants = 1")
    alice, bob = Sender(7), Sender(8)
    with caplog.at_level(logging.WARNING, logger="knockd_fast"):
        for sender in (alice, bob):
            knock(judge, sender, address(0))
            for n in range(1, 5):
                assert knock(judge, sender, address(n), NOW + n)[0].reason == "limit"
        assert knock(judge, alice, address(9), NOW + 61)[0].reason == "limit"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    line = "limit: max_grants 1 reached for '{}': 1 live grants; knocks past it are refused "
    line += "(this warning at most once a minute)"
    assert warned == [line.format("alice"), line.format("bob"), line.format("alice")]
