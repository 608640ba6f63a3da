"""Text embeddings from any sentence-transformers model (Hub name or local folder).

The model loads on first use, so building an embedder (or reading a fully cached
experiment through :class:`~iclcls.embed.cache.CachedEmbedder`) never loads torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROGRESS_MIN_TEXTS = 2_000  # show_progress=None: a bar only for inputs larger than this
_ST_PREFIX = "sentence-transformers/"


def model_identity(model_name_or_path: str | Path) -> str:
    """A stable name for cache keys: ``st:<hub id>`` or ``st:<folder>-<hash of resolved path>``."""
    p = Path(model_name_or_path).expanduser()
    if p.is_dir():
        resolved = p.resolve()
        digest = hashlib.sha256(str(resolved).encode("utf-8")).hexdigest()[:8]
        return f"st:{resolved.name}-{digest}"
    name = str(model_name_or_path)
    if name.startswith(_ST_PREFIX):  # ST resolves "all-MiniLM-L6-v2" to the same model
        name = name[len(_ST_PREFIX) :]
    return f"st:{name}"


def check_texts(texts: Sequence[str]) -> list[str]:
    """Reject non-string inputs (None, NaN from a CSV reader) with the offending position."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__} ({t!r}), not str")
    return out



def load_sentence_transformer(path: str, device: str | None, what: str = "sentence-transformers model") -> Any:
    """Load a ``SentenceTransformer``; a failure says that offline a local folder is needed."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(path, device=device)
    except OSError as e:
        raise OSError(f"cannot load {what} {path!r} (a Hub name needs network access; pass a local folder offline): {e}") from e

class SentenceTransformerEmbedder:
    """Embedder over ``sentence_transformers.SentenceTransformer``: unit-norm float32 rows."""

    def __init__(
        self,
        model_name_or_path: str | Path,
        *,
        device: str | None = None,
        batch_size: int = 64,
        normalize: bool = True,
        name: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name_or_path = str(model_name_or_path)
        self.device = device
        self.batch_size = batch_size
        self.normalize = normalize
        base = name or model_identity(model_name_or_path)
        self.name = base if normalize else f"{base}:raw"  # raw vectors must not share a cache key
        self._model: Any = None

    @property
    def model(self) -> Any:
        """The loaded ``SentenceTransformer`` (loaded on first access)."""
        if self._model is None:
            self._model = load_sentence_transformer(self.model_name_or_path, self.device)
        return self._model

    @property
    def dim(self) -> int:
        m = self.model
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get())

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """Return an (n, dim) float32 array; rows are unit-norm when ``normalize`` is set."""
        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if show_progress is None:
            show_progress = len(texts) > PROGRESS_MIN_TEXTS
        vecs = self.model.encode(
            texts,
            batch_size=batch_size or self.batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=self.normalize,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def __repr__(self) -> str:
        return f"SentenceTransformerEmbedder({self.name!r}, device={self.device!r})"
