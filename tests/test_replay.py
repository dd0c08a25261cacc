"""knockd_fast.replay: memory, persistence across instances, expiry, and degraded modes."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from knock_client.protocol import Action, Knock, Proto, seal
from knockd_fast.config import User
from knockd_fast.replay import DB_NAME, ReplayCache
from knockd_fast.verdict import judge, replay_expiry

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_795_771_200
SIV_A = bytes(range(16))
SIV_B = bytes(range(16, 32))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "knockd_fast.replay"]


# --- in memory ------------------------------------------------------------------------------


def test_memory_only() -> None:
    cache = ReplayCache(None)
    assert len(cache) == 0 and not cache.seen(7, SIV_A, NOW)
    cache.remember(7, SIV_A, NOW + 30)
    assert cache.seen(7, SIV_A, NOW) and len(cache) == 1
    assert not cache.seen(8, SIV_A, NOW) and not cache.seen(7, SIV_B, NOW)
    assert cache.degraded is None
    cache.close()


def test_expiry_is_inclusive_of_the_last_second() -> None:
    cache = ReplayCache(None)
    cache.remember(7, SIV_A, NOW + 30)
    assert cache.seen(7, SIV_A, NOW + 30)
    assert cache.seen(7, SIV_A, NOW + 30.999)  # check 4 still passes the message here
    assert not cache.seen(7, SIV_A, NOW + 31)
    assert len(cache) == 1  # seen() does not drop; prune() does


def test_remember_keeps_the_later_expiry() -> None:
    cache = ReplayCache(None)
    cache.remember(7, SIV_A, NOW + 30)
    cache.remember(7, SIV_A, NOW + 10)
    assert cache.seen(7, SIV_A, NOW + 30) and len(cache) == 1


def test_prune_memory() -> None:
    cache = ReplayCache(None)
    cache.remember(7, SIV_A, NOW)
    cache.remember(7, SIV_B, NOW + 10)
    assert cache.prune(NOW) == 0
    assert cache.prune(NOW + 1) == 1
    assert len(cache) == 1 and cache.seen(7, SIV_B, NOW + 1)
    assert cache.prune(NOW + 100) == 1 and len(cache) == 0


def test_siv_as_bytearray_or_memoryview() -> None:
    cache = ReplayCache(None)
    cache.remember(7, bytearray(SIV_A), NOW)
    assert cache.seen(7, memoryview(SIV_A), NOW)


# --- on disk ------------------------------------------------------------------------------


def test_persists_across_instances(tmp_path: Path) -> None:
    cache = ReplayCache.for_state_dir(tmp_path, now=NOW)
    assert cache.path == tmp_path / DB_NAME
    cache.remember(7, SIV_A, NOW + 30)
    cache.remember(4095, SIV_B, NOW + 5)
    cache.close()

    again = ReplayCache(tmp_path / DB_NAME, now=NOW + 10)
    assert again.degraded is None
    assert again.seen(7, SIV_A, NOW + 10)
    assert not again.seen(4095, SIV_B, NOW + 10)  # expired before the restart
    # ... but loaded all the same: the clock may have been stepped forward while the
    # daemon was down; prune() forgets it once held for a whole window.
    assert len(again) == 2
    again.close()


def test_every_remember_is_committed_at_once(tmp_path: Path) -> None:
    """A crash (no close) loses nothing: another connection sees the row right away."""
    cache = ReplayCache(tmp_path / DB_NAME, now=NOW)
    cache.remember(7, SIV_A, NOW + 30)
    other = sqlite3.connect(tmp_path / DB_NAME)
    assert other.execute("SELECT user_id, siv, expires_at FROM seen").fetchall() == [
        (7, SIV_A, NOW + 30)
    ]
    other.close()
    assert ReplayCache(tmp_path / DB_NAME, now=NOW).seen(7, SIV_A, NOW)
    cache.close()


def test_batch_commits_once_at_the_end_of_the_block(tmp_path: Path) -> None:
    """Inside batch() lookups see every remember at once; the file sees them at the end."""
    cache = ReplayCache(tmp_path / DB_NAME, now=NOW)
    other = sqlite3.connect(tmp_path / DB_NAME)
    with cache.batch():
        cache.remember(7, SIV_A, NOW + 30)
        cache.remember(8, SIV_B, NOW + 5)
        cache.remember(7, SIV_A, NOW + 10)  # the later expiry stays
        with cache.batch():  # nested blocks commit with the outer one
            cache.remember(9, SIV_A, NOW + 1)
        assert cache.seen(7, SIV_A, NOW + 30) and cache.seen(9, SIV_A, NOW)
        assert other.execute("SELECT COUNT(*) FROM seen").fetchone() == (0,)
    assert sorted(other.execute("SELECT user_id, siv, expires_at FROM seen").fetchall()) == [
        (7, SIV_A, NOW + 30),
        (8, SIV_B, NOW + 5),
        (9, SIV_A, NOW + 1),
    ]
    other.close()
    cache.close()


def test_batch_commits_when_the_block_raises(tmp_path: Path) -> None:
    """What was remembered before an error is still written: it may have been acted on."""
    cache = ReplayCache(tmp_path / DB_NAME, now=NOW)
    with pytest.raises(RuntimeError), cache.batch():
        cache.remember(7, SIV_A, NOW + 30)
        raise RuntimeError("judging bug")
    cache.close()
    assert ReplayCache(tmp_path / DB_NAME, now=NOW).seen(7, SIV_A, NOW)


def test_database_layout(tmp_path: Path) -> None:
    ReplayCache(tmp_path / DB_NAME, now=NOW).close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'seen'").fetchone()
    assert "PRIMARY KEY (user_id, siv)" in sql and "WITHOUT ROWID" in sql
    db.close()


def test_the_index_no_lookup_used_is_dropped_from_an_older_file(tmp_path: Path) -> None:
    """Pruning deletes by key: an index on expires_at only cost each knock a B-tree insert.
    A file of an earlier version loses it at the next start, and keeps its entries."""
    with ReplayCache(tmp_path / DB_NAME, now=NOW) as cache:
        cache.remember(7, SIV_A, NOW + 30)
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("CREATE INDEX seen_expires_at ON seen (expires_at)")
    db.commit()
    assert ["expires_at"] in _indexed_columns(db)
    db.close()
    with ReplayCache(tmp_path / DB_NAME, now=NOW) as cache:
        assert cache.seen(7, SIV_A, NOW)
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert _indexed_columns(db) == [["user_id", "siv"]]  # the primary key's only
    db.close()


def _indexed_columns(db: sqlite3.Connection) -> list[list[str]]:
    indexes = db.execute("PRAGMA index_list(seen)").fetchall()
    return [[c[2] for c in db.execute(f"PRAGMA index_info({row[1]})")] for row in indexes]


def test_prune_on_disk(tmp_path: Path) -> None:
    cache = ReplayCache(tmp_path / DB_NAME, now=NOW)
    cache.remember(7, SIV_A, NOW)
    cache.remember(7, SIV_B, NOW + 10)
    assert cache.prune(NOW + 5) == 1
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("SELECT siv FROM seen").fetchall() == [(SIV_B,)]
    db.close()
    cache.close()


def test_a_restart_in_an_entrys_last_second_still_refuses_the_replay(tmp_path: Path) -> None:
    """The on-disk prune and the restart load keep an entry through its last second.

    A prune that dropped entries expiring in the current second, or a load that skipped
    them, would let the message through after a restart within that second, while check 4
    (the window) still passes it."""
    last = NOW + 30
    cache = ReplayCache(tmp_path / DB_NAME, now=NOW)
    cache.remember(7, SIV_A, last)
    cache.remember(7, SIV_B, last - 1)
    assert cache.prune(last) == 1  # B's last second has passed; A's is now
    cache.close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("SELECT siv FROM seen").fetchall() == [(SIV_A,)]
    db.close()
    restarted = ReplayCache(tmp_path / DB_NAME, now=last + 0.999)
    assert restarted.seen(7, SIV_A, last + 0.999)
    restarted.close()
    again = ReplayCache(tmp_path / DB_NAME, now=last + 1)
    assert not again.seen(7, SIV_A, last + 1)
    again.close()


# --- never failing open (docs/protocol.md 7.7) -------------------------------------------------


def test_a_raised_window_extends_the_cached_entries_across_a_restart(tmp_path: Path) -> None:
    cache = ReplayCache(tmp_path / DB_NAME, now=NOW, window=30)
    cache.remember(7, SIV_A, NOW + 30)  # sealed at NOW, remembered for the window of 30 s
    cache.raise_window(60)  # a SIGHUP raises the window: the message is valid until NOW + 60
    assert cache.seen(7, SIV_A, NOW + 31) and cache.seen(7, SIV_A, NOW + 60)
    assert not cache.seen(7, SIV_A, NOW + 61)
    cache.raise_window(20)  # lowering it keeps the longest ever in force
    assert cache.window == 60 and cache.seen(7, SIV_A, NOW + 60)
    cache.close()
    # Restarted with the old window: the longest one is remembered with the entries.
    again = ReplayCache(tmp_path / DB_NAME, now=NOW + 1, window=30)
    assert again.window == 60 and again.seen(7, SIV_A, NOW + 59)
    again.close()


def test_a_wall_clock_stepped_forward_does_not_empty_the_cache(tmp_path: Path) -> None:
    tick = [1000.0]
    cache = ReplayCache(tmp_path / DB_NAME, now=NOW, window=30, monotonic=lambda: tick[0])
    cache.remember(7, SIV_A, NOW + 30)
    tick[0] += 10
    assert cache.prune(NOW + 86_400) == 0  # the wall clock jumped a day; held 10 s of 30
    # Stepped back again: the old message is still known.
    assert cache.seen(7, SIV_A, NOW + 5)
    tick[0] += 20  # held for the whole window now, and expired by the wall clock
    assert cache.prune(NOW + 86_400) == 1 and len(cache) == 0
    cache.close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("SELECT COUNT(*) FROM seen").fetchone() == (0,)
    db.close()


def test_a_cache_that_starts_without_its_history_refuses_messages_sealed_before(
    tmp_path: Path,
) -> None:
    # No file yet: nothing says what was accepted before this start.
    fresh = ReplayCache(tmp_path / "new" / DB_NAME, now=NOW + 0.5, window=30)
    assert fresh.blind_before == NOW
    assert "sealed before the replay cache started" in fresh.seen(7, SIV_A, NOW + 1, NOW - 1)
    assert not fresh.seen(7, SIV_A, NOW + 1, NOW)  # sealed in the second it started: fine
    fresh.close()
    # Restarted on that file, it has its history: nothing refused for its age.
    again = ReplayCache(tmp_path / "new" / DB_NAME, now=NOW + 10, window=30)
    assert again.blind_before is None and not again.seen(7, SIV_A, NOW + 11, NOW - 1)
    again.close()
    # A file it cannot read is no history either.
    corrupt = tmp_path / "corrupt.sqlite3"
    corrupt.write_bytes(b"this is not a database" * 100)
    degraded = ReplayCache(corrupt, now=NOW, window=30)
    assert degraded.degraded and degraded.blind_before == NOW
    assert degraded.seen(7, SIV_A, NOW + 1, NOW - 20)
    # In memory only (offline replays, tests): there is no history to miss.
    assert not ReplayCache(None, now=NOW).seen(7, SIV_A, NOW + 1, NOW - 20)


def test_state_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "knockd-fast" / DB_NAME
    cache = ReplayCache(path, now=NOW)
    cache.remember(1, SIV_A, NOW)
    assert cache.degraded is None and path.exists()
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    cache.close()


def test_close_is_idempotent_and_a_context_manager(tmp_path: Path) -> None:
    with ReplayCache(tmp_path / DB_NAME, now=NOW) as cache:
        cache.remember(1, SIV_A, NOW)
    cache.close()
    assert ReplayCache(tmp_path / DB_NAME, now=NOW).seen(1, SIV_A, NOW)


# --- degraded: never raises, warns once, keeps working in memory ----------------------------


def check_degraded_works(cache: ReplayCache) -> None:
    cache.remember(7, SIV_A, NOW + 30)
    cache.remember(7, SIV_B, NOW)
    assert cache.seen(7, SIV_A, NOW + 1) and not cache.seen(7, SIV_B, NOW + 1)
    assert cache.prune(NOW + 1) == 1 and len(cache) == 1
    cache.close()


def test_state_dir_is_a_regular_file(tmp_path: Path, caplog) -> None:
    """Unwritable even for root: the state 'directory' is a file."""
    blocker = tmp_path / "state"
    blocker.write_text("not a directory\n")
    caplog.set_level(logging.WARNING, logger="knockd_fast.replay")
    cache = ReplayCache.for_state_dir(blocker, now=NOW)
    assert cache.degraded is not None and cache.degraded.startswith("cannot open")
    check_degraded_works(cache)
    messages = warnings_of(caplog)
    assert len(messages) == 1 and "\n" not in messages[0]
    assert str(blocker / DB_NAME) in messages[0] and "memory only" in messages[0]


def test_unwritable_proc_path(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="knockd_fast.replay")
    cache = ReplayCache(Path("/proc/self/knockd-fast-test") / DB_NAME, now=NOW)
    assert cache.degraded is not None
    check_degraded_works(cache)
    assert len(warnings_of(caplog)) == 1


def test_corrupt_database_file(tmp_path: Path, caplog) -> None:
    path = tmp_path / DB_NAME
    garbage = b"this is not an SQLite database\n" * 200
    path.write_bytes(garbage)
    caplog.set_level(logging.WARNING, logger="knockd_fast.replay")
    cache = ReplayCache(path, now=NOW)
    assert cache.degraded is not None and "not a database" in cache.degraded
    check_degraded_works(cache)
    assert len(warnings_of(caplog)) == 1
    assert path.read_bytes() == garbage  # left for the admin to look at, never overwritten


def test_foreign_schema_version(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    cache = ReplayCache(path, now=NOW)
    assert cache.degraded is not None and "schema version 99" in cache.degraded
    check_degraded_works(cache)


def test_write_failure_after_open_warns_once(tmp_path: Path, caplog) -> None:
    """The database goes away under the cache (here: its connection breaks)."""
    cache = ReplayCache(tmp_path / DB_NAME, now=NOW)
    cache.remember(7, SIV_A, NOW + 30)

    class Broken:
        def __enter__(self):
            raise sqlite3.OperationalError("database or disk is full")

        def __exit__(self, *exc_info):
            return False

        def close(self) -> None:
            pass

    cache._db = Broken()  # type: ignore[assignment]
    caplog.set_level(logging.WARNING, logger="knockd_fast.replay")
    cache.remember(7, SIV_B, NOW + 30)
    cache.prune(NOW)
    cache.remember(8, SIV_B, NOW + 30)
    assert cache.degraded == "cannot write: database or disk is full"
    assert cache.seen(7, SIV_A, NOW) and cache.seen(7, SIV_B, NOW) and cache.seen(8, SIV_B, NOW)
    assert len(warnings_of(caplog)) == 1


DISK_FULL = textwrap.dedent(
    """
    import json, logging, resource, signal, sys
    from pathlib import Path
    from knockd_fast.replay import ReplayCache

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    cache = ReplayCache(Path(sys.argv[1]), now=1000)
    opened = cache.degraded
    resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, resource.RLIM_INFINITY))
    count = 0
    for count in range(1, 301):
        cache.remember(7, count.to_bytes(16, "big"), 2000)
    seen = all(cache.seen(7, n.to_bytes(16, "big"), 1500) for n in range(1, 301))
    print(json.dumps({"opened": opened, "degraded": cache.degraded, "len": len(cache),
                      "seen": seen}))
    """
)


def test_disk_full_for_real(tmp_path: Path) -> None:
    """A file size limit (RLIMIT_FSIZE binds root too) makes the writes fail mid-run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "client")]))
    result = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(tmp_path / DB_NAME)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["opened"] is None
    assert report["degraded"] is not None and report["degraded"].startswith("cannot write")
    assert report["len"] == 300 and report["seen"]
    warnings = [line for line in result.stderr.splitlines() if "knockd_fast.replay" in line]
    assert len(warnings) == 1, result.stderr
    # What was committed before the failure survives a restart.
    again = ReplayCache(tmp_path / DB_NAME, now=1000)
    assert again.degraded is None and again.seen(7, (1).to_bytes(16, "big"), 1500)
    again.close()


def test_corrupt_rows_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    ReplayCache(path, now=NOW).close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO seen VALUES ('x', ?, ?)", (SIV_A, NOW + 30))
    db.execute("INSERT INTO seen VALUES (7, 'text', ?)", (NOW + 30,))
    db.execute("INSERT INTO seen VALUES (7, ?, ?)", (SIV_B, NOW + 30))
    db.commit()
    db.close()
    cache = ReplayCache(path, now=NOW)
    assert cache.degraded is None and len(cache) == 1 and cache.seen(7, SIV_B, NOW)
    cache.close()


@pytest.mark.parametrize("delay", [0, 1, 29, 30, 30.5, 30.999, 31, 45])
def test_no_gap_between_the_cache_and_the_window(delay: float) -> None:
    """A replay is refused as `replay` while check 4 would pass it, then as `expired`."""
    key = bytes(64)
    users = {7: User(7, "u", key, Path("k"), frozenset({(22, "tcp")}), {4: 32, 6: 128})}
    claimed = ipaddress.ip_address("192.0.2.10")
    message = seal(Knock(Action.OPEN, Proto.TCP, 22, NOW, claimed, 7, 1), key)
    cache = ReplayCache(None)

    def verdict(now: float):
        def seen(user_id: int, siv: bytes, sent_at: int) -> str:
            return cache.seen(user_id, siv, now, sent_at)

        return judge([message], claimed, None, now, users, 30, seen)

    first = verdict(NOW)
    assert first.accepted
    cache.remember(7, first.siv, replay_expiry(first.knock, NOW, 30))
    cache.prune(NOW + delay)
    assert verdict(NOW + delay).reason == ("replay" if delay < 31 else "expired")
