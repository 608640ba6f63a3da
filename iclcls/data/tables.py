"""Small, exact CSV/TSV reading for the named benchmarks (known formats, csv module).

Keeps the first line of every record so errors and example ids point at the line a
user sees in an editor (header = line 1; a quoted field may span lines).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iclcls.data.errors import DataError, check_utf8, require_file
from iclcls.data.records import build_examples
from iclcls.types import Example, LabelSpace


@dataclass(frozen=True)
class Table:
    """Rows of a delimited file: column names, values, and each row's first line."""

    path: Path
    columns: tuple[str, ...]
    rows: list[list[str]]
    lines: list[int]

    def column(self, name: str) -> list[str]:
        if name not in self.columns:
            raise DataError(
                f"no column {name!r}; the columns are: {', '.join(map(repr, self.columns))}", path=self.path, field=name
            )
        j = self.columns.index(name)
        return [row[j] for row in self.rows]

    def locate(self, i: int) -> str:
        return f"line {self.lines[i]}"


def read_table(path: str | Path, *, delimiter: str = ",", columns: Sequence[str] | None = None) -> Table:
    """Read a delimited UTF-8 file; ``columns`` names the fields of a file without a header."""
    p = require_file(path)
    check_utf8(p)
    rows: list[list[str]] = []
    lines: list[int] = []
    header: list[str] | None = list(columns) if columns is not None else None
    with open(p, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        prev_end = 0
        for row in reader:
            start, prev_end = prev_end + 1, reader.line_num
            if not row:
                continue
            if header is None:
                header = row
                continue
            if len(row) != len(header):
                raise DataError(f"has {len(row)} fields, expected {len(header)} ({', '.join(header)})", path=p, location=f"line {start}")
            rows.append(row)
            lines.append(start)
    if header is None:
        raise DataError("file is empty", path=p)
    return Table(p, tuple(header), rows, lines)


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
    """Validated Examples from two columns; ids are ``"{id_prefix}:{line}"``.

    ``map_label(i, value)`` turns a raw cell into label(s) first (e.g. class ids to names).
    """
    labels: list[Any] = table.column(label_field)
    if map_label is not None:
        labels = [map_label(i, v) for i, v in enumerate(labels)]
    return build_examples(
        table.column(text_field),
        labels,
        [f"{id_prefix}:{n}" for n in table.lines],
        path=table.path,
        locate=table.locate,
        text_field=text_field,
        label_field=label_field,
        multi_label_sep=multi_label_sep,
        label_space=label_space,
    )
