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
