"""The live classifier behind the service: load, replay, add (durably, all or nothing), predict.

Where things live::

    DIR/                     the fitted state: only read, never written by the service
    STORE                    the additions (``--store``; default ``DIR.additions.sqlite``)
    STORE.snapshots/NNNN/    ICLClassifier.save of the state after addition NNNN
    STORE.lock               the writer lock: one server per store

Start: the newest snapshot (or DIR, seq 0), then every record after its seq, in order, with
no LM call (records carry the tags and summaries an LM wrote). An addition: validate (the
app), prepare (embed; tags and summaries by the LM) outside the write lock, then under it
apply in place, commit the record with its answer in one store transaction, and only then
show the new state and acknowledge. Predictions take the read lock, so one sees the state
before or after an addition, never half of one.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iclcls.serve.additions import Addition, Prepared
from iclcls.serve.legacy import find_legacy
from iclcls.serve.rwlock import RWLock
from iclcls.serve.snapshots import Snapshots, state_fingerprint
from iclcls.serve.store import AdditionStore, KeyConflict, StoreError, default_store_path, open_store
from iclcls.types import Prediction

log = logging.getLogger("iclcls.serve")


class AdditionRefused(ValueError):
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
    """A loaded ICLClassifier plus its store and snapshots; safe to use from many threads."""

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
    ) -> None:
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, got {snapshot_every}")
        self.state_dir = Path(state_dir)
        if not (self.state_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.state_dir}: not a saved ICLClassifier (no config.json)")
        self.snapshot_every, self.max_classes, self.max_pool = snapshot_every, max_classes, max_pool
        self._lm, self._embedder, self._trust, self._embed_cache = lm, embedder, trust_state, embed_cache
        if store is None or isinstance(store, (str, Path)):
            spec = store if store is not None else default_store_path(self.state_dir)
            store = open_store(spec, writer={"host": socket.gethostname(), **dict(holder or {})})
        self.store: AdditionStore = store
        try:
            self._start()
        except BaseException:
            self.store.close()
            raise

    def _start(self) -> None:
        self._rw = RWLock()
        self._add_lock = threading.Lock()  # one addition at a time: apply order == seq order
        self._model_lock = threading.Lock()  # embedder/LM calls one at a time (tokenizers are not thread-safe)
        self._snap_lock = threading.Lock()
        self.failed: str | None = None  # set when a failed addition could not be rolled back
        self._check_pairing()
        self.snapshots = Snapshots(self.store.snapshot_dir)
        legacy = find_legacy(self.state_dir) if self.store.seq() == 0 and not self.store.get_meta("legacy") else None
        if legacy is not None and legacy.snapshot is not None:
            self.snapshots.adopt(*legacy.snapshot)
            self.store.set_meta("base_seq", str(legacy.snapshot[1]))
        self.clf, self.snapshot_seq, self.replayed = self._rebuild(reuse=None)
        self.applied_seq = self.store.seq()
        self.view = self._make_view(self.applied_seq)
        self._snap_wanted = threading.Event()
        self._closing = False
        if legacy is not None:
            self._import(legacy)
        self.clf.predict(["warm up"], show_progress=False)  # load lazy models now, not on a first request
        log.info("ready: %d classes, %d pool examples, seq %d (%d replayed) from store %s", len(self.view.counts),
                 self.view.pool_size, self.applied_seq, self.replayed, self.store.location)
        self._snap_thread = threading.Thread(target=self._snapshot_loop, name="iclcls-snapshot", daemon=True)
        self._snap_thread.start()
        if self.replayed >= self.snapshot_every:
            self._snap_wanted.set()

    def _check_pairing(self) -> None:
        """A store belongs to one fitted state: replaying it onto another would be silently wrong."""
        mine = state_fingerprint(self.state_dir)
        theirs = self.store.get_meta("state")
        if theirs is None:
            self.store.set_meta("state", mine)
            self.store.set_meta("state_dir", str(self.state_dir.absolute()))
        elif theirs != mine:
            raise StoreError(
                f"{self.store.location}: this store holds additions to another fitted state (made for "
                f"{self.store.get_meta('state_dir')}, which differs from {self.state_dir}); give each state its own --store"
            )

    # -- loading and replay ----------------------------------------------------------------
    def _rebuild(self, *, reuse: Any) -> tuple[Any, int, int]:
        """The state at the store's last seq: newest snapshot (or DIR), then the records after it.

        ``reuse`` (the classifier being replaced) lends its loaded embedder and LM, so a
        rollback does not load models again."""
        from iclcls.classifier import ICLClassifier

        latest = self.snapshots.latest()
        source, seq = latest if latest else (self.state_dir, 0)
        top = self.store.seq()
        if seq > top:
            raise StoreError(f"{source}: a snapshot at seq {seq}, but the store {self.store.location} ends at "
                             f"{top}: the snapshots belong to another store")
        log.info("loading %s (seq %d)", source, seq)
        if reuse is None:
            clf = ICLClassifier.load(source, lm=self._lm, embedder=self._embedder, trust=self._trust)
            if not self._embed_cache:
                _uncached(clf)
        else:
            clf = ICLClassifier.load(source, lm=reuse.lm_, embedder=reuse.embedder_, trust=self._trust)
            clf.lm, clf.embedder = reuse.lm, reuse.embedder  # the specs, so snapshots name them as before
        replayed, expect = 0, seq + 1
        for rec in self.store.records_after(seq):
            if rec.seq != expect:
                raise StoreError(f"{self.store.location}: record seq {rec.seq} follows seq {expect - 1}: records are missing")
            where = f"{self.store.location} seq {rec.seq}"
            try:
                Prepared.from_record(rec.body, where).apply_to(clf)
            except StoreError:
                raise
            except Exception as e:
                raise StoreError(f"{where}: replaying the addition failed ({type(e).__name__}: {e}); it applied when "
                                 "it was added, so the state or iclcls changed since") from e
            replayed, expect = replayed + 1, expect + 1
        return clf, seq, replayed

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
            return self.clf.predict(list(texts), show_progress=False)

    @property
    def shortlist_k(self) -> int:
        return int(self.clf.shortlist_k)

    def _make_view(self, seq: int) -> ClassView:
        pool = self.clf.pool_
        counts = {lab: 0 for lab in pool.labels}
        counts.update(pool.label_counts())
        return ClassView(counts, dict(pool.labels.descriptions), len(pool), seq)

    # -- adding ----------------------------------------------------------------------------
    def add(self, addition: Addition, *, key: str | None = None, caps: bool = True) -> AddResult:
        """Apply and commit ``addition``, or raise with the state and the store unchanged.

        A retry under the same ``key`` gets the first answer and adds nothing; the same key with
        another body raises ``AdditionRefused(422)``. ``StoreWriteFailed`` means the commit failed
        (disk full, I/O error): nothing was stored, the state was rolled back, serving goes on.
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
        with self._add_lock:
            first = self._first_answer(key, digest)  # a concurrent retry may have committed meanwhile
            if first is not None:
                return first
            if caps:
                self._check_caps(addition, self.view)
            with self._rw.write(), self._model_lock:  # lock order everywhere: rw, then model
                result = self._apply_and_commit(prepared, key=key, digest=digest)
        if result.seq - self.snapshot_seq >= self.snapshot_every:
            self._snap_wanted.set()
        return result

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
        """Under the write lock: apply in place, commit, publish; on any failure roll back.

        Rollback rebuilds the state from the snapshot and the store (which never got the record)
        instead of applying to a copy: a copy of the pool, index and stage statistics would cost
        O(state) on EVERY addition, while a failure here is rare (the input was validated and
        prepared) and the rebuild is correct by construction, reusing the loaded models."""
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
        self.applied_seq, self.view = seq, view
        return result

    def _roll_back(self) -> None:
        """The state as of the store's last record (the write lock is held)."""
        try:
            self.clf, self.snapshot_seq, _ = self._rebuild(reuse=self.clf)
            self.view = self._make_view(self.applied_seq)
        except Exception as e:
            self.failed = f"rolling back a failed addition failed: {type(e).__name__}: {e}"
            log.exception("rollback failed; additions are stopped until a restart")

    # -- snapshots -------------------------------------------------------------------------
    def snapshot(self) -> int | None:
        """Save the current state as a snapshot (the store keeps every record, and so every
        idempotency key, regardless)."""
        with self._snap_lock:
            with self._rw.read():
                seq = self.applied_seq
                if seq <= self.snapshot_seq or self.failed:
                    return None
                target = self.snapshots.write(self.clf, seq)
            self.snapshots.seal(target, seq)
            self.snapshot_seq = seq
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
            except Exception:  # a failed snapshot loses nothing: the store holds every addition
                log.exception("snapshot failed; the store still holds every addition")

    def close(self, *, final_snapshot: bool = True) -> None:
        self._closing = True
        self._snap_wanted.set()
        self._snap_thread.join(timeout=60)
        if final_snapshot:
            try:
                self.snapshot()
            except Exception:
                log.exception("final snapshot failed; the store still holds every addition")
        self.store.close()
