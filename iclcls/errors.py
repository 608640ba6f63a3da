"""The iclcls errors: one base, ``IclclsError``, and a class per kind of refusal; each also
subclasses the builtin it replaced (``ValueError``, ``RuntimeError``), so ``except ValueError``
keeps working. The CLI maps the class to its exit code. Nothing here imports from iclcls.

``NotFittedError`` (also scikit-learn's) is built on first access: sklearn costs ~1 s to import.
"""

from __future__ import annotations

from pathlib import Path


class IclclsError(Exception):
    """The base of every error iclcls raises on purpose."""


class DataError(IclclsError, ValueError):
    """Bad or missing input data; the message names the file, the line/row and the field."""

    def __init__(self, problem: str, *, path: str | Path | None = None, location: str | None = None, field: str | None = None) -> None:
        self.problem = problem
        self.path = str(path) if path is not None else None
        self.location = location
        self.field = field
        where = [p for p in (self.path, location, f"field {field!r}" if field else None) if p]
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)


class DataWarning(UserWarning):
    """Rows were skipped on request (``on_empty="skip"`` ...); the message gives the count."""


class ConfigError(IclclsError, ValueError):
    """Bad options, an unknown name, a bad config file, or saved state that fails its schema."""


class UnknownNameError(ConfigError, KeyError):
    """A name no registry knows (a stage, a backend); also the ``KeyError`` it was before."""

    __str__ = Exception.__str__  # the message, not KeyError's repr of it


class UntrustedStateError(ConfigError):
    """A saved state asks for something only a trusted state may: an LM endpoint, a file
    path or a template. Load it with ``trust=True`` (``--trust-state``) if you trust who
    made it, or override the field (``lm=...``)."""


class LMBackendError(IclclsError, RuntimeError):
    """An LM backend failed or cannot do what was asked."""


class CapabilityError(LMBackendError):
    """A backend cannot do what was asked (e.g. images on a text-only model, no prompt logprobs)."""


class LMServerError(LMBackendError):
    """An LM server failed: unreachable, timed out, or answered with an error after all
    retries. The message names the URL. Commands stop on it; checkpointed work survives."""


def __getattr__(name: str) -> type:
    if name == "NotFittedError":  # built once, on first use: sklearn is slow to import
        from sklearn.exceptions import NotFittedError as SklearnNotFitted

        class NotFittedError(IclclsError, SklearnNotFitted):
            """A classifier was used (predict, save, add ...) before ``fit``."""

        NotFittedError.__qualname__ = name  # pickles by reference, like the others
        globals()[name] = NotFittedError
        return NotFittedError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
                    f"not valid UTF-8 (byte {raw[e.start : e.start + 1]!r} at column {e.start + 1}); save the file as UTF-8",
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
