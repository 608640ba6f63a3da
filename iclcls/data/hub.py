"""Load a Hugging Face Hub dataset by name, failing fast and clearly where the Hub is unreachable.

``datasets`` retries network calls for a long time before giving up; on an offline
machine a user should learn at once that the Hub cannot be reached and that a local
file (``load_examples``) does the same job. Datasets already in the local Hugging Face
cache still load with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from iclcls.data.records import OnBad, build_examples
from iclcls.errors import DataError
from iclcls.types import Example

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when the user has switched the Hub off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(*, timeout: float = 3.0) -> bool:
    """One short request to the Hub endpoint (``HF_ENDPOINT``); False on any network error."""
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        httpx.head(endpoint, timeout=timeout, follow_redirects=False)
    except httpx.HTTPError:
        return False
    return True


@contextmanager
def _libraries_offline(offline: bool) -> Iterator[None]:
    """Make ``datasets`` and ``huggingface_hub`` honour an offline switch set after their import.

    Both read ``HF_HUB_OFFLINE`` once, at import; a switch set later (a notebook, a test)
    would otherwise send them into minutes of network retries. Restored on exit.
    """
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = (hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def _unreachable(name: str, why: str) -> DataError:
    return DataError(
        f"the Hugging Face Hub is unreachable ({why}), so dataset {name!r} cannot be downloaded; "
        "pass a local file instead (load_examples('data.csv' | .tsv | .jsonl | .json | .parquet))"
    )


def load_hf_dataset(
    name: str,
    *,
    split: str,
    text_field: str = "text",
    label_field: str | None = "label",
    config: str | None = None,
    multi_label_sep: str | None = None,
    on_empty: OnBad = "error",
    timeout: float = 3.0,
) -> list[Example]:
    """Examples from Hub dataset ``name`` (``config``, ``split``).

    Integer class labels (``ClassLabel``, also inside lists for multi-label sets) are
    mapped to their names. Raises ``DataError`` quickly when the Hub is off or unreachable.
    """
    offline = hub_offline()
    if not offline and not hub_reachable(timeout=timeout):
        raise _unreachable(name, f"no answer from {os.environ.get('HF_ENDPOINT', 'https://huggingface.co')} within {timeout:g} s")
    import datasets

    try:
        with _libraries_offline(offline):
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline cache miss, connection loss, unknown name, bad split
        if offline:
            raise _unreachable(name, "HF_HUB_OFFLINE is set and the dataset is not in the local cache") from e
        raise DataError(f"cannot load Hub dataset {name!r} (config={config!r}, split={split!r}): {e}") from e
    path = f"hf://{name}" + (f"/{config}" if config else "") + f"[{split}]"
    for field in (text_field, label_field):
        if field is not None and field not in ds.column_names:
            raise DataError(f"no column {field!r}; the columns are: {', '.join(map(repr, ds.column_names))}", path=path, field=field)
    labels = _label_names(ds, label_field) if label_field is not None else None
    return build_examples(
        ds[text_field],
        labels,
        path=path,
        locate=lambda i: f"row {i + 1}",
        text_field=text_field,
        label_field=label_field,
        multi_label_sep=multi_label_sep,
        on_empty=on_empty,
    )


def _label_names(ds: Any, field: str) -> list[Any]:
    """The label column with ClassLabel ids replaced by names."""
    import datasets

    feature = ds.features[field]
    values = ds[field]
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(v) if v is not None and v >= 0 else None for v in values]
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.ClassLabel):
        return [[inner.int2str(v) for v in row] if row is not None else None for row in values]
    return values
