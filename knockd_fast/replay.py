"""The replay cache: which (user id, SIV) pairs were accepted, until when (protocol.md §7.7).

Lookups are served from a dict in memory; every ``remember`` is also written to a
SQLite file and committed before it returns, so a restart never reopens the replay
window. Inside ``with cache.batch():`` the writes of the block are committed together
when it ends (one transaction: a commit costs ~70 µs, a row ~5 µs); the daemon judges
each capture batch in one such block and acts on the accepted knocks only after it.

If the file cannot be opened or written (read-only or missing directory, disk full,
corrupt file), the cache goes on from memory alone: it sets ``degraded`` to the
reason and logs one warning, never raising to the daemon. Protection then holds until
the next restart only.

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
from collections.abc import Iterator
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
CREATE INDEX IF NOT EXISTS seen_expires_at ON seen (expires_at);
"""
_UPSERT = """
INSERT INTO seen (user_id, siv, expires_at) VALUES (?, ?, ?)
ON CONFLICT (user_id, siv) DO UPDATE SET expires_at = max(expires_at, excluded.expires_at)
"""


def _second(now: float) -> int:
    return math.floor(now)


class ReplayCache:
    """Remembers (user_id, siv) -> expires_at (Unix seconds, inclusive; see module doc).

    ``path`` is the SQLite file (``for_state_dir`` names it ``replay.sqlite3`` in the
    state directory), or None for a cache in memory only (tests, dry runs). Its parent
    directory is created (mode 0700) if missing. ``now`` (default: the clock) decides
    which stored entries are still worth loading.
    """

    def __init__(self, path: Path | None, now: float | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.degraded: str | None = None
        self._entries: dict[tuple[int, bytes], int] = {}
        self._db: sqlite3.Connection | None = None
        self._pending: dict[tuple[int, bytes], int] | None = None  # inside batch()
        if self.path is not None:
            self._open(_second(time.time() if now is None else now))

    @classmethod
    def for_state_dir(cls, state_dir: Path, now: float | None = None) -> ReplayCache:
        return cls(Path(state_dir) / DB_NAME, now)

    # --- the cache ----------------------------------------------------------------------

    def seen(self, user_id: int, siv: bytes, now: float) -> bool:
        """Whether this message was remembered and its entry is still live at ``now``."""
        expires_at = self._entries.get((user_id, bytes(siv)))
        return expires_at is not None and _second(now) <= expires_at

    def remember(self, user_id: int, siv: bytes, expires_at: int) -> None:
        """Remember an accepted message until ``expires_at`` (timestamp + window), durably."""
        key = (int(user_id), bytes(siv))
        expires_at = max(int(expires_at), self._entries.get(key, int(expires_at)))
        self._entries[key] = expires_at
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
        """Forget entries no longer live at ``now``, in memory and on disk; return how many."""
        second = _second(now)
        expired = [key for key, expires_at in self._entries.items() if expires_at < second]
        for key in expired:
            del self._entries[key]
        if self._db is not None:
            try:
                with self._db:
                    self._db.execute("DELETE FROM seen WHERE expires_at < ?", (second,))
            except sqlite3.Error as error:
                self._degrade(f"cannot write: {error}")
        return len(expired)

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
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
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
            rows = db.execute(
                "SELECT user_id, siv, expires_at FROM seen WHERE expires_at >= ?", (second,)
            ).fetchall()
        except (sqlite3.Error, OSError) as error:
            if db is not None:
                db.close()
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            self._degrade(f"cannot open: {reason}")
            return
        for user_id, siv, expires_at in rows:
            if isinstance(user_id, int) and isinstance(siv, bytes) and isinstance(expires_at, int):
                self._entries[(user_id, siv)] = expires_at
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
