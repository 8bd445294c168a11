"""Store and forward: a bounded on-disk FIFO (SQLite in the data dir) for telemetry and events.

Entries leave the queue only when the broker has acknowledged them (PUBACK), so nothing is lost while
the broker is down, up to the bound; past it the oldest entries are dropped and counted. Each entry gets
a per-device monotonic ``seq`` (kept across restarts) that receivers use to drop a rare duplicate.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    id: int
    topic: str
    payload: bytes


class Outbox:
    def __init__(self, path: Path, max_entries: int) -> None:
        self.path = path
        self.max_entries = max_entries
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
            " payload BLOB NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
        self._lock = threading.Lock()
        self.has_entries = threading.Event()
        if len(self):
            self.has_entries.set()

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta(k, v) VALUES(?, ?) ON CONFLICT(k) DO UPDATE SET v=excluded.v", (key, value)
        )

    def put(self, topic: str, build: Callable[[int], bytes]) -> int:
        """Allocate the next seq, build the payload with it and enqueue it, in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._meta("next_seq") + 1
                self._set_meta("next_seq", seq)
                self._db.execute("INSERT INTO outbox(topic, payload) VALUES(?, ?)", (topic, build(seq)))
                (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
                excess = count - self.max_entries
                if excess > 0:
                    self._db.execute(
                        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)",
                        (excess,),
                    )
                    self._set_meta("dropped", self._meta("dropped") + excess)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self.has_entries.set()
        return seq

    def peek(self) -> Entry | None:
        with self._lock:
            row = self._db.execute("SELECT id, topic, payload FROM outbox ORDER BY id LIMIT 1").fetchone()
        if row is None:
            return None
        return Entry(int(row[0]), str(row[1]), bytes(row[2]))

    def ack(self, entry_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id=?", (entry_id,))
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        if not count:
            self.has_entries.clear()

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._meta("dropped")

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._meta("next_seq")

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)

    def close(self) -> None:
        with self._lock:
            self._db.close()
