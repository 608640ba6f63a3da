"""Small helpers that several layers share; they import nothing from iclcls."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def common_prefix_len(*seqs: Sequence) -> int:
    """Length of the longest prefix all ``seqs`` share (token ids or strings)."""
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        tok = first[i]
        if any(s[i] != tok for s in seqs[1:]):
            return i
    return n


def query_rng(seed: int, text: str) -> np.random.Generator:
    """A generator that depends on the seed and the query only, not on batch order."""
    h = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def cache_dir() -> Path:
    """iclcls's own cache folder (converted models, embeddings, LM requests): ``$ICLCLS_CACHE`` or ~/.cache/iclcls."""
    path = Path(os.environ.get("ICLCLS_CACHE") or Path.home() / ".cache" / "iclcls")
    path.mkdir(parents=True, exist_ok=True)
    return path


class GrowingArray:
    """Rows appended in amortised O(rows added): a buffer that doubles, seen through ``view``.

    Incremental stages keep their per-class arrays in one, so adding a class copies only its
    own rows, not everything added before it.
    """

    def __init__(self, width: int | None = None, dtype: type | np.dtype = np.float32) -> None:
        shape = (0,) if width is None else (0, width)
        self._buf = np.zeros(shape, dtype=dtype)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def view(self) -> np.ndarray:
        return self._buf[: self._n]

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=self._buf.dtype)
        end = self._n + len(rows)
        if end > len(self._buf):
            grown = np.empty((max(end, 2 * len(self._buf)), *self._buf.shape[1:]), dtype=self._buf.dtype)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : end] = rows
        self._n = end

    def set(self, positions: np.ndarray, rows: np.ndarray) -> None:
        self._buf[: self._n][positions] = rows


def softmax(scores: Sequence[float | None]) -> list[float]:
    """Softmax over the finite scores; a missing or non-finite score gets 0 (all missing: all 0)."""
    vals = np.array([np.nan if s is None else s for s in scores], dtype=np.float64)
    ok = np.isfinite(vals)
    if not ok.any():
        return [0.0] * len(vals)
    e = np.where(ok, np.exp(np.where(ok, vals, 0.0) - vals[ok].max()), 0.0)
    return (e / e.sum()).tolist()
