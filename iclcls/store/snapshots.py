"""Snapshots of the live state in the store's own folder, and the base state's fingerprint.

A snapshot is ``ICLClassifier.save`` of the state after addition NNNN, in ``<dir>/NNNN/``, with
``serve_seq.json`` written last: a folder without it is incomplete and ignored (and removed).
Snapshots only shorten replay; the store holds every addition, so losing one loses nothing.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from iclcls.io import atomic_write_json, fsync_dir, fsync_tree, read_json, replace_dir

SEQ_FILE = "serve_seq.json"


def state_fingerprint(state_dir: str | Path) -> str:
    """SHA-256 over the state's JSON files (config, pool manifest with its arrays' checksums): the
    same fitted state gives the same value, so a store is never replayed onto another state."""
    root = Path(state_dir)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.json")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith("serve/"):  # the old in-folder log of an earlier iclcls
            continue
        h.update(rel.encode("utf-8") + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


class Snapshots:
    """The complete snapshots in one folder: find the newest, write one, keep the last few.

    ``read_only`` (``iclcls label``) never creates or cleans the folder: a server may be writing it."""

    def __init__(self, directory: str | Path, *, keep: int = 2, read_only: bool = False) -> None:
        self.dir = Path(directory)
        self.keep = max(1, keep)
        if read_only:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for d in self.dir.iterdir():  # left by a crash while writing one
            if d.name.startswith(".") or (d.is_dir() and not (d / SEQ_FILE).is_file()):
                shutil.rmtree(d, ignore_errors=True)

    def latest(self, *, at_most: int | None = None) -> tuple[Path, int] | None:
        """The newest complete snapshot (with a seq no greater than ``at_most``)."""
        best: tuple[Path, int] | None = None
        if not self.dir.is_dir():
            return None
        for d in self.dir.iterdir():
            if d.is_dir() and d.name.isdigit() and (d / SEQ_FILE).is_file() and (d / "config.json").is_file():
                seq = int(read_json(d / SEQ_FILE)["seq"])
                if (at_most is None or seq <= at_most) and (best is None or seq > best[1]):
                    best = (d, seq)
        return best

    def latest_seq(self) -> int:
        got = self.latest()
        return got[1] if got else 0

    @contextmanager
    def turn(self) -> Iterator[bool]:
        """Whether this process may write a snapshot now: always (the store's writer lock already
        makes it the only writer of this folder)."""
        yield True

    def close(self) -> None:
        """Nothing to release (the folder stays: it is the store's)."""

    def write(self, clf: Any, seq: int) -> Path:
        """Save ``clf`` as the snapshot of ``seq`` (the caller keeps the state from changing meanwhile)."""
        target = self.dir / f"{seq:012d}"
        clf.save(target)
        return target

    def seal(self, target: Path, seq: int) -> None:
        """Make a written snapshot durable and complete, then drop the oldest beyond ``keep``."""
        fsync_tree(target)
        atomic_write_json(target / SEQ_FILE, {"seq": seq})
        fsync_dir(target)
        done = sorted(d for d in self.dir.iterdir() if d.name.isdigit() and (d / SEQ_FILE).is_file())
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def adopt(self, source: Path, seq: int) -> None:
        """Copy a complete snapshot from elsewhere (the old in-folder layout) into this folder."""
        target = self.dir / f"{seq:012d}"
        if not target.exists():
            tmp = self.dir / f".{target.name}.import"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
            replace_dir(tmp, target)  # fsynced, then renamed into place
