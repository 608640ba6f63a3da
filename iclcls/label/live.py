"""Labelling with the classes added live: the fitted state plus a store's records up to one seq.

The seq is fixed when a run starts and recorded in ``OUT.meta.json``; a resume reads it back, so
every row of one output is labelled by the same classes even while the service goes on adding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iclcls.label.readers import LabelInputError


def store_seq_for(spec: str, out: Path | None, *, overwrite: bool) -> tuple[str, int]:
    """The store's location and the seq to label at: the one OUT's sidecar recorded when resuming
    (so every row is labelled with the same classes), else the store's head now."""
    from iclcls.store import StoreError
    from iclcls.store.replay import head_seq

    try:
        location, head = head_seq(spec)
    except StoreError as e:
        raise LabelInputError(f"--store: {e}") from None
    if out is not None and not overwrite and out.is_file() and out.stat().st_size > 0:
        from iclcls.io import read_json
        from iclcls.label.output import meta_path

        try:
            old = read_json(meta_path(out)).get("options", {})
        except (OSError, ValueError):
            old = {}
        if isinstance(old.get("store_seq"), int) and old.get("store") == location:
            return location, int(old["store_seq"])
    return location, head


def load_labeller(state: str | Path, *, lm: str | None, trust: bool, store: str | None, store_seq: int | None) -> Any:
    """The saved classifier, plus the store's additions up to ``store_seq`` when a store is given
    (the local engine and every Ray actor load it the same way)."""
    if store is None:
        from iclcls.classifier import ICLClassifier

        return ICLClassifier.load(state, lm=lm, trust=trust)
    from iclcls.store import StoreError
    from iclcls.store.replay import load_from_store

    try:
        return load_from_store(state, store, upto=int(store_seq or 0), lm=lm, trust=trust)
    except StoreError as e:
        raise LabelInputError(f"--store: {e}") from None
