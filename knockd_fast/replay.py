"""The replay cache: which (user id, SIV) pairs were accepted, until when (protocol.md §7.7).

Lookups are served from a dict in memory; every ``remember`` is also written to a
SQLite file and committed before it returns, so a restart never reopens the replay
window. Inside ``with cache.batch():`` the writes of the block are committed together
when it ends (one transaction: a commit costs ~70 µs, a row ~5 µs); the daemon judges
each capture batch in one such block and acts on the accepted knocks only after it.

If the file cannot be opened or written (read-only or missing directory, disk full,
corrupt file), the cache goes on from memory alone: it sets ``degraded`` to the
reason and logs one warning, never raising to the daemon.

It never fails open (docs/protocol.md §7.7):

- entries are kept for the longest ``window`` ever in force (``raise_window``, persisted):
  a window raised by SIGHUP or a restart extends the entries already cached;
- pruning needs both the wall clock past an entry's expiry and the entry held for at least
  that window by the monotonic clock: a wall clock stepped forward does not empty the
  cache, so stepping it back again does not reopen old messages;
- a file cache that starts without its history (no file yet, or one it cannot open)
  refuses every message sealed before it started (``blind_before``): a restart costs a
  user one re-knock, never a replay.

Expiry: the caller remembers an accepted message with ``expires_at = timestamp +
window`` (the message's unwrapped Unix timestamp; ``knockd_fast.verdict.replay_expiry``
computes it). ``expires_at`` is the last whole second at which the entry counts: at
``now`` the entry is live while ``int(now) <= expires_at``, the same whole-second
arithmetic by which check 4 still passes the message, so there is no gap between the
cache forgetting a message and check 4 rejecting it as expired.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("knockd_fast.replay")

DB_NAME = "replay.sqlite3"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    user_id INTEGER NOT NULL,
    siv BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, siv)
) WITHOUT ROWID;
-- No index on expires_at: pruning finds expired entries in memory and deletes them by
-- key, and the index cost every accepted knock a second B-tree insert.
DROP INDEX IF EXISTS seen_expires_at;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_WINDOW_KEY = "longest_window"
_UPSERT = """
INSERT INTO seen (user_id, siv, expires_at) VALUES (?, ?, ?)
ON CONFLICT (user_id, siv) DO UPDATE SET expires_at = max(expires_at, excluded.expires_at)
"""


def _second(now: float) -> int:
    return math.floor(now)


class ReplayCache:
    """Remembers (user_id, siv) -> expires_at (Unix seconds, inclusive; see module doc).

    ``path`` is the SQLite file (``for_state_dir`` names it ``replay.sqlite3`` in the
    state directory), or None for a cache in memory only (tests, offline replays). Its
    parent directory is created (mode 0700) if missing. ``now`` (default: the clock) is the
    start's wall time; ``window`` the window in force (``raise_window``); ``monotonic`` the
    clock that ages entries for pruning.
    """

    def __init__(
        self,
        path: Path | None,
        now: float | None = None,
        window: int = 0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.degraded: str | None = None
        self.window = 0  # the longest window ever in force (seconds)
        # Messages sealed before this second are refused: set when a file cache started
        # without its history (a new or unreadable file); None when it has it, or in memory.
        self.blind_before: int | None = None
        self._monotonic = monotonic
        self._entries: dict[tuple[int, bytes], int] = {}
        self._held_since: dict[tuple[int, bytes], float] = {}  # monotonic, for pruning
        self._db: sqlite3.Connection | None = None
        self._pending: dict[tuple[int, bytes], int] | None = None  # inside batch()
        if self.path is not None:
            self._open(_second(time.time() if now is None else now))
        self.raise_window(window)

    @classmethod
    def for_state_dir(
        cls, state_dir: Path, now: float | None = None, window: int = 0
    ) -> ReplayCache:
        return cls(Path(state_dir) / DB_NAME, now, window)

    # --- the cache ----------------------------------------------------------------------

    def seen(self, user_id: int, siv: bytes, now: float, sent_at: int | None = None) -> bool | str:
        """Whether this message counts as seen at ``now``: True while its entry is live; a
        string saying why if (``sent_at``, its unwrapped timestamp) it was sealed before a
        cache that started without its history; else False."""
        expires_at = self._entries.get((user_id, bytes(siv)))
        if expires_at is not None and _second(now) <= expires_at:
            return True
        if self.blind_before is not None and sent_at is not None and sent_at < self.blind_before:
            return (
                f"sealed before the replay cache started without its history "
                f"({self.blind_before - sent_at} s before); knock again"
            )
        return False

    def raise_window(self, window: int) -> None:
        """The window in force is ``window``: if it is the longest yet, every cached entry
        is extended by the difference (and the new longest window stored)."""
        extra = int(window) - self.window
        if extra <= 0:
            return
        self.window = int(window)
        for key in self._entries:
            self._entries[key] += extra
        if self._pending is not None:
            for key in self._pending:
                self._pending[key] += extra
        if self._db is None:
            return
        try:
            with self._db:
                self._db.execute("UPDATE seen SET expires_at = expires_at + ?", (extra,))
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (_WINDOW_KEY, self.window),
                )
        except sqlite3.Error as error:
            self._degrade(f"cannot write: {error}")

    def remember(self, user_id: int, siv: bytes, expires_at: int) -> None:
        """Remember an accepted message until ``expires_at`` (timestamp + window), durably."""
        key = (int(user_id), bytes(siv))
        expires_at = max(int(expires_at), self._entries.get(key, int(expires_at)))
        self._entries[key] = expires_at
        self._held_since.setdefault(key, self._monotonic())
        if self._pending is not None:
            self._pending[key] = expires_at
        else:
            self._write({key: expires_at})

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Write the ``remember`` calls of the block in one transaction, at its end."""
        if self._pending is not None:  # nested: the outer block commits
            yield
            return
        self._pending = {}
        try:
            yield
        finally:
            pending, self._pending = self._pending, None
            if pending:
                self._write(pending)

    def _write(self, rows: dict[tuple[int, bytes], int]) -> None:
        if self._db is None:
            return
        try:
            with self._db:  # commits, or rolls back on error
                self._db.executemany(_UPSERT, ((u, s, e) for (u, s), e in rows.items()))
        except sqlite3.Error as error:
            self._degrade(f"cannot write: {error}")

    def prune(self, now: float) -> int:
        """Forget entries no longer live at ``now`` that were also held for the whole
        window by the monotonic clock, in memory and on disk; return how many."""
        second = _second(now)
        old_enough = self._monotonic() - self.window
        expired = [
            key
            for key, expires_at in self._entries.items()
            if expires_at < second and self._held_since[key] <= old_enough
        ]
        for key in expired:
            del self._entries[key]
            del self._held_since[key]
        if self._db is not None and expired:
            try:
                with self._db:
                    self._db.executemany("DELETE FROM seen WHERE user_id = ? AND siv = ?", expired)
            except sqlite3.Error as error:
                self._degrade(f"cannot write: {error}")
        return len(expired)

    def live(self, now: float) -> list[tuple[int, bytes, int]]:
        """(user id, SIV, remembered until) of every message still remembered at ``now``."""
        second = _second(now)
        return [
            (user, siv, until) for (user, siv), until in self._entries.items() if until >= second
        ]

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            try:
                db.close()
            except sqlite3.Error:
                pass

    def __enter__(self) -> ReplayCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the file -----------------------------------------------------------------------

    def _open(self, second: int) -> None:
        assert self.path is not None
        db = None
        had_history = False
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
            had_history = bool(
                db.execute("SELECT 1 FROM sqlite_master WHERE name = 'seen'").fetchone()
            )
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit reaches the OS before remember() returns, so a
            # crash or kill -9 of the daemon loses nothing; only a power cut may lose the
            # last moments. FULL would fsync on the capture thread for every accepted knock.
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(
                    f"schema version {version}, this daemon writes {SCHEMA_VERSION}"
                )
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.isolation_level = "DEFERRED"  # `with db:` commits each statement at once
            # Every row, the expired ones too: the wall clock may have been stepped
            # forward while we were down; prune() forgets them once held a whole window.
            rows = db.execute("SELECT user_id, siv, expires_at FROM seen").fetchall()
            stored = db.execute("SELECT value FROM meta WHERE key = ?", (_WINDOW_KEY,)).fetchone()
        except (sqlite3.Error, OSError) as error:
            if db is not None:
                db.close()
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            self.blind_before = second
            self._degrade(f"cannot open: {reason}")
            return
        if not had_history:
            self.blind_before = second
        started = self._monotonic()
        for user_id, siv, expires_at in rows:
            if isinstance(user_id, int) and isinstance(siv, bytes) and isinstance(expires_at, int):
                self._entries[(user_id, siv)] = expires_at
                self._held_since[(user_id, siv)] = started
        if stored and isinstance(stored[0], int) and stored[0] > 0:
            self.window = stored[0]
        self._db = db

    def _degrade(self, reason: str) -> None:
        """Go on from memory only; warn once (the daemon's status shows ``degraded``)."""
        self.close()
        if self.degraded is None:
            self.degraded = reason
            log.warning(
                "replay cache %s: %s; continuing in memory only, so a restart forgets "
                "the messages accepted since",
                self.path,
                " ".join(str(reason).split()),
            )
