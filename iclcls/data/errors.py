"""Data errors that say where the problem is: file, line (or row) and field.

A user fixing a data file needs the place, not a stack trace, so every loader raises
``DataError`` with ``path``, ``location`` and ``field`` filled in where known.
"""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad or missing input data; the message names the file, the line/row and the field."""

    def __init__(
        self,
        problem: str,
        *,
        path: str | Path | None = None,
        location: str | None = None,
        field: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = str(path) if path is not None else None
        self.location = location
        self.field = field
        where = [p for p in (self.path, location, f"field {field!r}" if field else None) if p]
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)


class DataWarning(UserWarning):
    """Rows were skipped on request (``on_empty="skip"`` ...); the message gives the count."""


def check_utf8(path: str | Path) -> None:
    """Raise ``DataError`` naming the first line that is not valid UTF-8.

    Checked line by line in binary: a newline byte never occurs inside a UTF-8 multi-byte
    sequence, so the physical line number is exact.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1}); "
                    "save the file as UTF-8",
                    path=path,
                    location=f"line {lineno}",
                ) from None


def require_file(path: str | Path, *, what: str = "data file") -> Path:
    """The path as ``Path`` if it is an existing file, else a ``DataError`` saying so."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found", path=p)
    if not p.is_file():
        raise DataError(f"{what} is not a file", path=p)
    return p
