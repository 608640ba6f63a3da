"""Named benchmarks: the ``Benchmark`` record, where the data folder is, and the name registry.

The data is never copied into the repository; it is read from a data folder found by
``resolve_data_dir``. Each benchmark's reader lives in its own module and registers
itself here under its name(s).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iclcls.errors import DataError, UnknownNameError
from iclcls.types import Example, LabelSpace

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's splits and label space.

    ``priors`` maps a label to its frequency where the benchmark ships one (ESCO);
    ``info`` records what loading did to the source (rows dropped, labels remapped).
    """

    name: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: LabelSpace
    multi_label: bool = False
    priors: dict[str, float] | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[Example]:
        """A split by name (``"val"``/``"dev"`` mean validation)."""
        key = {"val": "validation", "dev": "validation"}.get(name, name)
        if key not in SPLITS:
            raise UnknownNameError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return getattr(self, key)

    def describe(self) -> dict[str, Any]:
        """Counts per split, label count, labels per example (multi-label), and loading notes."""
        d: dict[str, Any] = {"name": self.name}
        for s in SPLITS:
            d[s] = len(getattr(self, s))
        d["labels"] = len(self.labels)
        d["multi_label"] = self.multi_label
        if self.multi_label:
            d["labels_per_example"] = {
                s: round(sum(len(e.labels) for e in getattr(self, s)) / len(getattr(self, s)), 4)
                for s in SPLITS
                if getattr(self, s)
            }
        if self.priors is not None:
            d["priors"] = len(self.priors)
        d.update(self.info)
        return d


Loader = Callable[[Path], Benchmark]
_LOADERS: dict[str, tuple[Loader, bool]] = {}


def register(name: str, *, needs_data: bool = True) -> Callable[[Loader], Loader]:
    """Register ``loader(data_dir) -> Benchmark`` under ``name``."""

    def deco(fn: Loader) -> Loader:
        if name in _LOADERS:
            raise ValueError(f"benchmark {name!r} is registered twice")
        _LOADERS[name] = (fn, needs_data)
        return fn

    return deco


def benchmark_names() -> tuple[str, ...]:
    return tuple(_LOADERS)


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The benchmark data folder.

    In order: ``data_dir``; ``$ICLCLS_DATA``; ``../shared/data`` from the current
    directory; ``../shared/data`` beside the repository that holds this package. A folder
    named explicitly (argument or environment) must exist: no silent fallback.
    """
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        if not p.is_dir():
            raise DataError("benchmark data directory not found (given as data_dir)", path=p)
        return p
    env = os.environ.get("ICLCLS_DATA")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise DataError("benchmark data directory not found (from $ICLCLS_DATA)", path=p)
        return p
    import iclcls

    tried = [Path.cwd() / ".." / "shared" / "data", Path(iclcls.__file__).resolve().parents[1] / ".." / "shared" / "data"]
    for cand in tried:
        if cand.is_dir():
            return cand.resolve()
    raise DataError(
        "no benchmark data directory: pass data_dir= (--data-dir), set $ICLCLS_DATA, or put the data at "
        f"../shared/data (looked in: {', '.join(str(c.resolve()) for c in tried)})"
    )


def load_benchmark(name: str, *, data_dir: str | Path | None = None) -> Benchmark:
    """Load benchmark ``name`` (see ``BENCHMARKS``) from the data folder."""
    try:
        loader, needs_data = _LOADERS[name]
    except KeyError:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(_LOADERS)}") from None
    root = resolve_data_dir(data_dir) if needs_data else Path()
    return loader(root)


def source(root: Path, *parts: str) -> Path:
    """A file of the data folder, with an error that says which benchmark folder is missing."""
    p = root.joinpath(*parts)
    if not p.exists():
        folder = root / parts[0]
        hint = "" if folder.is_dir() else f" (the folder {parts[0]!r} is missing from the data directory)"
        raise DataError(f"benchmark file not found{hint}", path=p)
    return p
