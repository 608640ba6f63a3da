"""The write-ahead log of class additions: JSONL, one record per addition, fsync'd.

A record is ``{"seq": n, "examples": [{"text", "label"}...], "descriptions": {...}}`` and
is on disk before the addition is applied or acknowledged, so an acknowledged addition
survives ``kill -9``. A crash while writing leaves at most one torn last line: it never
parsed, was never applied, never acknowledged, so opening the log drops it. A bad line
anywhere else is damage, and opening says which line.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from iclcls.io import atomic_write_text


class WALError(ValueError):
    """The log is damaged somewhere other than its torn last line."""


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (POSIX needs the folder fsync'd too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse(line: bytes, path: Path, lineno: int) -> dict[str, Any]:
    rec = json.loads(line)
    if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int):
        raise WALError(f"{path}:{lineno}: a log record must be an object with an integer 'seq'")
    return rec


class WriteAheadLog:
    """Append-only JSONL of additions; ``append`` returns once the record is fsync'd."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.records, self.dropped_tail = self._read_and_repair()
        self.last_seq = self.records[-1]["seq"] if self.records else 0
        self._f = open(self.path, "ab")
        fsync_dir(self.path.parent)

    def _read_and_repair(self) -> tuple[list[dict[str, Any]], bool]:
        """All complete records; a torn last line is cut off the file (it was never acknowledged)."""
        if not self.path.exists():
            return [], False
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        records: list[dict[str, Any]] = []
        good_end = 0  # byte offset after the last complete record
        pos = 0
        torn = False
        for i, line in enumerate(lines):
            end = pos + len(line) + 1  # the newline
            last = i == len(lines) - 1
            if line.strip():
                complete = not last  # a record without its newline was being written
                try:
                    rec = _parse(line, self.path, i + 1) if complete else None
                except (json.JSONDecodeError, UnicodeDecodeError):
                    rec = None
                    if not _only_blank(lines[i + 1 :]):
                        raise WALError(f"{self.path}:{i + 1}: not a JSON record, and records follow it") from None
                if rec is None:
                    torn = True
                    break
                if records and rec["seq"] <= records[-1]["seq"]:
                    raise WALError(f"{self.path}:{i + 1}: seq {rec['seq']} after {records[-1]['seq']}: out of order")
                records.append(rec)
                good_end = end
            elif not last:
                good_end = end
            pos = end
        if torn or good_end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        return records, torn

    def append(self, record: dict[str, Any]) -> int:
        """Write ``record`` with the next seq and fsync it; return the seq."""
        with self._lock:
            seq = self.last_seq + 1
            line = json.dumps({"seq": seq, **record}, ensure_ascii=False, separators=(",", ":")) + "\n"
            self._f.write(line.encode("utf-8"))
            self._f.flush()
            os.fsync(self._f.fileno())
            self.last_seq = seq
            return seq

    def after(self, seq: int) -> Iterator[dict[str, Any]]:
        """The records read at open time with a seq greater than ``seq`` (for replay)."""
        return (r for r in self.records if r["seq"] > seq)

    def compact(self, upto: int) -> None:
        """Drop records with seq <= ``upto`` (a snapshot holds them): rewrite atomically, reopen."""
        with self._lock:
            self._f.flush()
            keep: list[bytes] = []
            for line in self.path.read_bytes().split(b"\n"):
                if line.strip() and json.loads(line)["seq"] > upto:
                    keep.append(line + b"\n")
            self._f.close()
            atomic_write_text(self.path, b"".join(keep).decode("utf-8"))
            fsync_dir(self.path.parent)
            self._f = open(self.path, "ab")
            self.records = []

    def close(self) -> None:
        with self._lock:
            self._f.close()


def _only_blank(lines: list[bytes]) -> bool:
    return all(not x.strip() for x in lines)
