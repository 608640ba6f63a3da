"""The live classifier behind the service: load, replay, add (durably), predict, snapshot.

On disk, next to the fitted state the service was started on (``--state DIR``)::

    DIR/                      the fitted state (never written by the service)
    DIR/serve/wal.jsonl       additions since the last snapshot, one fsync'd line each
    DIR/serve/snapshots/NNNN/ ICLClassifier.save of the state after addition NNNN,
                              with serve_seq.json (written last: a snapshot without it is
                              incomplete and ignored)

Start: the newest complete snapshot (or DIR itself, seq 0), then every logged addition
after its seq, in order. Concurrency: a writer-preferring readers-writer lock; predictions
and snapshots read, additions write, so a prediction sees the state before or after an
addition, never half of one. Additions are appended to the log one at a time and applied in
log order (several at once when they queued behind a long prediction: group commit).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iclcls.io import atomic_write_json, read_json
from iclcls.serve.wal import WALError, WriteAheadLog, fsync_dir
from iclcls.types import Example, Prediction

log = logging.getLogger("iclcls.serve")

SEQ_FILE = "serve_seq.json"


class RWLock:
    """Many readers or one writer; a waiting writer holds back new readers (no starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass(frozen=True)
class ClassView:
    """What the state holds, replaced whole after each addition (read without locks)."""

    counts: Mapping[str, int]
    descriptions: Mapping[str, str]
    pool_size: int
    seq: int


@dataclass
class AddResult:
    seq: int
    added_examples: int
    new_classes: list[str]
    classes: int
    pool_size: int


@dataclass
class Addition:
    """One validated addition: what goes in the log and into ``add_classes``."""

    examples: list[Example]
    descriptions: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {
            "examples": [{"text": ex.text, "label": ex.labels[0]} for ex in self.examples],
            "descriptions": self.descriptions,
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any], where: str) -> Addition:
        try:
            examples = [Example(str(e["text"]), (str(e["label"]),)) for e in rec["examples"]]
            descriptions = {str(k): str(v) for k, v in (rec.get("descriptions") or {}).items()}
        except (KeyError, TypeError, ValueError) as e:
            raise WALError(f"{where}: malformed addition record: {e}") from None
        return cls(examples, descriptions)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _uncached(clf: Any) -> None:
    """Serve without the on-disk embedding cache: request texts are not kept on disk."""
    inner = getattr(clf.embedder_, "embedder", None)
    if inner is not None and hasattr(inner, "encode"):
        clf.embedder_ = inner
        clf.pool_.embedder = inner


class LiveClassifier:
    """A loaded ICLClassifier plus its log and snapshots; safe to use from many threads."""

    def __init__(
        self,
        state_dir: str | Path,
        *,
        lm: Any = None,
        trust_state: bool = False,
        snapshot_every: int = 100,
        keep_snapshots: int = 2,
        embed_cache: bool = False,
    ) -> None:
        from iclcls.classifier import ICLClassifier

        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, got {snapshot_every}")
        self.state_dir = Path(state_dir)
        if not (self.state_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.state_dir}: not a saved ICLClassifier (no config.json)")
        self.home = self.state_dir / "serve"
        self.snap_dir = self.home / "snapshots"
        self.snap_dir.mkdir(parents=True, exist_ok=True)
        self.snapshot_every = snapshot_every
        self.keep_snapshots = keep_snapshots
        self._rw = RWLock()
        self._log_lock = threading.Lock()  # log order == apply order; held only to append
        self._pending: list[tuple[int, Addition]] = []  # logged, not yet applied
        self.failed: str | None = None  # set if applying a logged addition raised
        self._snap_lock = threading.Lock()
        self._clean_partial_snapshots()
        source, self.snapshot_seq = self._latest_snapshot()
        log.info("loading %s (seq %d)", source, self.snapshot_seq)
        self.clf = ICLClassifier.load(source, lm=lm, trust=trust_state)
        if not embed_cache:
            _uncached(self.clf)
        self.wal = WriteAheadLog(self.home / "wal.jsonl")
        if self.wal.dropped_tail:
            log.warning("%s: dropped a torn last record (it was never acknowledged)", self.wal.path)
        self.applied_seq = self.snapshot_seq
        replayed = 0
        for rec in self.wal.after(self.snapshot_seq):
            if rec["seq"] != self.applied_seq + 1:
                raise WALError(
                    f"{self.wal.path}: record seq {rec['seq']} follows state seq {self.applied_seq}: "
                    "records are missing between the snapshot and the log"
                )
            add = Addition.from_record(rec, f"{self.wal.path} seq {rec['seq']}")
            self.clf.add_classes(add.examples, descriptions=add.descriptions)
            self.applied_seq = rec["seq"]
            replayed += 1
        self.wal.last_seq = max(self.wal.last_seq, self.applied_seq)
        self.replayed = replayed
        self.view = self._make_view()
        self.clf.predict(["warm up"], show_progress=False)  # load lazy models now, not on a first request
        log.info("ready: %d classes, %d pool examples, seq %d (%d replayed)", len(self.view.counts),
                 self.view.pool_size, self.applied_seq, replayed)
        self._snap_wanted = threading.Event()
        self._closing = False
        self._snap_thread = threading.Thread(target=self._snapshot_loop, name="iclcls-snapshot", daemon=True)
        self._snap_thread.start()
        if replayed >= snapshot_every:
            self._snap_wanted.set()

    # -- reading ---------------------------------------------------------------------------
    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        with self._rw.read():
            return self.clf.predict(list(texts), show_progress=False)

    def _make_view(self) -> ClassView:
        pool = self.clf.pool_
        counts = {lab: 0 for lab in pool.labels}
        counts.update(pool.label_counts())
        return ClassView(counts, dict(pool.labels.descriptions), len(pool), self.applied_seq)

    # -- adding ----------------------------------------------------------------------------
    def add(self, addition: Addition) -> AddResult:
        """Log (fsync), apply under the write lock, then return: the caller may acknowledge.

        Group commit: the log lock is held only for the append, and whoever next takes the
        write lock applies every logged addition still pending, in log order. So additions
        that arrive while a long prediction holds the read lock wait for that one prediction
        together, instead of one prediction each.
        """
        if self.failed:
            raise RuntimeError(f"additions are stopped: {self.failed}; restart the service (it replays the log)")
        with self._log_lock:
            pending_labels = {ex.labels[0] for _, a in self._pending for ex in a.examples}
            new = sorted({ex.labels[0] for ex in addition.examples} - set(self.view.counts) - pending_labels)
            seq = self.wal.append(addition.record())
            self._pending.append((seq, addition))
        log.info("addition seq=%d logged (%d examples), applying", seq, len(addition.examples))
        with self._rw.write():
            self._apply_pending()
            v = self.view
        if self.applied_seq < seq:
            raise RuntimeError(self.failed or f"addition seq={seq} was not applied")
        if seq - self.snapshot_seq >= self.snapshot_every:
            self._snap_wanted.set()
        return AddResult(seq, len(addition.examples), new, len(v.counts), v.pool_size)

    def _apply_pending(self) -> None:
        """Apply the logged, not yet applied additions in seq order (the write lock is held)."""
        with self._log_lock:
            todo, self._pending = self._pending, []
        for seq, addition in todo:
            if self.failed:
                break
            try:
                self.clf.add_classes(addition.examples, descriptions=addition.descriptions)
            except Exception as e:  # validated input should not fail; if it does, stop adding
                self.failed = f"applying addition seq={seq} failed: {type(e).__name__}: {e}"
                log.exception("applying addition seq=%d failed; additions are stopped", seq)
                break
            self.applied_seq = seq
            log.info("addition seq=%d applied", seq)
        if todo:
            self.view = self._make_view()

    # -- snapshots -------------------------------------------------------------------------
    def _latest_snapshot(self) -> tuple[Path, int]:
        best: tuple[Path, int] = (self.state_dir, 0)
        for d in self.snap_dir.iterdir():
            if d.is_dir() and d.name.isdigit() and (d / SEQ_FILE).is_file() and (d / "config.json").is_file():
                seq = int(read_json(d / SEQ_FILE)["seq"])
                if seq > best[1]:
                    best = (d, seq)
        return best

    def _clean_partial_snapshots(self) -> None:
        for d in self.snap_dir.iterdir():
            if d.name.startswith(".") or (d.is_dir() and not (d / SEQ_FILE).is_file()):
                shutil.rmtree(d, ignore_errors=True)

    def snapshot(self) -> int | None:
        """Save the current state as a snapshot, then drop the log records it holds."""
        with self._snap_lock:
            with self._rw.read():
                seq = self.applied_seq
                if seq <= self.snapshot_seq:
                    return None
                target = self.snap_dir / f"{seq:012d}"
                self.clf.save(target)
            _fsync_tree(target)
            atomic_write_json(target / SEQ_FILE, {"seq": seq})  # the mark of a complete snapshot
            fsync_dir(target)
            self.snapshot_seq = seq
            self.wal.compact(seq)
            for old in sorted(d for d in self.snap_dir.iterdir() if d.name.isdigit())[: -self.keep_snapshots]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("snapshot at seq %d", seq)
            return seq

    def _snapshot_loop(self) -> None:
        while True:
            self._snap_wanted.wait()
            self._snap_wanted.clear()
            if self._closing:
                return
            try:
                self.snapshot()
            except Exception:  # a failed snapshot loses nothing: the log still holds the additions
                log.exception("snapshot failed; the write-ahead log still holds every addition")

    def close(self, *, final_snapshot: bool = True) -> None:
        self._closing = True
        self._snap_wanted.set()
        self._snap_thread.join(timeout=60)
        if final_snapshot:
            try:
                self.snapshot()
            except Exception:
                log.exception("final snapshot failed; the write-ahead log still holds every addition")
        self.wal.close()
