"""Load labelled examples from a local CSV, TSV, JSON Lines, JSON or Parquet file.

Reading is ``tables.read_table`` (every CSV/TSV cell as the text written, records located
by the line a user sees in an editor); checking and building the Examples is
``records.build_examples``, shared with the benchmarks and the Hub loader.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from iclcls.data.records import OnBad, build_examples
from iclcls.data.tables import Format, detect_format, read_table
from iclcls.errors import ConfigError
from iclcls.types import Example, LabelSpace

__all__ = ["Format", "detect_format", "load_examples"]


def load_examples(
    path: str | Path,
    *,
    text_field: str | None = "text",
    label_field: str | None = "label",
    multi_label_sep: str | None = None,
    id_field: str | None = None,
    format: str | None = None,
    labels: LabelSpace | Sequence[str] | None = None,
    on_empty: OnBad = "error",
    on_unknown_label: OnBad = "error",
    json_field: str | None = None,
    image_field: str | None = None,
) -> list[Example]:
    """Read ``path`` into Examples.

    The label cell may hold a list (JSON, Parquet) or a string; ``multi_label_sep`` splits
    strings ("a|b" with ``"|"``). ``label_field=None`` loads unlabelled text. When
    ``labels`` (a label space) is given, a label outside it is an error, or with
    ``on_unknown_label="skip"`` the row is left out. Empty text or label is an error, or
    with ``on_empty="skip"`` the row is left out; skips are reported in one
    ``DataWarning`` with their count. ``json_field`` reads the records under that key of
    a JSON document (``{"data": [...]}``). ``image_field`` names an image column: paths
    relative to the file, URLs, or bytes (Parquet); the text is then optional
    (``text_field=None`` or a missing/empty cell) but a row needs an image or text.
    """
    table = read_table(path, format=format, json_field=json_field)
    if image_field is not None:
        from iclcls.data.images import build_image_examples

        texts = table.column(text_field) if text_field is not None and text_field in table.columns else None
        return build_image_examples(
            texts, table.column(image_field),
            table.column(label_field) if label_field is not None else None,
            table.column(id_field) if id_field is not None else None,
            path=table.path, locate=table.locate, text_field=text_field, image_field=image_field,
            label_field=label_field, multi_label_sep=multi_label_sep, label_space=labels, on_empty=on_empty,
        )
    if text_field is None:
        raise ConfigError("text_field=None needs an image_field")
    text, label, ids = (table.column(f) if f is not None else None for f in (text_field, label_field, id_field))
    return build_examples(
        text,
        label,
        ids,
        path=table.path,
        locate=table.locate,
        text_field=text_field,
        label_field=label_field,
        multi_label_sep=multi_label_sep,
        label_space=labels,
        on_empty=on_empty,
        on_unknown_label=on_unknown_label,
    )
