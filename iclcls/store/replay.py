"""The state at a seq: the newest snapshot at or before it (or the fitted state), then the records.

One function for every reader of a store -- the service starting or rolling back, a replica
following the others, ``iclcls label --store`` and each Ray actor -- so that all of them build
the same state from the same records: embeddings are computed the same way (one batch per
record, as when it was added live) and no LM is called (records carry tags and summaries).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iclcls.store.additions import Prepared
from iclcls.store.base import AdditionStore, Record, StoreError
from iclcls.store.snapshots import state_fingerprint

log = logging.getLogger("iclcls.store")


@dataclass
class Loaded:
    clf: Any
    seq: int  # the last record applied
    snapshot_seq: int  # the snapshot it started from (0: the fitted state)
    replayed: int


def check_pairing(store: AdditionStore, state_dir: Path, *, claim: bool) -> None:
    """A store belongs to one fitted state: replaying it onto another would be silently wrong.
    ``claim``: mark an unmarked store as this state's (a writer); a reader only checks."""
    mine = state_fingerprint(state_dir)
    theirs = store.get_meta("state")
    if theirs is None and claim:
        setter = getattr(store, "set_meta_if_absent", None)
        if setter is None:
            store.set_meta("state", mine)
            theirs = mine
        else:  # replicas starting together: the first mark wins, the others check against it
            theirs = setter("state", mine)
        store.set_meta("state_dir", str(Path(state_dir).absolute()))
    if theirs is not None and theirs != mine:
        raise StoreError(
            f"{store.location}: this store holds additions to another fitted state (made for "
            f"{store.get_meta('state_dir')}, which differs from {state_dir}); give each state its own --store"
        )


def prepare_record(clf: Any, rec: Record, *, where: str) -> Prepared:
    """A committed record ready to apply: parsed, with its logged embeddings (checked against the
    embedder's dimension), or embedded with ``clf``'s embedder when it has none."""
    from iclcls.embed.image import encode_examples

    prepared = Prepared.from_record(rec.body, where)
    if prepared.embeddings is not None:
        dim = getattr(clf.pool_.embedder, "dim", None)
        if dim is not None and prepared.embeddings.shape[1] != int(dim):
            raise StoreError(f"{where}: the record's embeddings have dimension {prepared.embeddings.shape[1]}, the "
                             f"embedder {dim}")
        return prepared
    try:
        emb = encode_examples(clf.pool_.embedder, list(prepared.examples))
    except Exception as e:
        raise StoreError(f"{where}: embedding the record failed ({type(e).__name__}: {e})") from e
    return dataclasses.replace(prepared, embeddings=emb)


def apply_prepared(clf: Any, prepared: Prepared, *, where: str) -> None:
    try:
        prepared.apply_to(clf)
    except Exception as e:
        raise StoreError(f"{where}: applying the addition failed ({type(e).__name__}: {e}); it applied when it "
                         "was added, so the state or iclcls changed since") from e


def load_at(
    state_dir: str | Path,
    store: AdditionStore,
    snapshots: Any,
    *,
    upto: int | None = None,
    lm: Any = None,
    embedder: Any = None,
    trust: bool = False,
    reuse: Any = None,
    adjust: Any = None,
) -> Loaded:
    """The state after record ``upto`` (default: the store's head now).

    ``reuse`` (a classifier being replaced) lends its loaded embedder and LM, so a rollback
    loads no model again; ``adjust(clf)`` runs on a freshly loaded classifier before replay."""
    from iclcls.classifier import ICLClassifier

    head = store.seq()
    upto = head if upto is None else upto
    if upto > head:
        raise StoreError(f"{store.location}: seq {upto} was asked for, but the store ends at {head}")
    latest = snapshots.latest(at_most=upto)
    source, seq = latest if latest else (Path(state_dir), 0)
    log.info("loading %s (seq %d)", source, seq)
    if reuse is None:
        clf = ICLClassifier.load(source, lm=lm, embedder=embedder, trust=trust)
        if adjust is not None:
            adjust(clf)
    else:
        clf = ICLClassifier.load(source, lm=reuse.lm_, embedder=reuse.embedder_, trust=trust)
        clf.lm, clf.embedder = reuse.lm, reuse.embedder  # the specs, so snapshots name them as before
    expect = seq + 1
    for rec in store.records_after(seq):
        if rec.seq > upto:
            break
        if rec.seq != expect:
            raise StoreError(f"{store.location}: record seq {rec.seq} follows seq {expect - 1}: records are missing")
        where = f"{store.location} seq {rec.seq}"
        apply_prepared(clf, prepare_record(clf, rec, where=where), where=where)
        expect += 1
    if expect - 1 < upto:
        raise StoreError(f"{store.location}: records up to seq {upto} were expected, the store has {expect - 1}")
    return Loaded(clf, upto, seq, upto - seq)


def head_seq(spec: str | Path) -> tuple[str, int]:
    """The store's location (for a sidecar, no credentials) and its current seq."""
    from iclcls.store import open_store

    store = open_store(spec, read_only=True)
    try:
        return store.location, store.seq()
    finally:
        store.close()


def load_from_store(state_dir: str | Path, spec: str | Path, *, upto: int, lm: Any = None, trust: bool = False) -> Any:
    """``iclcls label --store``: the fitted state plus the store's records up to ``upto``, read-only
    (no writer lock: it runs beside the service)."""
    from iclcls.store import open_store

    store = open_store(spec, read_only=True)
    snapshots = None
    try:
        check_pairing(store, Path(state_dir), claim=False)
        snapshots = store.snapshots()
        return load_at(state_dir, store, snapshots, upto=upto, lm=lm, trust=trust).clf
    finally:
        if snapshots is not None:
            snapshots.close()
        store.close()
