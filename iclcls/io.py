"""Atomic file writes and safe (pickle-free) state files.

Every file iclcls writes goes to a temporary file in the same folder and is renamed
into place, so a crash never leaves half a file behind.

JSON is written strict (RFC 8259: no bare ``NaN``/``Infinity``, which strict parsers and
other languages refuse). A non-finite float is written as ``{"$float": "Infinity"}``
(``"-Infinity"``, ``"NaN"``) and :func:`read_json` maps it back, so values such as a
conformal score of infinity survive a save and load; older files with bare ``Infinity``
still load. Where a reader outside iclcls matters more than the round trip (label rows),
:func:`strict_json` writes them as ``null`` instead.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np


def fsync_file(path: str | Path | int | IO[Any]) -> None:
    """Flush a written file's data to the disk (a rename alone may land before the data): a
    file named by its path, an open file (its buffer flushed first) or a file descriptor."""
    if not isinstance(path, (str, os.PathLike, int)):  # an open file
        path.flush()
        path = path.fileno()
    if isinstance(path, int):
        os.fsync(path)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to the disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under ``root`` (before renaming a finished folder into place)."""
    root = Path(root)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` onto ``dst``: its files and folders are fsynced first.

    An existing ``dst`` is swapped with ``src`` in one atomic ``renameat2(RENAME_EXCHANGE)``
    (Linux), so a crash at any instant leaves either the old or the new state under ``dst``.
    Elsewhere the old folder is moved aside, and moved back if the second rename fails.
    """
    src, dst = Path(src), Path(dst)
    fsync_tree(src)
    if dst.exists() and _exchange(src, dst):
        fsync_dir(dst.parent)
        shutil.rmtree(src, ignore_errors=True)  # now the old state
        return
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)  # the previous state, unchanged
        raise
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # this filesystem cannot: fall back
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def staged_dir(target: Path, *, done: Callable[[Path], bool]) -> Iterator[Path]:
    """A fresh folder beside ``target`` to build a cache entry in (an export, a converted model).
    When the block succeeds it is fsynced and renamed onto ``target``, unless another process
    published first (``done(target)``: then its copy is kept); the staging folder never stays."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; a cache entry is readable like any model
    try:
        yield staging
        fsync_tree(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not done(target):
                raise
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; if the block succeeds, fsync it, rename it onto
    ``path`` and fsync the folder. On any error ``path`` keeps its previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


FLOAT_TAG = "$float"
_NONFINITE_NAMES = {math.inf: "Infinity", -math.inf: "-Infinity"}
_NONFINITE_VALUES = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def finite_json(obj: Any, *, nonfinite: Literal["tag", "null"] = "tag") -> Any:
    """``obj`` with every non-finite float (also inside numpy arrays) replaced: by a
    ``{"$float": name}`` tag that :func:`read_json` maps back, or by None."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return None if nonfinite == "null" else {FLOAT_TAG: _NONFINITE_NAMES.get(obj, "NaN")}
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {k: finite_json(v, nonfinite=nonfinite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v, nonfinite=nonfinite) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return finite_json(obj.tolist(), nonfinite=nonfinite)
    return obj  # left to json's default= hook


def strict_json(obj: Any, *, nonfinite: Literal["tag", "null"] = "tag", **kwargs: Any) -> str:
    """``json.dumps`` that never writes ``NaN``/``Infinity`` (see :func:`finite_json`)."""
    return json.dumps(finite_json(obj, nonfinite=nonfinite), allow_nan=False, default=_default, **kwargs)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, strict_json(obj, indent=2, ensure_ascii=False))


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, np.asarray(array), allow_pickle=False)


def load_npy(path: str | Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_hook=_untag_float)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def _untag_float(d: dict[str, Any]) -> Any:
    """``{"$float": "Infinity"}`` (as :func:`finite_json` writes it) -> ``inf``; other objects as they are."""
    if len(d) == 1 and isinstance(d.get(FLOAT_TAG), str) and d[FLOAT_TAG] in _NONFINITE_VALUES:
        return _NONFINITE_VALUES[d[FLOAT_TAG]]
    return d


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
