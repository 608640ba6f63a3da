"""Labelling a corpus: stream rows from a file through a saved classifier into an
append-only, resumable JSONL file, on this machine or as a Ray Data job.

``label_corpus(input, state=DIR, out=OUT, options=LabelOptions(...))`` is what
``iclcls label`` runs; see :mod:`iclcls.label.run` for the order of checks.
"""

from __future__ import annotations

from iclcls.label.output import ResumeRefused, meta_path, state_fingerprint
from iclcls.label.readers import LabelInputError
from iclcls.label.rows import LMUnavailable
from iclcls.label.run import EXIT_LM_UNAVAILABLE, LabelOptions, LabelSummary, label_corpus

__all__ = [
    "EXIT_LM_UNAVAILABLE",
    "LMUnavailable",
    "LabelInputError",
    "LabelOptions",
    "LabelSummary",
    "ResumeRefused",
    "label_corpus",
    "meta_path",
    "state_fingerprint",
]
