"""The one reader for local data files: CSV, TSV, JSON Lines, JSON and Parquet into columns.

CSV/TSV go through the csv module in one pass, every cell as the text written (no "NA"
-> missing, no "007" -> 7), keeping the first line of every record (a quoted field may
span lines) so that errors and benchmark example ids point at the line a user sees in an
editor (header = line 1). JSON Lines and JSON go through the json module (JSON Lines
records keep their line); Parquet through pyarrow (rows are numbered). No Hugging Face
``datasets`` here: it is for the Hub only (``data/hub.py``) and would leave an Arrow
cache under ~/.cache/huggingface for every local file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from iclcls.data.records import build_examples
from iclcls.errors import DataError, check_utf8, require_file
from iclcls.types import Example, LabelSpace

Format = Literal["csv", "tsv", "jsonl", "json", "parquet"]

_SUFFIXES: dict[str, Format] = {
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".json": "json", ".parquet": "parquet", ".pq": "parquet",
}


@dataclass(frozen=True)
class Table:
    """A file's columns, and where each record starts: ``lines`` (1-based) or, without lines, ``unit`` numbers."""

    path: Path
    data: dict[str, list[Any]]
    lines: list[int] | None = None
    unit: str = "row"

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.data)

    def column(self, name: str) -> list[Any]:
        if name not in self.data:
            raise DataError(
                f"no column {name!r}; the columns are: {', '.join(map(repr, self.data)) or '(none)'}",
                path=self.path,
                field=name,
            )
        return self.data[name]

    def locate(self, i: int) -> str:
        if self.lines is not None and i < len(self.lines):
            return f"line {self.lines[i]}"
        return f"{self.unit} {i + 1}"


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
            f"cannot tell the format from the suffix {suffix!r}; pass format= (csv, tsv, jsonl, json, parquet)", path=path
        )
    return _SUFFIXES[suffix]


def read_table(
    path: str | Path, *, format: str | None = None, json_field: str | None = None,
    delimiter: str | None = None, columns: Sequence[str] | None = None, quote: bool = True,
) -> Table:
    """Read a local data file. CSV/TSV options: ``delimiter`` (default from the format),
    ``columns`` names the fields of a file without a header, ``quote=False`` reads quote
    characters as text. ``json_field`` reads the records under that key of a JSON document."""
    p = require_file(path)
    fmt = "csv" if delimiter is not None and format is None else detect_format(p, format)
    if fmt == "parquet":
        return _read_parquet(p)
    check_utf8(p)
    if p.stat().st_size == 0:
        raise DataError("file is empty", path=p)
    if fmt in ("json", "jsonl"):
        return _read_json(p, fmt, json_field)
    sep = delimiter or ("\t" if fmt == "tsv" else ",")
    return _read_delimited(p, sep, columns, quote)


def _read_delimited(path: Path, sep: str, columns: Sequence[str] | None, quote: bool) -> Table:
    rows: list[list[str]] = []
    lines: list[int] = []
    header: list[str] | None = list(columns) if columns is not None else None
    if csv.field_size_limit() < 2**31 - 1:
        csv.field_size_limit(2**31 - 1)  # the default 128 KiB rejects long documents in a cell
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=sep, quoting=csv.QUOTE_MINIMAL if quote else csv.QUOTE_NONE)
        prev_end = 0
        try:
            for row in reader:
                start, prev_end = prev_end + 1, reader.line_num
                if not row:
                    continue
                if header is None:
                    dup = next((c for c in row if row.count(c) > 1), None)
                    if dup is not None:
                        raise DataError(f"the header repeats column {dup!r}", path=path, location="line 1")
                    header = row
                elif len(row) != len(header):
                    raise DataError(f"has {len(row)} fields, expected {len(header)} ({', '.join(header)})",
                                    path=path, location=f"line {start}")
                else:
                    rows.append(row)
                    lines.append(start)
        except csv.Error as e:
            raise DataError(f"cannot parse: {e}", path=path, location=f"line {reader.line_num}") from None
    if header is None:
        raise DataError("file has no header row", path=path)
    return Table(path, {c: [r[j] for r in rows] for j, c in enumerate(header)}, lines)


def _read_json(path: Path, fmt: Format, json_field: str | None) -> Table:
    """JSON Lines (one record per non-blank line), or a JSON document: a list of records,
    or an object holding one under ``json_field``. A ``.json`` file of JSON Lines reads as such."""
    text = path.read_text(encoding="utf-8-sig")
    lines: list[int] | None = None
    records: Any = None
    if fmt == "json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            if json_field is not None:
                raise DataError(f"not valid JSON: {e.msg} (column {e.colno})", path=path, location=f"line {e.lineno}") from None
    if records is None:  # JSON Lines
        records, lines = [], []
        # "\n" only: str.splitlines() also breaks at U+2028, U+0085, \x1c-\x1e, which JSON strings may hold raw.
        for n, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"not valid JSON: {e.msg} (column {e.colno})", path=path, location=f"line {n}") from None
                lines.append(n)
    elif json_field is not None:
        if not isinstance(records, dict) or json_field not in records:
            raise DataError(f"the JSON document has no key {json_field!r}", path=path, field=json_field)
        records = records[json_field]
    if not isinstance(records, list):
        raise DataError("expected a list of records (objects)", path=path)
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            where = f"line {lines[i]}" if lines else f"record {i + 1}"
            raise DataError(f"a record must be a JSON object, got {type(r).__name__}", path=path, location=where)
    names = list(dict.fromkeys(k for r in records for k in r))
    return Table(path, {k: [r.get(k) for r in records] for k in names}, lines, unit="record")


def _read_parquet(path: Path) -> Table:
    import pyarrow.parquet as pq

    try:
        data = pq.read_table(path).to_pydict()
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"cannot read as parquet: {type(e).__name__}: {e}", path=path) from None
    return Table(path, data, None, unit="row")


def table_examples(
    table: Table,
    *,
    text_field: str,
    label_field: str,
    label_space: LabelSpace,
    id_prefix: str,
    map_label: Callable[[int, str], Any] | None = None,
    multi_label_sep: str | None = None,
) -> list[Example]:
    """Validated Examples from two columns of a benchmark file; ids are ``"{id_prefix}:{line}"``.

    ``map_label(i, value)`` turns a raw cell into label(s) first (e.g. class ids to names).
    """
    labels: list[Any] = table.column(label_field)
    if map_label is not None:
        labels = [map_label(i, v) for i, v in enumerate(labels)]
    return build_examples(
        table.column(text_field),
        labels,
        [f"{id_prefix}:{n}" for n in table.lines or ()],
        path=table.path,
        locate=table.locate,
        text_field=text_field,
        label_field=label_field,
        multi_label_sep=multi_label_sep,
        label_space=label_space,
    )
