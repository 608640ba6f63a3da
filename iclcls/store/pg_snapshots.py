"""Snapshots inside the PostgreSQL store (table ``iclcls_snapshots``: seq, a tar of the saved state).

In the database rather than a folder, so a replica on another machine starts from a recent
snapshot with nothing shared but the URL. A snapshot is written by one replica at a time
(:data:`SNAPSHOT_KEY`, a session advisory lock that a crash releases) on
its own connection, so a large transfer never holds the log. Each process unpacks the
snapshots it loads into a private temporary folder (removed by ``close``). A bytea holds up
to 1 GB: states larger than that need a shared folder instead (not built).
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from iclcls.io import atomic_write_json
from iclcls.store.snapshots import SEQ_FILE

SNAPSHOT_KEY = 0x69636C0002  # pg_try_advisory_lock: one replica writes a snapshot at a time
_PREFIX = "iclcls-pg-snapshots-"


def _remove_orphans() -> None:
    """Unpacked snapshots left by processes that died without ``close`` (kill -9)."""
    for d in Path(tempfile.gettempdir()).glob(_PREFIX + "*-*"):
        pid = d.name[len(_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


class DbSnapshots:
    """``Snapshots`` with the same calls (latest, latest_seq, turn, write, seal), kept in the database."""

    def __init__(self, store: Any, *, keep: int = 2) -> None:
        self.store, self.keep = store, max(1, keep)
        _remove_orphans()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = self.store.connect()
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def latest_seq(self) -> int:
        return int(self._query("SELECT COALESCE(MAX(seq), 0) FROM iclcls_snapshots")[0][0])

    def latest(self, *, at_most: int | None = None) -> tuple[Path, int] | None:
        """The newest snapshot (no newer than ``at_most``), unpacked locally."""
        where, params = ("WHERE seq <= %s", (at_most,)) if at_most is not None else ("", ())
        rows = self._query(f"SELECT seq FROM iclcls_snapshots {where} ORDER BY seq DESC LIMIT 1", params)
        if not rows:
            return None
        seq = int(rows[0][0])
        target = self.dir / f"{seq:012d}"
        if (target / SEQ_FILE).is_file():
            return target, seq
        data = self._query("SELECT data FROM iclcls_snapshots WHERE seq = %s", (seq,))
        if not data:  # dropped by a newer snapshot meanwhile: take that one
            return self.latest(at_most=at_most)
        tmp = self.dir / f".{seq:012d}.unpack"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(fileobj=io.BytesIO(bytes(data[0][0])), mode="r:") as tar:
            tar.extractall(tmp, filter="data")  # no links out, no absolute paths, no devices
        atomic_write_json(tmp / SEQ_FILE, {"seq": seq})
        tmp.rename(target)
        return target, seq

    @contextmanager
    def turn(self) -> Iterator[bool]:
        """True when no other replica is writing a snapshot (held until exit)."""
        conn = self.store.connect()
        try:
            got = bool(conn.execute("SELECT pg_try_advisory_lock(%s)", (SNAPSHOT_KEY,)).fetchone()[0])
            yield got
        finally:
            conn.close()  # releases the session lock

    def write(self, clf: Any, seq: int) -> Path:
        """Save ``clf`` locally (the caller keeps the state from changing meanwhile)."""
        target = self.dir / f".{seq:012d}.new"
        shutil.rmtree(target, ignore_errors=True)
        clf.save(target)
        return target

    def seal(self, target: Path, seq: int) -> None:
        """Upload the saved folder as snapshot ``seq`` and drop the oldest beyond ``keep``."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:") as tar:
            for p in sorted(target.rglob("*")):
                tar.add(p, arcname=p.relative_to(target).as_posix(), recursive=False)
        conn = self.store.connect()
        try:
            with conn.transaction():
                conn.execute("INSERT INTO iclcls_snapshots VALUES (%s, %s, %s) ON CONFLICT (seq) DO NOTHING",
                             (seq, buf.getvalue(), time.time()))
                conn.execute("DELETE FROM iclcls_snapshots WHERE seq NOT IN (SELECT seq FROM iclcls_snapshots "
                             "ORDER BY seq DESC LIMIT %s)", (self.keep,))
        finally:
            conn.close()
        atomic_write_json(target / SEQ_FILE, {"seq": seq})
        final = self.dir / f"{seq:012d}"
        if final.exists():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.rename(final)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
