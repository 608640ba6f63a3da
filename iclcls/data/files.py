"""Load labelled examples from a local CSV, TSV, JSON Lines, JSON or Parquet file.

Reading goes through Hugging Face ``datasets`` (``load_dataset("csv"|"json"|"parquet")``),
which needs no network for local files and handles large files in Arrow. Every column
of a CSV/TSV is read as text (no "NA" -> missing, no "007" -> 7) so labels and texts
arrive exactly as written. Problems are reported with the line a user sees in an
editor (header = line 1), computed only when there is a problem.
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from iclcls.data.errors import DataError, check_utf8, require_file
from iclcls.data.records import OnBad, build_examples
from iclcls.types import Example, LabelSpace

Format = Literal["csv", "tsv", "jsonl", "json", "parquet"]

_SUFFIXES: dict[str, Format] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def detect_format(path: str | Path, format: str | None = None) -> Format:
    """The file format: ``format`` when given, else from the suffix."""
    if format is not None:
        fmt = format.lower().lstrip(".")
        if fmt not in _SUFFIXES.values():
            raise DataError(f"unknown format {format!r}; use one of: csv, tsv, jsonl, json, parquet", path=path)
        return fmt  # type: ignore[return-value]
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise DataError(
            f"cannot tell the format from the suffix {suffix!r}; pass format= (csv, tsv, jsonl, json, parquet)",
            path=path,
        )
    return _SUFFIXES[suffix]


def load_examples(
    path: str | Path,
    *,
    text_field: str = "text",
    label_field: str | None = "label",
    multi_label_sep: str | None = None,
    id_field: str | None = None,
    format: str | None = None,
    labels: LabelSpace | Sequence[str] | None = None,
    on_empty: OnBad = "error",
    on_unknown_label: OnBad = "error",
    json_field: str | None = None,
) -> list[Example]:
    """Read ``path`` into Examples.

    The label cell may hold a list (JSON, Parquet) or a string; ``multi_label_sep`` splits
    strings ("a|b" with ``"|"``). ``label_field=None`` loads unlabelled text. When
    ``labels`` (a label space) is given, a label outside it is an error, or with
    ``on_unknown_label="skip"`` the row is left out. Empty text or label is an error, or
    with ``on_empty="skip"`` the row is left out; skips are reported in one
    ``DataWarning`` with their count. ``json_field`` reads the records under that key of
    a JSON document (``{"data": [...]}``).
    """
    p = require_file(path)
    fmt = detect_format(p, format)
    if fmt != "parquet":
        check_utf8(p)
    table = _read_table(p, fmt, json_field=json_field)
    columns = list(table.keys())
    for field in (text_field, label_field, id_field):
        if field is not None and field not in table:
            raise DataError(
                f"no column {field!r}; the columns are: {', '.join(map(repr, columns)) or '(none)'}",
                path=p,
                field=field,
            )
    return build_examples(
        table[text_field],
        table[label_field] if label_field is not None else None,
        table[id_field] if id_field is not None else None,
        path=p,
        locate=_locator(p, fmt, json_field=json_field),
        text_field=text_field,
        label_field=label_field,
        multi_label_sep=multi_label_sep,
        label_space=labels,
        on_empty=on_empty,
        on_unknown_label=on_unknown_label,
    )


def _read_table(path: Path, fmt: Format, *, json_field: str | None) -> dict[str, list[Any]]:
    """Columns of the file as Python lists, read by ``datasets``."""
    import datasets

    if path.stat().st_size == 0:
        raise DataError("file is empty", path=path)
    kwargs: dict[str, Any] = {}
    if fmt in ("csv", "tsv"):
        sep = "\t" if fmt == "tsv" else ","
        header = _csv_header(path, sep)
        kwargs = {
            "sep": sep,
            "encoding": "utf-8-sig",
            "keep_default_na": False,
            "na_filter": False,
            "features": datasets.Features({c: datasets.Value("string") for c in header}),
        }
        builder = "csv"
    elif fmt in ("json", "jsonl"):
        builder = "json"
        if json_field is not None:
            kwargs["field"] = json_field
    else:
        builder = "parquet"
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except DataError:
        raise
    except Exception as e:  # datasets wraps parser errors in several types
        table = _read_json_fallback(path, fmt, json_field) if fmt in ("json", "jsonl") else None
        if table is None:
            raise _explain_read_error(path, fmt, e) from e
        return table
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    return {name: ds[name] for name in ds.column_names}


def _read_json_fallback(path: Path, fmt: Format, json_field: str | None) -> dict[str, list[Any]] | None:
    """Columns from the json module, for valid files Arrow's reader refuses.

    (Arrow rejects, e.g., JSON Lines mixing a list and a string label with a blank line
    between them.) ``None`` when the file is not valid JSON either.
    """
    try:
        if fmt == "jsonl" or not _is_json_document(path):
            with open(path, encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
        else:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
            if json_field is not None:
                records = records[json_field] if isinstance(records, dict) else None
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return None
    names = list(dict.fromkeys(k for r in records for k in r))
    return {k: [r.get(k) for r in records] for k in names}


def _csv_header(path: Path, sep: str) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row in csv.reader(f, delimiter=sep):
            if row:
                if len(set(row)) != len(row):
                    dup = next(c for c in row if row.count(c) > 1)
                    raise DataError(f"the header repeats column {dup!r}", path=path, location="line 1")
                return row
    raise DataError("file has no header row", path=path)


def _explain_read_error(path: Path, fmt: Format, err: Exception) -> DataError:
    """A DataError naming the line the parser choked on, where we can find it."""
    if fmt == "jsonl" or (fmt == "json" and not _is_json_document(path)):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        return DataError(f"not valid JSON: {e.msg} (column {e.colno})", path=path, location=f"line {lineno}")
    if fmt in ("csv", "tsv"):
        sep = "\t" if fmt == "tsv" else ","
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=sep)
            width = None
            try:
                for row in reader:
                    if not row:
                        continue
                    if width is None:
                        width = len(row)
                    elif len(row) != width:
                        return DataError(
                            f"has {len(row)} fields but the header has {width}", path=path, location=f"line {reader.line_num}"
                        )
            except csv.Error as e:
                return DataError(f"cannot parse: {e}", path=path, location=f"line {reader.line_num}")
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return DataError(f"cannot read as {fmt}: {type(cause).__name__}: {cause}", path=path)


def _is_json_document(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
        return True
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _locator(path: Path, fmt: Format, *, json_field: str | None) -> Callable[[int], str]:
    """``locate(i)`` -> where record ``i`` starts, as a user would look for it."""

    @functools.cache
    def lines() -> list[int] | None:
        if fmt in ("csv", "tsv"):
            return _csv_record_lines(path, "\t" if fmt == "tsv" else ",")
        if fmt == "jsonl" or (fmt == "json" and json_field is None and not _is_json_document(path)):
            with open(path, encoding="utf-8") as f:
                return [n for n, line in enumerate(f, start=1) if line.strip()]
        return None

    def locate(i: int) -> str:
        table = lines()
        if table is not None and i < len(table):
            return f"line {table[i]}"
        if fmt == "parquet":
            return f"row {i + 1}"
        return f"record {i + 1}"

    return locate


def _csv_record_lines(path: Path, sep: str) -> list[int]:
    """First line of each data record (blank lines skipped, as pandas does; header excluded)."""
    starts: list[int] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=sep)
        prev_end = 0
        header_seen = False
        for row in reader:
            start = prev_end + 1
            prev_end = reader.line_num
            if not row:
                continue
            if not header_seen:
                header_seen = True
                continue
            starts.append(start)
    return starts
