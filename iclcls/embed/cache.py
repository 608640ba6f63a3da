"""An on-disk embedding cache, so re-running an experiment does not re-embed.

Rows live in a ``diskcache`` (SQLite) folder keyed by ``sha256(embedder.name, text)``;
values are raw little-endian float32 bytes. SQLite makes the folder safe for several
processes at once, and the :class:`_BytesOnlyDisk` below refuses to store or load
anything but bytes, so reading a cache never unpickles.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import diskcache
import numpy as np

from iclcls.embed.base import Embedder
from iclcls.embed.sentence_transformers import check_texts
from iclcls.util import cache_dir

_DTYPE = np.dtype("<f4")
DEFAULT_SIZE_LIMIT = 8 * 2**30  # 8 GiB, about 5.5 million 384-d rows


class _BytesOnlyDisk(diskcache.Disk):
    """A diskcache Disk that stores and returns only ``bytes`` values: never pickle."""

    def store(self, value, read, key=diskcache.core.UNKNOWN):  # type: ignore[override]
        if type(value) is not bytes:
            raise TypeError(f"embedding cache stores bytes only, got {type(value).__name__}")
        return super().store(value, read, key=key)

    def fetch(self, mode, filename, value, read):  # type: ignore[override]
        if mode == diskcache.core.MODE_PICKLE:
            raise ValueError("embedding cache entry is pickled; refusing to load it")
        return super().fetch(mode, filename, value, read)


def default_cache_dir() -> Path:
    return cache_dir() / "embeddings"


def cache_key(name: str, text: str) -> str:
    """The key of one row: a hash of the embedder's identity and the text."""
    h = hashlib.sha256()
    h.update(name.encode("utf-8"))
    h.update(b"\0")
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


class CachedEmbedder:
    """Wraps an Embedder; only texts missing from the cache (deduplicated) reach it.

    ``name`` and ``dim`` are the wrapped embedder's, so the wrapper is itself an Embedder.
    ``hits`` and ``misses`` count rows served from disk and rows computed.
    """

    def __init__(
        self,
        embedder: Embedder,
        *,
        cache_dir: str | Path | None = None,
        size_limit: int = DEFAULT_SIZE_LIMIT,
    ) -> None:
        self.embedder = embedder
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._cache = diskcache.Cache(
            str(self.cache_dir), disk=_BytesOnlyDisk, size_limit=size_limit
        )
        self.hits = 0
        self.misses = 0

    @property
    def name(self) -> str:
        return self.embedder.name

    @property
    def dim(self) -> int:
        return self.embedder.dim

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """Return (n, dim) float32 rows in input order, reading what the cache holds.

        ``batch_size`` None keeps the wrapped embedder's own default.
        """
        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        name = self.name
        keys = [cache_key(name, t) for t in texts]
        found: dict[str, bytes] = {}
        for key in dict.fromkeys(keys):
            value = self._cache.get(key)
            if isinstance(value, bytes):
                found[key] = value

        # Rows of an unexpected length (a corrupt or foreign entry) count as misses.
        sizes = {len(v) for v in found.values()}
        all_found = len(found) == len(set(keys))
        dim = (next(iter(sizes)) // _DTYPE.itemsize) if all_found and len(sizes) == 1 else self.dim
        found = {k: v for k, v in found.items() if len(v) == dim * _DTYPE.itemsize}

        out = np.empty((len(texts), dim), dtype=np.float32)
        missing: dict[str, str] = {}  # key -> text, first occurrence order
        for i, key in enumerate(keys):
            value = found.get(key)
            if value is None:
                missing.setdefault(key, texts[i])
            else:
                out[i] = np.frombuffer(value, dtype=_DTYPE)
        self.hits += len(texts) - sum(1 for k in keys if k in missing)

        if missing:
            options: dict = {"show_progress": show_progress}
            if batch_size is not None:
                options["batch_size"] = batch_size
            vecs = self.embedder.encode(list(missing.values()), **options)
            vecs = np.asarray(vecs, dtype=np.float32)
            if vecs.shape != (len(missing), dim):
                raise ValueError(
                    f"embedder {name!r} returned shape {vecs.shape}, expected {(len(missing), dim)}"
                )
            computed = dict(zip(missing, vecs, strict=True))
            with self._cache.transact():
                for key, vec in computed.items():
                    self._cache.set(key, vec.astype(_DTYPE).tobytes())
            for i, key in enumerate(keys):
                if key in computed:
                    out[i] = computed[key]
            self.misses += len(missing)
        return out

    def stored_rows(self) -> int:
        """Rows stored in the cache folder (all embedders sharing it).

        Not ``__len__``: an empty cache must not make the embedder falsy.
        """
        return len(self._cache)

    def close(self) -> None:
        self._cache.close()

    def __repr__(self) -> str:
        return f"CachedEmbedder({self.embedder!r}, cache_dir={str(self.cache_dir)!r})"
