"""The embedded store: one SQLite file (WAL journal, ``synchronous=FULL``), stdlib only.

Beside ``PATH`` live ``PATH.lock`` (the writer lock, naming its holder) and ``PATH.snapshots/``
(snapshots of the applied state). SQLite makes each append atomic and durable: a crash or a
failed write (disk full, I/O error) leaves the file as it was before the transaction, and the
next open recovers from the WAL journal by itself. Sequence numbers are assigned inside the
write transaction, so they never repeat and never skip.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from iclcls.store.base import Appended, KeyConflict, Record, StoreError, StoreWriteFailed, record_from_row
from iclcls.store.lock import WriterLock
from iclcls.store.snapshots import Snapshots

FORMAT = "iclcls-additions"
VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS additions (
    seq INTEGER PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    digest TEXT NOT NULL,
    body TEXT NOT NULL,
    response TEXT NOT NULL,
    created REAL NOT NULL
);
"""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class SQLiteStore:
    """``AdditionStore`` on one SQLite file; ``writer`` takes the store's lock (one writer per store)."""

    multi_writer = False

    def __init__(self, path: str | Path, *, writer: Mapping[str, Any] | None = None, read_only: bool = False) -> None:
        self.path = Path(path).absolute()
        self.location = str(self.path)
        self.snapshot_dir = self.path.with_name(self.path.name + ".snapshots")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._mutex = threading.Lock()
        self.read_only = read_only
        self._lock = None if read_only else WriterLock(self.lock_path, holder=writer)
        try:
            self._conn = self._connect(read_only=read_only)
        except BaseException:
            self.close()
            raise

    # -- connection ----------------------------------------------------------------------------
    def _connect(self, *, read_only: bool = False) -> sqlite3.Connection:
        if read_only and not self.path.is_file():
            raise StoreError(f"{self.path}: no such store")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"file:{self.path}?mode={'ro' if read_only else 'rwc'}"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30)
            if not read_only:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise StoreError(f"{self.path}: SQLite refused WAL journal mode (got {mode!r})")
            conn.execute("PRAGMA synchronous=FULL")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StoreError(f"{self.path}: the SQLite file is damaged ({check})")
            if not read_only:
                conn.executescript(_SCHEMA)
            self._check_format(conn)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a usable iclcls store ({e})") from None
        return conn

    def _check_format(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM meta WHERE name='format'").fetchone()
        if row is None:
            if conn.execute("SELECT COUNT(*) FROM additions").fetchone()[0]:
                raise StoreError(f"{self.path}: has additions but no format mark")
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [("format", FORMAT), ("version", VERSION)])
            conn.execute("COMMIT")
            return
        version = conn.execute("SELECT value FROM meta WHERE name='version'").fetchone()
        if row[0] != FORMAT or version is None or version[0] != VERSION:
            raise StoreError(f"{self.path}: format {row[0]!r} version {version and version[0]!r}, "
                             f"this iclcls reads {FORMAT!r} version {VERSION!r}")

    def _reopen(self) -> None:
        """After a failed write: a fresh connection, so nothing of the failed transaction lingers."""
        try:
            self._conn.close()
        except sqlite3.Error:
            pass
        self._conn = self._connect()

    # -- order, waiting, snapshots -----------------------------------------------------------
    def ordered(self) -> AbstractContextManager[None]:
        """Nothing to hold: the writer lock makes this process the store's only writer."""
        return nullcontext()

    def wait(self, seq: int, timeout: float) -> None:
        """Only this process writes, so nothing new ever comes from elsewhere: just wait."""
        time.sleep(max(0.0, timeout))

    def snapshots(self, *, keep: int = 2) -> Snapshots:
        return Snapshots(self.snapshot_dir, keep=keep, read_only=self.read_only)

    # -- reading ---------------------------------------------------------------------------
    def seq(self) -> int:
        with self._mutex:
            top = self._conn.execute("SELECT MAX(seq) FROM additions").fetchone()[0] or 0
            base = self._conn.execute("SELECT value FROM meta WHERE name='base_seq'").fetchone()
            return max(int(top), int(base[0]) if base else 0)

    def _record(self, row: tuple) -> Record:
        return record_from_row(row, self.location)

    _COLUMNS = "seq, idempotency_key, digest, body, response, created"

    def records_after(self, seq: int) -> Iterator[Record]:
        with self._mutex:
            rows = self._conn.execute(f"SELECT {self._COLUMNS} FROM additions WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
        return (self._record(r) for r in rows)

    def lookup(self, key: str) -> Record | None:
        with self._mutex:
            row = self._conn.execute(f"SELECT {self._COLUMNS} FROM additions WHERE idempotency_key = ?", (key,)).fetchone()
        return self._record(row) if row else None

    def get_meta(self, name: str) -> str | None:
        with self._mutex:
            row = self._conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    # -- writing ---------------------------------------------------------------------------
    def set_meta(self, name: str, value: str) -> None:
        self._write(lambda c: c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value)), "set " + name)

    def append(
        self, body: Mapping[str, Any], *, key: str | None, digest: str, response: Mapping[str, Any]
    ) -> Appended:
        body_json, response_json = _dumps(body), _dumps(response)  # fail before the transaction

        def txn(c: sqlite3.Connection) -> Appended:
            if key is not None:
                row = c.execute("SELECT seq, digest, response FROM additions WHERE idempotency_key = ?", (key,)).fetchone()
                if row is not None:
                    if row[1] != digest:
                        raise KeyConflict(f"Idempotency-Key {key!r} was used for another request (seq {row[0]})")
                    return Appended(int(row[0]), json.loads(row[2]), True)
            top = c.execute("SELECT MAX(seq) FROM additions").fetchone()[0] or 0
            base = c.execute("SELECT value FROM meta WHERE name='base_seq'").fetchone()
            seq = max(int(top), int(base[0]) if base else 0) + 1
            c.execute("INSERT INTO additions VALUES (?, ?, ?, ?, ?, ?)",
                      (seq, key, digest, body_json, response_json, time.time()))
            return Appended(seq, dict(response), False)

        return self._write(txn, "commit the addition")

    def _write(self, txn: Any, what: str) -> Any:
        """Run ``txn`` in one IMMEDIATE transaction; on a failed commit roll back and reconnect."""
        with self._mutex:
            c = self._conn
            try:
                c.execute("BEGIN IMMEDIATE")
                try:
                    out = txn(c)
                except KeyConflict:
                    c.execute("ROLLBACK")
                    raise
                c.execute("COMMIT")
                return out
            except sqlite3.Error as e:
                try:
                    if c.in_transaction:
                        c.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                try:
                    self._reopen()
                except (StoreError, sqlite3.Error):
                    pass  # the next write tries again
                full = getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(e).lower()
                raise StoreWriteFailed(f"{self.path}: could not {what}: {e}; nothing of it was stored", full=full) from None

    def close(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass
            self._conn = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
