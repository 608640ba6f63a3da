"""Turn raw columns (text, label, id) into validated ``Example`` objects.

Every loader (user files, the Hub, named benchmarks) ends here, so the checks and the
error messages are the same everywhere: empty text, empty label, a label outside the
label space, a non-text value. ``locate(i)`` names row ``i`` as a user sees it
("line 7", "row 3"); it is only called when something is wrong, so loaders may compute
it lazily.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from iclcls.errors import ConfigError, DataError, DataWarning
from iclcls.types import Example, LabelSpace

OnBad = Literal["error", "skip"]


def split_labels(value: Any, *, sep: str | None = None) -> tuple[str, ...]:
    """One cell's labels: a list stays a list, a string is split on ``sep`` when given.

    Labels are stripped of surrounding whitespace, empty parts dropped, duplicates removed
    (first occurrence kept). Integral numbers become their decimal string ("3", not "3.0").
    """
    if hasattr(value, "tolist"):  # numpy array or scalar
        value = value.tolist()
    if value is None:
        return ()
    if isinstance(value, str):
        parts = value.split(sep) if sep else [value]
    elif isinstance(value, (list, tuple, set, frozenset)):
        parts = list(value)
    else:
        parts = [value]
    out: list[str] = []
    for p in parts:
        if p is None:
            continue
        if isinstance(p, float):
            if math.isnan(p):
                continue
            if p.is_integer():
                p = int(p)
        s = str(p).strip()
        if s:
            out.append(s)
    return tuple(dict.fromkeys(out))


def build_examples(
    texts: Sequence[Any],
    labels: Sequence[Any] | None,
    ids: Sequence[Any] | None = None,
    *,
    path: str | Path,
    locate: Callable[[int], str],
    text_field: str = "text",
    label_field: str | None = "label",
    multi_label_sep: str | None = None,
    label_space: LabelSpace | Sequence[str] | None = None,
    on_empty: OnBad = "error",
    on_unknown_label: OnBad = "error",
) -> list[Example]:
    """Validate column values row by row and build Examples.

    ``labels=None`` loads unlabelled examples. With ``on_empty="skip"`` rows whose text or
    label is empty are left out, and with ``on_unknown_label="skip"`` rows carrying a label
    outside ``label_space``; either way one ``DataWarning`` reports how many and where.
    """
    for name, value in (("on_empty", on_empty), ("on_unknown_label", on_unknown_label)):
        if value not in ("error", "skip"):
            raise ConfigError(f"{name} must be 'error' or 'skip', got {value!r}")
    known = None
    if label_space is not None:
        known = label_space if isinstance(label_space, LabelSpace) else set(label_space)
    skipped: Counter[str] = Counter()
    skipped_at: dict[str, list[int]] = {}
    out: list[Example] = []

    def bad(i: int, field: str, reason: str, problem: str, policy: OnBad) -> None:
        if policy == "error":
            raise DataError(problem, path=path, location=locate(i), field=field)
        skipped[reason] += 1
        skipped_at.setdefault(reason, []).append(i)

    for i, text in enumerate(texts):
        if text is None or (isinstance(text, float) and math.isnan(text)):
            text = ""
        if not isinstance(text, str):
            raise DataError(f"must be text, got {type(text).__name__} {text!r}", path=path, location=locate(i), field=text_field)
        if not text.strip():
            bad(i, text_field, "empty text", "text is empty or whitespace", on_empty)
            continue
        labs: tuple[str, ...] = ()
        if labels is not None:
            labs = split_labels(labels[i], sep=multi_label_sep)
            if not labs:
                bad(i, label_field or "label", "empty label", "label is empty", on_empty)
                continue
            if known is not None:
                unknown = [lab for lab in labs if lab not in known]
                if unknown:
                    bad(
                        i,
                        label_field or "label",
                        "unknown label",
                        f"label {unknown[0]!r} is not in the label space ({len(known)} labels)",
                        on_unknown_label,
                    )
                    continue
        ex_id = None
        if ids is not None and ids[i] is not None:
            ex_id = str(ids[i])
        out.append(Example(text=text, labels=labs, id=ex_id))

    if skipped:
        parts = []
        for reason, n in skipped.items():
            where = ", ".join(locate(i) for i in skipped_at[reason][:5])
            more = ", ..." if n > 5 else ""
            parts.append(f"{n} with {reason} ({where}{more})")
        warnings.warn(f"{path}: skipped {sum(skipped.values())} rows: {'; '.join(parts)}", DataWarning, stacklevel=3)
    return out
