"""Records -> output rows with a loaded classifier; the one step both engines share.

A failure is contained to its row: when a batch raises (an LM error after the client's
retries, a text over the context budget), its rows are retried one by one and only the
rows that still fail become ``{"id": ..., "error": ...}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from iclcls.label.readers import Record


@dataclass(frozen=True)
class RowOptions:
    """What each output row carries beyond id, labels and scores."""

    with_text: bool = False
    trace: bool = False  # candidates, demonstrations, prompt: most of the bytes, off by default
    alpha: float | None = None  # add the conformal label set ("set") at this miscoverage level


def embedding_bound(clf: Any) -> bool:
    """True when no LM runs per query (the retriever alone): then the embedder sets the pace."""
    return not getattr(clf.ranker_, "needs_lm", True) and getattr(clf, "inferrer_", None) is None


def prepare(clf: Any, *, chunk_rows: int) -> Any:
    """Tune a loaded classifier for bulk labelling: with no LM per query, predict (and so
    embed) a whole chunk per call instead of the saved per-LM-call batch size."""
    if embedding_bound(clf):
        clf.batch_size = max(int(clf.batch_size), int(chunk_rows))
    return clf


def label_records(clf: Any, records: Sequence[Record], opts: RowOptions) -> list[dict[str, Any]]:
    """One output row per record, in order."""
    if opts.alpha is not None and not ((getattr(clf, "tuned_", None) or {}).get("conformal") or {}).get("n"):
        raise ValueError("--alpha needs a state with conformal calibration: fit it again (fit calibrates by "
                         "cross-validation unless tune='none')")
    good = [r for r in records if r.error is None]
    preds = _predict_contained(clf, [r.text for r in good])
    by_pos = iter(preds)
    rows: list[dict[str, Any]] = []
    for r in records:
        if r.error is not None:
            rows.append({"id": r.id, "error": r.error})
            continue
        p = next(by_pos)
        if isinstance(p, BaseException):
            rows.append({"id": r.id, "error": f"{type(p).__name__}: {p}"})
            continue
        row: dict[str, Any] = {"id": r.id, "labels": list(p.labels), "scores": [float(s) for s in p.scores]}
        if getattr(clf, "multi_label", False):
            row["chosen"] = list(clf.decide(p))
        if opts.alpha is not None:
            row["set"] = list(clf.conformal_sets([p], alpha=opts.alpha)[0])
        if opts.with_text:
            row["text"] = r.text
        if opts.trace:
            full = p.to_dict()
            for key in ("candidates", "demonstrations", "prompt_tokens", "trace"):
                row[key] = full[key]
        rows.append(row)
    return rows


def _predict_contained(clf: Any, texts: list[str]) -> list[Any]:
    """Predictions, or the exception for each text that fails on its own."""
    if not texts:
        return []
    try:
        return list(clf.predict(texts, show_progress=False))
    except Exception as batch_error:  # noqa: BLE001 - isolate the failing rows below
        if len(texts) == 1:
            return [batch_error]
    out: list[Any] = []
    for t in texts:
        try:
            out.extend(clf.predict([t], show_progress=False))
        except Exception as e:  # noqa: BLE001 - becomes this row's error
            out.append(e)
    return out
