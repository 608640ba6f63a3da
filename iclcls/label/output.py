"""The output of `iclcls label`: an append-only JSONL file plus a sidecar that makes resuming safe.

Rows are appended a chunk at a time and each chunk is flushed and fsynced, so a kill leaves
every finished chunk on disk (a torn last line is cut off on resume). ``OUT.meta.json``
records the state's fingerprint and the options that shape the rows; resuming with a
different state or options is refused, because the file would mix two labellings.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from iclcls.io import atomic_path, atomic_write_json, fsync_dir, fsync_file, read_json, strict_json
from iclcls.label.readers import LabelInputError

META_FORMAT = "iclcls-label"
META_VERSION = 1


class ResumeRefused(LabelInputError):
    """OUT holds rows written by another state or other options."""


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def state_fingerprint(state: Path) -> str:
    """sha256 over every file of a saved state (relative path + bytes): any change shows."""
    state = Path(state)
    if not (state / "config.json").is_file():
        raise FileNotFoundError(f"{state}: not a saved ICLClassifier (no config.json)")
    h = hashlib.sha256()
    for f in sorted(p for p in state.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(state)).encode("utf-8") + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def check_writable(out: Path) -> None:
    """Fail now, before loading anything, if OUT or its sidecar cannot be written."""
    if out.is_dir():
        raise LabelInputError(f"{out}: is a folder; --out must be a file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LabelInputError(f"{out.parent}: cannot create the output folder: {e.strerror or e}") from None
    for p in (out, meta_path(out)):
        existed = p.exists()
        try:
            with open(p, "ab"):
                pass
        except OSError as e:
            raise LabelInputError(f"{p}: cannot write the output here: {e.strerror or e}") from None
        if not existed:
            p.unlink()


class JsonlSink:
    """Rows to OUT: resume bookkeeping, then append + flush + fsync per chunk.

    On resume only successful rows count as done: error rows are dropped from OUT (rewritten
    atomically, so an id appears once) and labelled again, unless ``skip_errors`` keeps them.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.done: set[Any] = set()
        self.failed_before = 0  # error rows found in OUT (kept with skip_errors, else retried)
        self.rows_written = 0  # rows appended by this run
        self._created: list[Path] = []  # files this run created (removed if it writes no row)
        self._f: IO[bytes] | None = None

    def open(
        self, *, fingerprint: str, options: Mapping[str, Any], overwrite: bool, skip_errors: bool = False
    ) -> None:
        """Start fresh or resume: check the sidecar, cut a torn last line, collect done ids."""
        meta = {"format": META_FORMAT, "version": META_VERSION, "state": fingerprint, "options": dict(options)}
        mp = meta_path(self.out)
        self._created = [p for p in (self.out, mp) if not p.exists()]
        has_rows = self.out.is_file() and self.out.stat().st_size > 0
        if overwrite or not has_rows:
            # The old rows go first (truncated and fsynced), then the new sidecar: a crash between
            # leaves an empty OUT under the old sidecar, never old rows under the new fingerprint.
            self._f = open(self.out, "wb")
            fsync_file(self._f)
            fsync_dir(self.out.parent)
            atomic_write_json(mp, meta)
            return
        if not mp.is_file():
            raise ResumeRefused(
                f"{self.out} already holds rows but has no {mp.name}, so it cannot be resumed safely; "
                "pass --overwrite to start over, or choose another --out"
            )
        old = read_json(mp)
        diffs = _differences(old, meta)
        if diffs:
            raise ResumeRefused(
                f"{self.out} was written with a different {'; '.join(diffs)}; resuming would mix two "
                "labellings. Pass --overwrite to start over, or choose another --out"
            )
        errors = self._load_done(keep_errors=skip_errors)
        if errors and not skip_errors:
            self._drop_error_rows()
        self._f = open(self.out, "ab")

    def _load_done(self, *, keep_errors: bool) -> int:
        """Read OUT line by line (never whole): collect done ids, cut a torn last line; return
        how many error rows it holds."""
        good_end, errors = 0, 0
        with open(self.out, "rb+") as f:
            for lineno, line in enumerate(f, 1):
                if not line.endswith(b"\n"):  # a kill mid-write: drop the torn line
                    f.truncate(good_end)
                    fsync_file(f)
                    break
                good_end += len(line)
                if not line.strip():
                    continue
                row = _parse_row(line, self.out, lineno)
                failed = "error" in row
                errors += failed
                if keep_errors or not failed:
                    self.done.add(row.get("id"))
        self.failed_before = errors
        return errors

    def _drop_error_rows(self) -> None:
        """Rewrite OUT without its error rows (atomically: the old file or the new one, never half),
        so that the rows labelled again now are the only rows for their ids."""
        with atomic_path(self.out) as tmp, open(self.out, "rb") as src, open(tmp, "wb") as dst:
            for lineno, line in enumerate(src, 1):
                if line.strip() and "error" not in _parse_row(line, self.out, lineno):
                    dst.write(line)

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        assert self._f is not None, "open() first"
        self._f.write("".join(row_json(r) + "\n" for r in rows).encode("utf-8"))
        fsync_file(self._f)
        self.rows_written += len(rows)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def discard(self) -> None:
        """After a refused or failed run that wrote no row: remove the (empty) OUT and sidecar
        that this run created, so a mistake leaves nothing behind."""
        self.close()
        if self.rows_written:
            return
        for p in self._created:
            p.unlink(missing_ok=True)
        if self._created:
            fsync_dir(self.out.parent)


def _parse_row(line: bytes, out: Path, lineno: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise LabelInputError(f"{out}, line {lineno}: not a JSON row ({e.msg}); cannot resume") from None
    return row if isinstance(row, dict) else {"id": None, "error": "not a row"}


class StdoutSink:
    """Rows to standard output (``iclcls predict`` without --out): nothing to resume."""

    done: set[Any] = frozenset()  # type: ignore[assignment]
    failed_before = 0

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.stream.write("".join(row_json(r) + "\n" for r in rows))
        self.stream.flush()

    def close(self) -> None:
        pass


def row_json(row: Mapping[str, Any]) -> str:
    """One output row as strict JSON: a non-finite score (a shortlist shorter than k) is null,
    never a bare ``-Infinity`` that strict JSON readers refuse."""
    return strict_json(row, nonfinite="null", ensure_ascii=False)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    if old.get("format") != META_FORMAT:
        return [f"sidecar format ({old.get('format')!r})"]
    out = []
    if old.get("state") != new["state"]:
        out.append("state (its files changed or it is another state)")
    o, n = old.get("options", {}), new["options"]
    for key in sorted(set(o) | set(n)):
        if o.get(key) != n.get(key):
            out.append(f"{key} ({o.get(key)!r} then, {n.get(key)!r} now)")
    return out
