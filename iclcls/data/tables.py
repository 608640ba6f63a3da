"""The one reader for local data files: CSV, TSV, JSON Lines, JSON and Parquet into columns.

CSV/TSV and Parquet go through pyarrow (:func:`csv_options`, shared with ``iclcls label``),
every CSV/TSV cell as the text written (no "NA" -> missing, no "007" -> 7), keeping the
first line of every record (a quoted field may span lines) so that errors and benchmark
example ids point at the line a user sees in an editor (header = line 1); a line of nothing
but separators counts as blank. JSON Lines and JSON go through the json module (JSON Lines
records keep their line); Parquet rows are numbered. No Hugging Face
``datasets`` here: it is for the Hub only (``data/hub.py``) and would leave an Arrow
cache under ~/.cache/huggingface for every local file.
"""

from __future__ import annotations

import codecs
import json
import re
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


def csv_options(
    delimiter: str = ",", *, text: Sequence[str] = (), handler: Any = None, quote: bool = True,
    names: Sequence[str] | None = None, skip_rows: int = 0, blank_rows: bool = False, block_size: int = 1 << 20,
) -> tuple[Any, Any, Any]:
    """The pyarrow options of every CSV/TSV read (here and ``iclcls label``): the columns in
    ``text`` as the text written, quoted values may span lines, rows of the wrong width go to
    ``handler``. ``blank_rows``: a blank line comes back as a row of nulls (an unquoted empty
    cell is null, a quoted one ``""``) so that lines can be counted."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    read = pacsv.ReadOptions(use_threads=False, block_size=block_size, column_names=names, skip_rows=skip_rows)
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quote else False, newlines_in_values=True,
                               ignore_empty_lines=not blank_rows, invalid_row_handler=handler)
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in text}, check_utf8=False,  # (label decodes per cell)
        strings_can_be_null=blank_rows, null_values=[""], quoted_strings_can_be_null=False,
    )
    return read, parse, convert


def csv_header(path: Path | Any, delimiter: str = ",", **options: Any) -> list[str]:
    """The column names of a CSV/TSV file ([] when it holds nothing); ``options`` as :func:`csv_options`."""
    import pyarrow.csv as pacsv

    try:
        with pacsv.open_csv(path, *csv_options(delimiter, handler=lambda row: "skip", **options)) as reader:
            return list(reader.schema.names)
    except Exception as e:  # pyarrow raises ArrowInvalid for an empty file or a broken header
        if "Empty CSV file" in str(e):
            return []
        raise


_BREAK = r"\r\n|\r|\n"  # one line break, as an editor (and Python's universal newlines) counts it


def _read_delimited(path: Path, sep: str, columns: Sequence[str] | None, quote: bool) -> Table:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    with open(path, "rb") as f:  # blank lines before the header: skipped (pyarrow would take one for the header)
        head = f.read(1 << 16).removeprefix(codecs.BOM_UTF8)
    lead = head[: len(head) - len(head.lstrip(b"\r\n"))]
    skip = lead.count(b"\n") + lead.count(b"\r") - lead.count(b"\r\n")
    # one line without a line end: pyarrow finds no header there, so it gets one
    src = path if re.search(rb"[\r\n]", head) else pa.py_buffer(path.read_bytes() + b"\n")
    bad: list[Any] = []  # rows of the wrong width, skipped by pyarrow: the first is the error
    opts = dict(quote=quote, skip_rows=skip, block_size=min(max(path.stat().st_size + 1, 1 << 20), 1 << 30))
    try:
        header = list(columns) if columns is not None else csv_header(src, sep, **opts)
        if not header:
            raise DataError("file has no header row", path=path)
        if columns is None and (dup := next((c for c in header if header.count(c) > 1), None)) is not None:
            raise DataError(f"the header repeats column {dup!r}", path=path, location=f"line {skip + 1}")
        names = [f"f{j}" for j in range(len(header))] if columns is not None else None
        table = pacsv.read_csv(src, *csv_options(sep, text=names or header, handler=lambda r: bad.append(r) or "skip",
                                                 names=names, blank_rows=True, **opts))
    except pa.ArrowException as e:
        raise DataError(f"cannot parse: {e}", path=path) from None
    # each record's first line: after the header, 1 + the line breaks inside the records before it
    first = skip + 1 + (0 if columns is not None else 1 + sum(len(re.findall(_BREAK, h)) for h in header))
    spans = 1 + sum(pc.count_substring_regex(c.fill_null(""), _BREAK).to_numpy() for c in table.columns)
    if bad:
        r, at = bad[0], bad[0].number - skip - 1 - (columns is None)  # records before it
        raise DataError(f"has {r.actual_columns} fields, expected {len(header)} ({', '.join(header)})", path=path,
                        location=f"line {first + int(spans[:at].sum())}" if (r.number or 0) > 0 else None)
    keep = ~np.logical_and.reduce([c.is_null().to_numpy(zero_copy_only=False) for c in table.columns])
    data = [c.filter(pa.array(keep)).fill_null("").to_pylist() for c in table.columns]
    return Table(path, dict(zip(header, data)), (first + np.cumsum(spans) - spans)[keep].tolist())


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
