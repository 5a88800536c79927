"""The bounded on-disk FIFO that feedback events wait in until Kafka acknowledges them.

SQLite in WAL mode: an append is one small committed transaction (tens of microseconds with
``synchronous=NORMAL``: a crashed process loses nothing, a power cut may lose the last few
appends), rows come out in ``seq`` order, and they are deleted only when the caller says they
were delivered. Appends never pay for a WAL checkpoint (automatic checkpoints are off; the
drain thread calls :meth:`Spool.checkpoint`) and never wait for the drain thread's reads (it
reads through its own connection), which keeps the append tail at ~0.1 ms instead of ~20 ms.

Several processes may share one spool directory (replicas on one host, uvicorn workers). Each
takes the first free *slot*: ``feedback.sqlite3``, then ``feedback-1.sqlite3``, ... guarded by
an exclusive ``flock`` on a sibling ``.lock`` file, so no two processes ever drain the same
rows. When a process opens its slot it also adopts the rows of any slot nobody holds (a worker
that is gone), so nothing is stranded when the number of processes shrinks.
"""

from __future__ import annotations

import fcntl
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

Row = tuple[int, str, bytes | None, bytes, float]
"""(seq, topic, key, value, created_at)"""

_MAX_SLOTS = 64
_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letter (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    created_at REAL NOT NULL,
    error TEXT NOT NULL
);
"""


class SpoolFull(RuntimeError):
    """The spool cannot take more events (cap reached or disk error): answer 503 + Retry-After."""

    def __init__(self, message: str, retry_after_s: int = 30) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _db_name(slot: int) -> str:
    return "feedback.sqlite3" if slot == 0 else f"feedback-{slot}.sqlite3"


def _try_lock(path: Path) -> IO[bytes] | None:
    """An open file holding an exclusive flock on ``path``, or None if another process holds it."""
    f = open(path, "wb")  # noqa: SIM115 - returned to the caller, who keeps it open while it holds the lock
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


class Spool:
    """A bounded, thread-safe FIFO of (topic, key, value) rows in one SQLite slot of ``directory``."""

    def __init__(self, directory: Path, max_events: int) -> None:
        self.directory = Path(directory)
        self.max_events = max_events
        self.path: Path = self.directory / _db_name(0)
        self._lock = threading.Lock()  # guards the connection and the depth counter
        self._changed = threading.Condition(self._lock)
        self._conn: sqlite3.Connection | None = None  # writes, under self._lock
        self._reader: sqlite3.Connection | None = None  # the drain thread's reads and checkpoints
        self._lockfile: IO[bytes] | None = None
        self._depth = 0

    @property
    def depth(self) -> int:
        return self._depth

    def open(self) -> None:
        """Take a free slot, adopt the rows of unheld slots, and count what is waiting."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for slot in range(_MAX_SLOTS):
            lockfile = _try_lock(self.directory / (_db_name(slot) + ".lock"))
            if lockfile is not None:
                break
        else:
            raise RuntimeError(
                f"all {_MAX_SLOTS} feedback spool slots in {self.directory} are held by running processes; "
                f"give some of them another THUMBTUNE_SPOOL_DIR"
            )
        self.path = self.directory / _db_name(slot)
        self._lockfile = lockfile
        try:
            conn = self._conn = self._connect()
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.executescript(_SCHEMA)
            self._reader = self._connect()
            for other in range(_MAX_SLOTS):
                if other != slot and (self.directory / _db_name(other)).exists():
                    self._adopt(other)
            self._depth = conn.execute("SELECT COUNT(*) FROM spool").fetchone()[0]
        except BaseException:
            self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)

    def _adopt(self, slot: int) -> None:
        """Move the rows of a slot that no process holds into ours.

        Two transactions, copy then delete: a crash in between duplicates rows (consumers
        dedupe on event_id) but cannot lose them, which one cross-file WAL transaction could.
        """
        lockfile = _try_lock(self.directory / (_db_name(slot) + ".lock"))
        if lockfile is None:
            return  # a live process owns it
        assert self._conn is not None
        try:
            self._conn.execute("ATTACH DATABASE ? AS orphan", (str(self.directory / _db_name(slot)),))
            try:
                tables = {r[0] for r in self._conn.execute("SELECT name FROM orphan.sqlite_master")}
                if not {"spool", "dead_letter"} <= tables:
                    return
                self._conn.execute("BEGIN")
                moved = self._conn.execute(
                    "INSERT INTO main.spool (topic, key, value, created_at) "
                    "SELECT topic, key, value, created_at FROM orphan.spool ORDER BY seq"
                ).rowcount
                self._conn.execute(
                    "INSERT INTO main.dead_letter (topic, key, value, created_at, error) "
                    "SELECT topic, key, value, created_at, error FROM orphan.dead_letter ORDER BY seq"
                )
                self._conn.execute("COMMIT")
                self._conn.execute("BEGIN")
                self._conn.execute("DELETE FROM orphan.spool")
                self._conn.execute("DELETE FROM orphan.dead_letter")
                self._conn.execute("COMMIT")
                if moved:
                    log.info("adopted %d spooled feedback events from %s", moved, _db_name(slot))
            finally:
                self._conn.execute("DETACH DATABASE orphan")
        finally:
            lockfile.close()

    def close(self) -> None:
        with self._lock:
            for conn in (self._reader, self._conn):
                if conn is not None:
                    conn.close()
            self._reader = None
            if self._lockfile is not None:
                self._lockfile.close()  # releases the slot
            self._conn = self._lockfile = None

    def append(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Commit one row; SpoolFull at the cap or when the disk refuses the write."""
        with self._lock:
            if self._conn is None:
                raise RuntimeError("the feedback spool is not open (publisher not started, or closed)")
            if self._depth >= self.max_events:
                raise SpoolFull(
                    f"feedback spool {self.path} is full ({self._depth} events waiting for Kafka)"
                )
            try:
                self._conn.execute(
                    "INSERT INTO spool (topic, key, value, created_at) VALUES (?, ?, ?, ?)",
                    (topic, key, value, time.time()),
                )
            except sqlite3.Error as exc:
                raise SpoolFull(f"feedback spool {self.path} cannot be written: {exc}") from exc
            self._depth += 1

    def head(self, limit: int) -> list[Row]:
        """The oldest ``limit`` committed rows, oldest first. For the one drain thread."""
        if self._reader is None:
            return []
        return self._reader.execute(
            "SELECT seq, topic, key, value, created_at FROM spool ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()

    def checkpoint(self) -> None:
        """Copy the WAL into the database without blocking appends (PASSIVE). For the drain thread."""
        if self._reader is not None:
            self._reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def retire(self, delivered: list[int], poison: list[tuple[Row, str]]) -> None:
        """Delete delivered rows; move poison rows (that Kafka will never take) to dead_letter."""
        if not delivered and not poison:
            return
        with self._changed:
            assert self._conn is not None
            self._conn.execute("BEGIN")
            self._conn.executemany("DELETE FROM spool WHERE seq = ?", [(seq,) for seq in delivered])
            for (seq, topic, key, value, created_at), error in poison:
                log.error(
                    "feedback event %d cannot be delivered, kept in %s dead_letter: %s", seq, self.path, error
                )
                self._conn.execute(
                    "INSERT OR REPLACE INTO dead_letter VALUES (?, ?, ?, ?, ?, ?)",
                    (seq, topic, key, value, created_at, error),
                )
                self._conn.execute("DELETE FROM spool WHERE seq = ?", (seq,))
            self._conn.execute("COMMIT")
            self._depth -= len(delivered) + len(poison)
            self._changed.notify_all()

    def wait_empty(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._depth == 0, timeout)
