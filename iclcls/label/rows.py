"""Records -> output rows with a loaded classifier; the one step both engines share.

A failure is contained to its row: when a batch raises (an LM error on one prompt, a text
over the context budget), its rows are retried one by one and only the rows that still fail
become ``{"id": ..., "error": ...}``. An outage is not a row's fault: when the LM server
cannot be reached (connection refused, timed out, 429/502/503/504 after the client's own
retries), labelling stops with :class:`LMUnavailable`, which carries the rows finished before
it, so that nothing is written for the rows it did not label and a re-run resumes there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from iclcls.errors import ConfigError, LMBackendError, LMServerError
from iclcls.label.readers import Record

# HTTP statuses that say "the server (or the path to it) is unavailable", not "this prompt is bad".
OUTAGE_STATUSES = frozenset({408, 429, 502, 503, 504})


class LMUnavailable(LMBackendError):
    """The LM server is unreachable: the run stops. ``rows`` are the rows finished before the
    outage (a prefix of the records given, in order); ``cause`` is the client's error."""

    def __init__(self, cause: BaseException, rows: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.rows = list(rows)
        self.summary: Any = None  # the run's LabelSummary, set by label_corpus


def is_outage(error: BaseException) -> bool:
    """True when ``error`` says the LM server is down or unreachable rather than that one
    input failed: an :class:`LMServerError` without an HTTP status (connection refused,
    timed out) or with a status in :data:`OUTAGE_STATUSES`."""
    if not isinstance(error, LMServerError):
        return False
    status = getattr(error, "status", None)
    return status is None or status in OUTAGE_STATUSES


@dataclass(frozen=True)
class RowOptions:
    """What each output row carries beyond id, labels and scores."""

    with_text: bool = False
    trace: bool = False  # candidates, demonstrations, prompt: most of the bytes, off by default
    alpha: float | None = None  # add the conformal label set ("set") at this miscoverage level


def embedding_bound(clf: Any) -> bool:
    """True when no LM runs per query (the retriever alone): then the embedder sets the pace."""
    return not clf.ranker_.needs_lm and clf.inferrer_ is None


def prepare(clf: Any, *, chunk_rows: int) -> Any:
    """Tune a loaded classifier for bulk labelling: with no LM per query, predict (and so
    embed) a whole chunk per call instead of the saved per-LM-call batch size."""
    if embedding_bound(clf):
        clf.batch_size = max(int(clf.batch_size), int(chunk_rows))
    return clf


def check_row_options(clf: Any, opts: RowOptions) -> None:
    """Refuse options the loaded state cannot serve (before OUT is touched)."""
    if opts.alpha is not None and not (clf.tuned_.get("conformal") or {}).get("n"):
        raise ConfigError("--alpha needs a state with conformal calibration: fit it again (fit calibrates by "
                         "cross-validation unless tune='none')")


def label_records(
    clf: Any, records: Sequence[Record], opts: RowOptions, *, embeddings: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """One output row per record, in order; raises :class:`LMUnavailable` (with the rows before
    it) when the LM server is unreachable. ``embeddings``: of the records without an error, in
    order, when already computed (``query_embeddings``)."""
    check_row_options(clf, opts)
    good = [r for r in records if r.error is None]
    outage: BaseException | None = None
    try:
        preds = _predict_contained(clf, [r.text for r in good], embeddings)
    except _Outage as stop:
        preds, outage = stop.finished, stop.cause
    by_pos = iter(preds)
    rows: list[dict[str, Any]] = []
    for r in records:
        if r.error is not None:
            rows.append({"id": r.id, "error": r.error})
            continue
        p = next(by_pos, _MISSING)
        if p is _MISSING:  # the outage came before this record: nothing is written for it
            assert outage is not None
            raise LMUnavailable(outage, rows)
        if isinstance(p, BaseException):
            rows.append({"id": r.id, "error": f"{type(p).__name__}: {p}"})
            continue
        row: dict[str, Any] = {"id": r.id, "labels": list(p.labels), "scores": [float(s) for s in p.scores]}
        if clf.multi_label:
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


_MISSING = object()


class _Outage(Exception):
    """Internal: the outage, with the predictions (or row errors) finished before it."""

    def __init__(self, cause: BaseException, finished: list[Any]) -> None:
        super().__init__(str(cause))
        self.cause, self.finished = cause, finished


def query_embeddings(clf: Any, records: Sequence[Record]) -> np.ndarray:
    """The embeddings ``label_records`` needs for ``records`` (those without an error)."""
    return clf.embed_queries([r.text for r in records if r.error is None])


def _predict_contained(clf: Any, texts: list[str], embeddings: np.ndarray | None = None) -> list[Any]:
    """Predictions, or the exception for each text that fails on its own; raises ``_Outage``
    (with what finished before it) when the LM server is unreachable."""
    if not texts:
        return []
    try:
        if embeddings is not None:
            return list(clf.predict_detailed(texts, show_progress=False, embeddings=embeddings))
        return list(clf.predict_detailed(texts, show_progress=False))
    except Exception as batch_error:  # noqa: BLE001 - isolate the failing rows below
        if is_outage(batch_error):
            raise _Outage(batch_error, []) from batch_error
        if len(texts) == 1:
            return [batch_error]
    out: list[Any] = []
    for t in texts:
        try:
            out.extend(clf.predict_detailed([t], show_progress=False))
        except Exception as e:  # noqa: BLE001 - becomes this row's error, unless the server is down
            if is_outage(e):
                raise _Outage(e, out) from e
            out.append(e)
    return out
