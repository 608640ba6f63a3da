"""Streaming readers for `iclcls label`: JSONL, CSV, TSV, Parquet and .txt, a chunk at a time.

Nothing here holds the whole input: JSONL and .txt are read line by line (so one malformed
line or undecodable byte becomes one error record, not a failed file), CSV/TSV through
``pyarrow.csv.open_csv`` with the options of ``data.tables`` (every column as text; bad rows
reported by pyarrow's invalid-row handler), Parquet through ``ParquetFile.iter_batches``.
Every record carries its row number (0-based position among the input's non-blank rows), the
id when there is no id column.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from iclcls.data.tables import csv_header, csv_options
from iclcls.errors import DataError
from iclcls.types import check_text

Format = Literal["jsonl", "csv", "tsv", "parquet", "txt"]

SUFFIXES: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",  # accepted when it holds one object per line (checked on open)
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "txt",
}


class LabelInputError(DataError):
    """The input cannot be labelled as asked; the message names the file and what is wrong."""


@dataclass(slots=True)
class Record:
    """One input row: its id (None while unknown), its text, or why it cannot be labelled."""

    row: int | None
    id: Any
    text: str | None
    error: str | None = None


def detect_format(path: Path) -> Format:
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise LabelInputError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
            f"use one of {', '.join(sorted(SUFFIXES))}"
        )
    return fmt


def unknown_id(row: int | None) -> str:
    """The id written for a row whose id column could not be read (a malformed line)."""
    return f"row {row}" if row is not None else "row ?"


def _check_id(value: Any, id_field: str) -> str | None:
    if value is None:
        return f"no value in the id field {id_field!r}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return f"id field {id_field!r} holds {type(value).__name__} {value!r}; ids must be strings or integers"
    if isinstance(value, str):
        try:
            check_text(value, f"id field {id_field!r}")
        except ValueError as e:
            return str(e)
    return None


def make_record(
    text: Any, id_value: Any, *, row: int | None, id_field: str | None, text_field: str, where: str = ""
) -> Record:
    """A record from one row's text and id cells, with the problem (if any) as its error."""
    prefix = f"{where}: " if where else ""
    rid: Any = row
    if id_field is not None:
        problem = _check_id(id_value, id_field)
        if problem:
            return Record(row, unknown_id(row), None, prefix + problem)
        rid = id_value
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            bad = bytes(text)[e.start]
            return Record(row, rid, None, f"{prefix}text is not UTF-8 (byte 0x{bad:02x} at offset {e.start})")
    if text is None:
        return Record(row, rid, None, f"{prefix}no value in the text field {text_field!r}")
    if not isinstance(text, str):
        return Record(row, rid, None, f"{prefix}text field {text_field!r} holds {type(text).__name__}, not text")
    if not text.strip():
        return Record(row, rid, None, f"{prefix}empty text")
    try:  # a lone surrogate or NUL fails this row here, not the batch it would be predicted with
        check_text(text, where or (f"row {row}" if row is not None else f"text field {text_field!r}"))
    except ValueError as e:
        return Record(row, rid, None, str(e))
    return Record(row, rid, text)


def parse_line(
    raw: bytes | str, *, fmt: Format, row: int | None, text_field: str, id_field: str | None, where: str = ""
) -> Record:
    """One JSONL or .txt line -> a record (bad bytes, bad JSON and missing fields become errors)."""
    prefix = f"{where}: " if where else ""
    fallback_id = unknown_id(row) if id_field is not None else row
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = Record(row, fallback_id, None, f"{prefix}not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})")
            if fmt == "jsonl" and id_field is not None:  # keep the row's id when it is readable
                rec = parse_line(raw.decode("utf-8", "surrogateescape"), fmt=fmt, row=row,
                                 text_field=text_field, id_field=id_field)
                if isinstance(rec.id, (str, int)) and not _has_surrogates(rec.id) and rec.id != fallback_id:
                    bad.id = rec.id
            return bad
    if fmt == "txt":
        return make_record(raw.strip("\r\n"), row, row=row, id_field=None, text_field=text_field, where=where)
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return Record(row, fallback_id, None, f"{prefix}malformed JSON: {e.msg} (column {e.colno})")
    if not isinstance(obj, dict):
        return Record(row, fallback_id, None, f"{prefix}not a JSON object but {type(obj).__name__}")
    if text_field not in obj:
        return Record(row, fallback_id if id_field is None or id_field not in obj else obj[id_field], None,
                      f"{prefix}no field {text_field!r} (fields: {', '.join(obj) or 'none'})")
    if id_field is not None and id_field not in obj:
        return Record(row, fallback_id, None, f"{prefix}no id field {id_field!r} (fields: {', '.join(obj)})")
    return make_record(obj[text_field], obj.get(id_field) if id_field else None,
                       row=row, id_field=id_field, text_field=text_field, where=where)


def _has_surrogates(value: Any) -> bool:
    return isinstance(value, str) and any("\udc80" <= c <= "\udcff" for c in value)


def records_from_columns(
    texts: Any, ids: Any, *, rows: Sequence[int | None], text_field: str, id_field: str | None, source: str = ""
) -> list[Record]:
    """Records from an Arrow text column (and id column): text decoded per cell, so one bad
    cell is one error record (its error names ``source``, the file, and the row)."""
    import pyarrow as pa

    if pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type) or pa.types.is_binary(texts.type):
        text_values = texts.cast(pa.large_binary()).to_pylist()
    else:
        text_values = texts.to_pylist()
    id_values = ids.to_pylist() if ids is not None else [None] * len(text_values)
    return [
        make_record(t, i, row=r, id_field=id_field, text_field=text_field,
                    where=f"{source}, row {r}" if source and r is not None else "")
        for t, i, r in zip(text_values, id_values, rows)
    ]


# -- inspecting a file before any work ----------------------------------------------------------


@dataclass
class InputInfo:
    """What a quick look found: the columns, the row count (for the progress bar), emptiness."""

    columns: list[str]
    rows: int | None


def csv_columns(path: Path, fmt: Format) -> list[str]:
    try:
        return csv_header(path, "\t" if fmt == "tsv" else ",")
    except Exception as e:  # pyarrow raises ArrowInvalid for a broken header
        raise LabelInputError(f"{path}: cannot read the CSV header: {e}") from None


def _require_columns(path: Path, columns: Sequence[str], text_field: str, id_field: str | None, where: str = "") -> None:
    for field, flag in ((text_field, "--text-field"), (id_field, "--id-field")):
        if field is not None and field not in columns:
            raise LabelInputError(
                f"{path}{where}: no column {field!r}; the columns are: {', '.join(columns) or 'none'} "
                f"(choose one with {flag})"
            )


def inspect_input(path: Path, fmt: Format, *, text_field: str, id_field: str | None) -> InputInfo:
    """Check the text/id columns exist and count rows (cheaply) before any work.

    JSONL: the first object that parses must have the fields (later rows without them
    become error rows); a JSON array is refused (it cannot be streamed).
    """
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise LabelInputError(f"{path}: not a readable Parquet file: {e}") from None
        cols = list(pf.schema_arrow.names)
        _require_columns(path, cols, text_field, id_field)
        return InputInfo(cols, pf.metadata.num_rows)
    if fmt in ("csv", "tsv"):
        if path.stat().st_size == 0:
            return InputInfo([], 0)
        cols = csv_columns(path, fmt)
        if not cols:
            return InputInfo([], 0)
        _require_columns(path, cols, text_field, id_field)
        return InputInfo(cols, max(_count_lines(path) - 1, 0))
    rows, first = 0, None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            rows += 1
            if fmt == "jsonl" and first is None:
                if raw.lstrip().startswith(b"["):
                    raise LabelInputError(
                        f"{path}: a JSON array cannot be streamed; write one JSON object per line (JSONL)"
                    )
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue  # a bad first line is that row's error; look at the next
                if isinstance(obj, dict):
                    first = obj
                    _require_columns(path, list(obj), text_field, id_field, where=f", line {lineno}")
    return InputInfo(list(first or ()) if fmt == "jsonl" else [text_field], rows)


def _count_lines(path: Path) -> int:
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def check_unique_ids(path: Path, fmt: Format, *, text_field: str, id_field: str) -> None:
    """Refuse duplicate ids up front, naming the first repeated one and both rows (resume
    keys on ids, so a repeated id would be labelled once)."""
    seen: dict[Any, int] = {}
    for row, value in _iter_ids(path, fmt, text_field=text_field, id_field=id_field):
        if value is None:
            continue
        first = seen.setdefault(value, row)
        if first != row:
            raise LabelInputError(
                f"{path}: duplicate id {value!r} (rows {first} and {row}; row numbers count from 0); "
                f"ids in --id-field {id_field!r} must be unique"
            )


def _iter_ids(path: Path, fmt: Format, *, text_field: str, id_field: str) -> Iterator[tuple[int, Any]]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=[id_field]):
            for v in batch.column(0).to_pylist():
                yield row, v
                row += 1
        return
    if fmt in ("csv", "tsv"):
        for rec in iter_records(path, fmt, text_field=text_field, id_field=id_field, columns=[id_field]):
            yield rec.row, None if rec.error else rec.id
        return
    row = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8", "surrogateescape"))
                value = obj.get(id_field) if isinstance(obj, dict) else None
            except json.JSONDecodeError:
                value = None
            ok = isinstance(value, (str, int)) and not isinstance(value, bool) and not _has_surrogates(value)
            yield row, value if ok else None
            row += 1


# -- streaming ------------------------------------------------------------------------------------


def iter_records(
    path: Path, fmt: Format, *, text_field: str, id_field: str | None, columns: Sequence[str] | None = None
) -> Iterator[Record]:
    """Every row of ``path`` as a Record, in order, reading a block at a time."""
    if fmt in ("jsonl", "txt"):
        row = 0
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                yield parse_line(raw, fmt=fmt, row=row, text_field=text_field, id_field=id_field,
                                 where=f"{path.name}, line {lineno}")
                row += 1
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        cols = [text_field] + ([id_field] if id_field and id_field != text_field else [])
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=cols):
            n = batch.num_rows
            ids = batch.column(batch.schema.get_field_index(id_field)) if id_field else None
            yield from records_from_columns(
                batch.column(batch.schema.get_field_index(text_field)), ids,
                rows=range(row, row + n), text_field=text_field, id_field=id_field, source=path.name,
            )
            row += n
    else:
        yield from _iter_csv(path, fmt, text_field=text_field, id_field=id_field, only=columns)


def _iter_csv(path: Path, fmt: Format, *, text_field: str, id_field: str | None, only: Sequence[str] | None) -> Iterator[Record]:
    import pyarrow.csv as pacsv

    names = csv_columns(path, fmt)
    if not names:
        return
    bad: dict[int, str] = {}  # data-row number -> why pyarrow skipped it

    def on_invalid(r: Any) -> str:
        # r.number counts rows from 1 with the header as row 1; -1 when unknown
        data_row = r.number - 2 if r.number is not None and r.number > 0 else -1
        bad[data_row] = f"row {data_row} (file row {r.number}): expected {r.expected_columns} columns, found {r.actual_columns}"
        return "skip"

    wanted = list(only) if only else [c for c in (text_field, id_field) if c]
    read, parse, convert = csv_options("\t" if fmt == "tsv" else ",", text=names, handler=on_invalid)
    convert.include_columns = list(dict.fromkeys(wanted))
    reader = pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    row = 0

    def take_bad() -> list[Record]:  # the skipped rows numbered before the next good one
        nonlocal row
        out = []
        while row in bad:
            out.append(Record(row, unknown_id(row) if id_field else row, None, bad.pop(row)))
            row += 1
        return out

    try:
        for batch in reader:
            texts = batch.column(batch.schema.get_field_index(text_field)) if text_field in batch.schema.names else None
            ids = batch.column(batch.schema.get_field_index(id_field)) if id_field else None
            before: list[list[Record]] = []  # bad rows to emit before each good row
            rows: list[int] = []
            for _ in range(batch.num_rows):
                before.append(take_bad())
                rows.append(row)
                row += 1
            if texts is None:  # an ids-only scan
                good = [Record(r, v, None) for r, v in zip(rows, ids.to_pylist())]
            else:
                good = records_from_columns(texts, ids, rows=rows, text_field=text_field, id_field=id_field,
                                            source=path.name)
            for skipped, rec in zip(before, good):
                yield from skipped
                yield rec
    finally:
        reader.close()
    yield from take_bad()
    for r in sorted(bad):  # rows pyarrow could not number
        yield Record(row, unknown_id(row) if id_field else row, None, bad[r])
        row += 1


def chunked(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
