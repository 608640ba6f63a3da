"""The live classifier behind the service: load, replay, add (durably, all or nothing), follow, predict.

Where things live::

    DIR/                     the fitted state: only read, never written by the service
    STORE                    the additions (``--store``; default ``DIR.additions.sqlite``; or
                             ``postgresql://...`` shared by replicas, snapshots in the database)
    STORE.snapshots/NNNN/    (SQLite) ICLClassifier.save of the state after addition NNNN
    STORE.lock               (SQLite) the writer lock: one server per SQLite store

Start: the newest snapshot (or DIR, seq 0), then every record after its seq, in order, with
no LM call (records carry the tags and summaries an LM wrote).

An addition: validate (the app) and prepare (embed; tags and summaries by the LM) outside
every lock; then hold the store's order (PostgreSQL: an advisory lock no other replica can
commit past), catch up with the records other replicas committed, apply the addition in
place under the write lock, commit it as the next seq and only then show it and acknowledge.
If applying or committing fails, the state is rebuilt from the store, which never got the
record: a record that cannot be applied is never acknowledged. Why apply before commit rather
than "commit, then everyone applies": a record committed first would be followed by the other
replicas even if it then failed to apply here; applying first under the order lock validates
it on exactly the state it will follow in the log, and costs other replicas' additions only
the wait for one local apply. Followers (PostgreSQL) apply records in seq order as they come.
Predictions take the read lock, so one sees the state before or after an addition, never half.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iclcls.errors import ConfigError, IclclsError
from iclcls.serve.legacy import find_legacy
from iclcls.serve.rwlock import RWLock
from iclcls.serve.workers import Workers
from iclcls.store import AdditionStore, KeyConflict, StoreError, default_store_path, open_store
from iclcls.store.additions import Addition, Prepared
from iclcls.store.replay import apply_prepared, check_pairing, load_at, prepare_record
from iclcls.types import Prediction

log = logging.getLogger("iclcls.serve")


class AdditionRefused(IclclsError, ValueError):
    """An addition the service will not take; ``status`` is the HTTP answer (nothing was stored)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ClassView:
    """What the state holds, replaced whole after each addition (read without locks)."""

    counts: Mapping[str, int]
    descriptions: Mapping[str, str]
    pool_size: int
    seq: int


@dataclass(frozen=True)
class AddResult:
    seq: int
    added_examples: int
    new_classes: list[str]
    classes: int
    pool_size: int
    replayed: bool = False  # the first answer to this idempotency key, given again

    def response(self) -> dict[str, Any]:
        """What the store keeps as the first answer (the seq is the record's own)."""
        return {"added_examples": self.added_examples, "new_classes": self.new_classes, "classes": self.classes,
                "pool_size": self.pool_size}

    @classmethod
    def from_response(cls, seq: int, response: Mapping[str, Any]) -> AddResult:
        return cls(seq, int(response["added_examples"]), list(response["new_classes"]), int(response["classes"]),
                   int(response["pool_size"]), replayed=True)


def _uncached(clf: Any) -> None:
    """Serve without the on-disk embedding cache: request texts are not kept on disk."""
    inner = getattr(clf.embedder_, "embedder", None)
    if inner is not None and hasattr(inner, "encode"):
        clf.embedder_ = inner
        clf.pool_.embedder = inner


class LiveClassifier:
    """A loaded ICLClassifier plus its store and snapshots; safe to use from many threads.

    Locks, always taken in this order: ``_add_lock`` (every change of the state: additions,
    following, the swap of a refreshed stage, and the whole of a snapshot's save, which
    therefore needs no read lock and never makes classification wait), the store's order,
    ``_rw`` (write: the moment a change lands; read: predictions), ``_model_lock``."""

    def __init__(
        self,
        state_dir: str | Path,
        *,
        store: str | Path | AdditionStore | None = None,
        holder: Mapping[str, Any] | None = None,
        lm: Any = None,
        embedder: Any = None,
        trust_state: bool = False,
        snapshot_every: int = 100,
        keep_snapshots: int = 2,
        embed_cache: bool = False,
        max_classes: int | None = None,
        max_pool: int | None = None,
        refresh_every_s: float = 60.0,
        follow_poll_s: float = 1.0,
    ) -> None:
        if snapshot_every < 1:
            raise ConfigError(f"snapshot_every must be >= 1, got {snapshot_every}")
        self.state_dir = Path(state_dir)
        if not (self.state_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.state_dir}: not a saved ICLClassifier (no config.json)")
        self.snapshot_every, self.max_classes, self.max_pool = snapshot_every, max_classes, max_pool
        self._lm, self._embedder, self._trust, self._embed_cache = lm, embedder, trust_state, embed_cache
        if store is None or isinstance(store, (str, Path)):
            spec = store if store is not None else default_store_path(self.state_dir)
            store = open_store(spec, writer={"host": socket.gethostname(), **dict(holder or {})})
        self.store: AdditionStore = store
        self.snapshots: Any = None
        self.workers: Workers | None = None
        try:
            self._start(keep_snapshots, refresh_every_s, follow_poll_s)
        except BaseException:
            if self.workers is not None:
                self.workers.stop()
            if self.snapshots is not None:
                self.snapshots.close()
            self.store.close()
            raise

    def _start(self, keep: int, refresh_every_s: float, follow_poll_s: float) -> None:
        self._rw = RWLock()
        self._add_lock = threading.Lock()  # one change at a time: apply order == seq order
        self._model_lock = threading.Lock()  # embedder/LM calls one at a time (tokenizers are not thread-safe)
        self._seq_cond = threading.Condition()  # min_seq waiters
        self.failed: str | None = None  # set when a failed addition could not be rolled back
        check_pairing(self.store, self.state_dir, claim=True)
        self.snapshots = self.store.snapshots(keep=keep)
        legacy = None
        if not self.store.multi_writer and self.store.seq() == 0 and not self.store.get_meta("legacy"):
            legacy = find_legacy(self.state_dir)
        if legacy is not None and legacy.snapshot is not None:
            self.snapshots.adopt(*legacy.snapshot)
            self.store.set_meta("base_seq", str(legacy.snapshot[1]))
        loaded = load_at(self.state_dir, self.store, self.snapshots, lm=self._lm, embedder=self._embedder,
                         trust=self._trust, adjust=None if self._embed_cache else _uncached)
        self.clf, self.snapshot_seq, self.replayed = loaded.clf, loaded.snapshot_seq, loaded.replayed
        self.applied_seq = loaded.seq
        self.view = self._make_view(self.applied_seq)
        self.workers = Workers(self, follow_poll_s=follow_poll_s if self.store.multi_writer else None,
                               refresh_every_s=refresh_every_s)
        if legacy is not None:
            self._import(legacy)
        self.clf.predict_detailed(["warm up"], show_progress=False)  # load lazy models now, not on a first request
        log.info("ready: %d classes, %d pool examples, seq %d (%d replayed) from store %s", len(self.view.counts),
                 self.view.pool_size, self.applied_seq, self.replayed, self.store.location)
        if self.replayed >= self.snapshot_every:
            self.workers.want_snapshot()

    def _import(self, legacy: Any) -> None:
        """Re-add the old in-folder log's records through the ordinary path (tags, summaries logged)."""
        for rec in legacy.records:
            pairs = [(str(e["text"]), str(e["label"])) for e in rec.get("examples", [])]
            self.add(Addition.build(pairs, rec.get("descriptions") or {}), caps=False)
        self.store.set_meta("legacy", str(legacy.wal))
        log.warning("imported %d additions from %s into %s; the old folder %s is no longer read and may be removed",
                    len(legacy.records), legacy.wal, self.store.location, legacy.wal.parent)

    # -- reading ---------------------------------------------------------------------------
    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        with self._rw.read(), self._model_lock:
            return self.clf.predict_detailed(list(texts), show_progress=False)

    def wait_seq(self, seq: int, timeout: float) -> bool:
        """Whether this replica has applied ``seq`` (waiting up to ``timeout`` seconds for it)."""
        with self._seq_cond:
            return self._seq_cond.wait_for(lambda: self.applied_seq >= seq, timeout=max(0.0, timeout))

    @property
    def shortlist_k(self) -> int:
        return int(self.clf.shortlist_k)

    def _make_view(self, seq: int) -> ClassView:
        pool = self.clf.pool_
        counts = {lab: 0 for lab in pool.labels}
        counts.update(pool.label_counts())
        return ClassView(counts, dict(pool.labels.descriptions), len(pool), seq)

    def _publish(self, seq: int, view: ClassView) -> None:
        with self._seq_cond:
            self.applied_seq, self.view = seq, view
            self._seq_cond.notify_all()
        if seq - self.snapshot_seq >= self.snapshot_every and self.workers is not None:
            self.workers.want_snapshot()

    # -- adding ----------------------------------------------------------------------------
    def add(self, addition: Addition, *, key: str | None = None, caps: bool = True) -> AddResult:
        """Apply and commit ``addition``, or raise with the state and the store unchanged.

        A retry under the same ``key`` (on any replica) gets the first answer and adds nothing;
        the same key with another body raises ``AdditionRefused(422)``. ``StoreWriteFailed``
        means the commit failed (disk full, I/O error, connection lost): the state was rebuilt
        from the store, serving goes on.
        """
        if self.failed:
            raise StoreError(f"additions are stopped: {self.failed}; restart the service")
        digest = addition.digest()
        first = self._first_answer(key, digest)
        if first is not None:
            return first
        if caps:
            self._check_caps(addition, self.view)
        with self._model_lock:  # the LM and embedder run here, outside the write lock
            examples, summaries = self.clf.prepare_additions(list(addition.examples))
            from iclcls.embed.image import encode_examples

            embeddings = encode_examples(self.clf.pool_.embedder, examples)
        prepared = Prepared(addition, tuple(examples), summaries, embeddings)
        with self._add_lock, self.store.ordered():
            self._catch_up_locked()  # what other replicas committed before us comes first
            first = self._first_answer(key, digest)  # a retry on another replica may have committed it
            if first is not None:
                return first
            if caps:
                self._check_caps(addition, self.view)
            if self.failed:
                raise StoreError(f"additions are stopped: {self.failed}; restart the service")
            with self._rw.write(), self._model_lock:  # lock order everywhere: rw, then model
                return self._apply_and_commit(prepared, key=key, digest=digest)

    def _first_answer(self, key: str | None, digest: str) -> AddResult | None:
        if key is None:
            return None
        rec = self.store.lookup(key)
        if rec is None:
            return None
        if rec.digest != digest:
            raise AdditionRefused(422, f"Idempotency-Key {key!r} was already used for a different request (seq "
                                       f"{rec.seq}); use a new key for a new addition")
        log.info("addition under Idempotency-Key %r is seq=%d already: answering as before", key, rec.seq)
        return AddResult.from_response(rec.seq, rec.response)

    def _check_caps(self, addition: Addition, view: ClassView) -> None:
        new = addition.labels - set(view.counts)
        if self.max_classes is not None and new and len(view.counts) + len(new) > self.max_classes:
            raise AdditionRefused(409, f"the addition would make {len(view.counts) + len(new)} classes, over the "
                                       f"limit of {self.max_classes} (--max-classes)")
        n = view.pool_size + len(addition.examples)
        if self.max_pool is not None and n > self.max_pool:
            raise AdditionRefused(409, f"the addition would make {n} pool examples, over the limit of "
                                       f"{self.max_pool} (--max-pool)")

    def _apply_and_commit(self, prepared: Prepared, *, key: str | None, digest: str) -> AddResult:
        """Under the store's order and the write lock: apply in place, commit, publish; on any
        failure rebuild from the store (which then does not hold the record).

        Rollback rebuilds instead of applying to a copy: a copy of the pool, index and stage
        statistics would cost O(state) on EVERY addition, while a failure here is rare (the input
        was validated and prepared) and the rebuild is correct by construction."""
        seq = self.applied_seq + 1
        before = self.view
        try:
            prepared.apply_to(self.clf)
        except Exception as e:
            log.exception("addition (would be seq=%d) failed to apply; rolling back", seq)
            self._roll_back()
            raise AdditionRefused(422, f"the addition could not be applied ({type(e).__name__}: {e}); nothing was "
                                       "stored and the state is unchanged") from e
        view = self._make_view(seq)
        new = sorted(prepared.addition.labels - set(before.counts))
        result = AddResult(seq, len(prepared.examples), new, len(view.counts), view.pool_size)
        try:
            appended = self.store.append(prepared.record(), key=key, digest=digest, response=result.response())
            if appended.duplicate or appended.seq != seq:
                raise StoreError(f"{self.store.location}: the store gave seq {appended.seq} where {seq} was next: "
                                 "is another process writing to it?")
        except KeyConflict as e:
            self._roll_back()
            raise AdditionRefused(422, str(e)) from None
        except BaseException:
            log.exception("addition seq=%d was not committed; rolling back", seq)
            self._roll_back()
            raise
        log.info("addition seq=%d committed (%d examples)", seq, len(prepared.examples))
        self._publish(seq, view)
        return result

    def _roll_back(self) -> None:
        """The state as of the store's last record (the write lock is held)."""
        try:
            loaded = load_at(self.state_dir, self.store, self.snapshots, trust=self._trust, reuse=self.clf)
            self.clf, self.snapshot_seq = loaded.clf, loaded.snapshot_seq
            with self._seq_cond:
                self.applied_seq, self.view = loaded.seq, self._make_view(loaded.seq)
                self._seq_cond.notify_all()
        except Exception as e:
            self.failed = f"rolling back a failed addition failed: {type(e).__name__}: {e}"
            log.exception("rollback failed; additions are stopped until a restart")

    # -- following other replicas ------------------------------------------------------------
    def catch_up(self) -> int:
        """Apply the records other replicas committed since ours, in seq order; how many."""
        with self._add_lock:
            return self._catch_up_locked()

    def _catch_up_locked(self) -> int:
        n = 0
        for rec in self.store.records_after(self.applied_seq):
            if self.failed:
                break
            where = f"{self.store.location} seq {rec.seq}"
            if rec.seq != self.applied_seq + 1:
                self.failed = f"record seq {rec.seq} follows seq {self.applied_seq}: records are missing"
                break
            # a record carries its embeddings; an older one is embedded here, outside the write lock
            with self._model_lock if "embeddings" not in rec.body else nullcontext():
                prepared = prepare_record(self.clf, rec, where=where)
            try:
                with self._rw.write(), self._model_lock:
                    apply_prepared(self.clf, prepared, where=where)
            except StoreError as e:
                log.exception("following seq %d failed; rebuilding from the store", rec.seq)
                with self._rw.write(), self._model_lock:
                    self._roll_back()
                if not self.failed and self.applied_seq < rec.seq:
                    self.failed = str(e)
                break
            self._publish(rec.seq, self._make_view(rec.seq))
            n += 1
        if n:
            log.info("followed %d addition(s) from the store, now at seq %d", n, self.applied_seq)
        return n

    @contextmanager
    def changing(self) -> Iterator[None]:
        """The lock for swapping a refreshed stage in (``clf.refresh_stale(swap=...)``)."""
        with self._add_lock, self._rw.write():
            yield

    # -- snapshots -------------------------------------------------------------------------
    def snapshot(self) -> int | None:
        """Save the current state as a snapshot, if this replica's turn and none as new exists.

        The save holds the add lock, not the read lock: every change of the state takes the add
        lock, so the state is frozen for the save while predictions go on (additions wait)."""
        with self.snapshots.turn() as mine:
            if not mine:
                return None
            t0 = time.perf_counter()
            with self._add_lock:
                seq = self.applied_seq
                if self.failed or seq <= max(self.snapshot_seq, self.snapshots.latest_seq()):
                    self.snapshot_seq = max(self.snapshot_seq, min(seq, self.snapshots.latest_seq()))
                    return None
                target = self.snapshots.write(self.clf, seq)
            self.snapshots.seal(target, seq)
            self.snapshot_seq = seq
            log.info("snapshot at seq %d in %.1f s", seq, time.perf_counter() - t0)
            return seq

    def close(self, *, final_snapshot: bool = True) -> None:
        if self.workers is not None:
            self.workers.stop()
        if final_snapshot:
            try:
                self.snapshot()
            except Exception:
                log.exception("final snapshot failed; the store still holds every addition")
        self.snapshots.close()
        self.store.close()
