"""The store for replicas: PostgreSQL (psycopg 3), any number of writers and followers.

Every ``iclcls serve`` on the same ``postgresql://`` URL shares one log. Order comes from a
transaction-scoped advisory lock (:data:`ORDER_KEY`): a writer takes it, catches up to the
head, applies its addition locally, inserts it as head+1 together with its answer and a
``NOTIFY``, and commits; the lock is released by the commit (or by the server when the
writer's connection dies, ``kill -9`` included: the transaction is then rolled back whole).
Followers ``LISTEN`` for the wake-up and read the records after their seq: the seq in the
table is the truth, so a lost notification only delays until the next poll.

Tables (created on first use, in the URL's database): ``iclcls_meta``, ``iclcls_additions``,
``iclcls_snapshots`` (see :mod:`iclcls.store.pg_snapshots`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from iclcls.store.base import Appended, KeyConflict, Record, StoreError, StoreWriteFailed, record_from_row
from iclcls.store.pg_snapshots import DbSnapshots

FORMAT = "iclcls-additions"
VERSION = "1"
CHANNEL = "iclcls_additions"
ORDER_KEY = 0x69636C0001  # pg_advisory_xact_lock: one addition commits at a time, in seq order
SCHEMA_KEY = 0x69636C0003  # CREATE TABLE IF NOT EXISTS races between replicas starting together

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS iclcls_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS iclcls_additions (
        seq BIGINT PRIMARY KEY, idempotency_key TEXT UNIQUE, digest TEXT NOT NULL,
        body TEXT NOT NULL, response TEXT NOT NULL, created DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS iclcls_snapshots (
        seq BIGINT PRIMARY KEY, data BYTEA NOT NULL, created DOUBLE PRECISION NOT NULL)""",
]
_COLUMNS = "seq, idempotency_key, digest, body, response, created"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def redact(url: str) -> str:
    """``postgresql://user@host:port/db`` without a password or options, for messages and sidecars."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        d = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - psycopg raises ProgrammingError for a bad URL
        raise StoreError(f"--store: not a valid PostgreSQL URL: {url.split('@')[-1]!r}") from None
    user = f"{d['user']}@" if d.get("user") else ""
    port = f":{d['port']}" if d.get("port") else ""
    return f"postgresql://{user}{d.get('host', '')}{port}/{d.get('dbname', '')}"


class PostgresStore:
    """``AdditionStore`` on a PostgreSQL database; many processes may write (``multi_writer``)."""

    multi_writer = True

    def __init__(self, url: str, *, writer: Mapping[str, Any] | None = None, read_only: bool = False,
                 connect_timeout: int = 10) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise StoreError("--store postgresql://...: needs psycopg 3 (pip install 'iclcls[serve]')") from None
        self.url, self.location, self.read_only = url, redact(url), read_only
        self.holder = dict(writer or {})
        self._timeout = connect_timeout
        self._mutex = threading.RLock()  # the main connection: one statement or transaction at a time
        self._in_order = False
        self._listener: Any = None
        self._conn: Any = self.connect()
        if not read_only:
            self._create_schema()
        self._check_format()

    # -- connections ---------------------------------------------------------------------------
    def connect(self) -> Any:
        """A new autocommit connection (snapshots use their own, so a large one never holds the log)."""
        import psycopg

        try:
            # keepalives and an idle-in-transaction limit: a replica cut off by the network while it
            # holds the store's order loses it within a minute instead of stalling every other writer
            return psycopg.connect(self.url, autocommit=True, connect_timeout=self._timeout, application_name="iclcls",
                                   keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
                                   options="-c idle_in_transaction_session_timeout=60000")
        except psycopg.Error as e:
            raise StoreError(f"{self.location}: cannot connect: {str(e).strip()}") from None

    def _reconnect(self) -> None:
        try:
            self._conn.close()
        except Exception:  # noqa: BLE001
            pass
        self._conn = self.connect()

    def _create_schema(self) -> None:
        with self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_KEY,))
            for stmt in _SCHEMA:
                self._conn.execute(stmt)
            have = self._conn.execute("SELECT value FROM iclcls_meta WHERE name='format'").fetchone()
            if have is None:
                if self._conn.execute("SELECT COUNT(*) FROM iclcls_additions").fetchone()[0]:
                    raise StoreError(f"{self.location}: has additions but no format mark")
                self._conn.execute("INSERT INTO iclcls_meta VALUES ('format', %s), ('version', %s)", (FORMAT, VERSION))

    def _check_format(self) -> None:
        fmt, version = self.get_meta("format"), self.get_meta("version")
        if (fmt, version) != (FORMAT, VERSION):
            raise StoreError(f"{self.location}: format {fmt!r} version {version!r}, this iclcls reads "
                             f"{FORMAT!r} version {VERSION!r}")

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Run a query; outside a transaction a dropped connection is reopened and tried once more."""
        import psycopg

        with self._mutex:
            for attempt in (0, 1):
                try:
                    return self._conn.execute(sql, params).fetchall()
                except psycopg.OperationalError as e:
                    if self._in_order or attempt:
                        raise StoreError(f"{self.location}: {str(e).strip()}") from None
                    self._reconnect()
                except psycopg.errors.UndefinedTable:
                    raise StoreError(f"{self.location}: not an iclcls store (no iclcls tables)") from None
        raise AssertionError("unreachable")

    # -- reading ---------------------------------------------------------------------------
    def seq(self) -> int:
        top = self._read("SELECT COALESCE(MAX(seq), 0) FROM iclcls_additions")[0][0]
        base = self.get_meta("base_seq")
        return max(int(top), int(base) if base else 0)

    def _record(self, row: tuple) -> Record:
        return record_from_row(row, self.location)

    def records_after(self, seq: int) -> Iterator[Record]:
        rows = self._read(f"SELECT {_COLUMNS} FROM iclcls_additions WHERE seq > %s ORDER BY seq", (seq,))
        return (self._record(r) for r in rows)

    def lookup(self, key: str) -> Record | None:
        rows = self._read(f"SELECT {_COLUMNS} FROM iclcls_additions WHERE idempotency_key = %s", (key,))
        return self._record(rows[0]) if rows else None

    def get_meta(self, name: str) -> str | None:
        rows = self._read("SELECT value FROM iclcls_meta WHERE name = %s", (name,))
        return rows[0][0] if rows else None

    # -- writing ---------------------------------------------------------------------------
    def _refuse_read_only(self) -> None:
        if self.read_only:
            raise StoreError(f"{self.location}: opened read-only")

    def set_meta(self, name: str, value: str) -> None:
        self._refuse_read_only()
        with self._mutex:
            self._conn.execute("INSERT INTO iclcls_meta VALUES (%s, %s) ON CONFLICT (name) DO UPDATE SET value = "
                               "EXCLUDED.value", (name, value))

    def set_meta_if_absent(self, name: str, value: str) -> str:
        """Set ``name`` unless a replica set it first; the value that holds."""
        self._refuse_read_only()
        with self._mutex:
            self._conn.execute("INSERT INTO iclcls_meta VALUES (%s, %s) ON CONFLICT (name) DO NOTHING", (name, value))
        return self.get_meta(name) or value

    @contextmanager
    def ordered(self) -> Iterator[None]:
        """A transaction holding :data:`ORDER_KEY`: an ``append`` inside commits it; leaving without
        one rolls it back. Reads inside see every commit made before the lock was granted."""
        import psycopg

        self._refuse_read_only()
        with self._mutex:
            if self._in_order:
                yield
                return
            try:
                if self._conn.closed:
                    self._reconnect()
                self._conn.execute("BEGIN")
                self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (ORDER_KEY,))
            except psycopg.Error as e:
                self._abandon()
                raise StoreWriteFailed(f"{self.location}: could not take the store's order: {str(e).strip()}",
                                       full=False) from None
            self._in_order = True
            try:
                yield
            finally:
                self._in_order = False
                self._abandon()

    def _abandon(self) -> None:
        """Roll back whatever transaction is open (nothing after a commit); reconnect if that fails."""
        import psycopg

        try:
            if self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self._conn.execute("ROLLBACK")
        except psycopg.Error:
            try:
                self._reconnect()
            except StoreError:
                pass  # the next call tries again

    def append(
        self, body: Mapping[str, Any], *, key: str | None, digest: str, response: Mapping[str, Any]
    ) -> Appended:
        import psycopg

        body_json, response_json = _dumps(body), _dumps(response)
        with self.ordered():
            c = self._conn
            try:
                if key is not None:
                    row = c.execute("SELECT seq, digest, response FROM iclcls_additions WHERE idempotency_key = %s",
                                    (key,)).fetchone()
                    if row is not None:
                        if row[1] != digest:
                            raise KeyConflict(f"Idempotency-Key {key!r} was used for another request (seq {row[0]})")
                        return Appended(int(row[0]), json.loads(row[2]), True)
                top = c.execute("SELECT COALESCE(MAX(seq), 0) FROM iclcls_additions").fetchone()[0]
                base = c.execute("SELECT value FROM iclcls_meta WHERE name='base_seq'").fetchone()
                seq = max(int(top), int(base[0]) if base else 0) + 1
                c.execute("INSERT INTO iclcls_additions VALUES (%s, %s, %s, %s, %s, %s)",
                          (seq, key, digest, body_json, response_json, time.time()))
                c.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(seq)))
                c.execute("COMMIT")
            except psycopg.Error as e:
                full = isinstance(e, psycopg.errors.DiskFull)
                self._abandon()  # an aborted transaction would refuse the rebuild's reads
                raise StoreWriteFailed(f"{self.location}: could not commit the addition: {str(e).strip()}; "
                                       "nothing of it was stored unless the connection broke during the commit "
                                       "(the seq in the store tells)", full=full) from None
            return Appended(seq, dict(response), False)

    # -- following ---------------------------------------------------------------------------
    def wait(self, seq: int, timeout: float) -> None:
        """Block on ``LISTEN`` until a notification or ``timeout``; a broken listener is reopened."""
        import psycopg

        try:
            if self._listener is None or self._listener.closed:
                self._listener = self.connect()
                self._listener.execute(f"LISTEN {CHANNEL}")
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                break
        except (psycopg.Error, StoreError):
            self._listener = None
            time.sleep(min(timeout, 1.0))

    def snapshots(self, *, keep: int = 2) -> DbSnapshots:
        return DbSnapshots(self, keep=keep)

    def close(self) -> None:
        for conn in (self._listener, getattr(self, "_conn", None)):
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001
                    pass
        self._listener = None
