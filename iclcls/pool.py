"""The state that ``fit`` builds and every stage reads: examples, their embeddings, an index.

A Pool is the demonstration pool and the retriever's memory at once. It only grows
(``extend``), so stages that keep per-example state can update incrementally.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from iclcls.embed.base import Embedder
from iclcls.embed.image import encode_examples
from iclcls.errors import ConfigError, UntrustedStateError
from iclcls.index import VectorIndex
from iclcls.io import atomic_write_bytes, atomic_write_text, load_npy, save_npy
from iclcls.types import Example, LabelSpace


class Pool:
    """Training examples, their unit-norm embeddings, the label space, and a vector index."""

    def __init__(self, embedder: Embedder, labels: LabelSpace | None = None) -> None:
        self.embedder = embedder
        self.labels = labels if labels is not None else LabelSpace()
        self.examples: list[Example] = []
        self._emb = np.zeros((0, 0), dtype=np.float32)  # capacity >= len(self): grows by doubling
        self.index: VectorIndex | None = None
        self._by_label: dict[str, list[int]] = {}
        self._sums: dict[str, np.ndarray] = {}  # per label: the sum of its examples' embeddings (float64)

    @property
    def embeddings(self) -> np.ndarray:
        """The examples' embeddings, one row each (a view of a buffer that grows by doubling, so an
        addition copies only its own rows, not the whole pool)."""
        return self._emb[: len(self.examples)]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1]) if len(self) else self.embedder.dim

    def extend(self, examples: Sequence[Example], embeddings: np.ndarray | None = None) -> np.ndarray:
        """Add examples (embedding them unless given); return their positions in the pool."""
        examples = list(examples)
        for ex in examples:
            for lab in ex.labels:
                self.labels.add(lab)
        if embeddings is None:
            embeddings = encode_examples(self.embedder, examples)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        start = len(self.examples)
        ids = np.arange(start, start + len(examples), dtype=np.int64)
        if self.index is None:
            self.index = VectorIndex(embeddings.shape[1] if len(examples) else self.embedder.dim, metric="ip")
        if len(examples):
            self.index.add(embeddings, ids)
        self._append(examples, embeddings, ids)
        return ids

    def _append(self, examples: list[Example], embeddings: np.ndarray, ids: np.ndarray) -> None:
        start = len(self.examples)
        end = start + len(examples)
        if start == 0 and len(self._emb) <= end:
            self._emb = np.array(embeddings, dtype=np.float32, copy=True).reshape(len(examples), -1)
        else:
            if end > len(self._emb):
                grown = np.empty((max(end, 2 * len(self._emb)), embeddings.shape[1]), dtype=np.float32)
                grown[:start] = self._emb[:start]
                self._emb = grown
            self._emb[start:end] = embeddings
        self.examples.extend(examples)
        for i, ex, vec in zip(ids, examples, embeddings):
            for lab in ex.labels:
                self._by_label.setdefault(lab, []).append(int(i))
                total = self._sums.get(lab)
                if total is None:
                    self._sums[lab] = vec.astype(np.float64)
                else:
                    total += vec

    def frozen(self) -> Pool:
        """A read-only view of the pool as it is now, to refit a stage off-lock while additions go
        on: examples and embeddings so far (no copy of the vectors: the buffer only grows), the
        label space, per-label positions; no index (search finds nothing)."""
        view = Pool(self.embedder, LabelSpace(list(self.labels), dict(self.labels.descriptions)))
        view.examples = list(self.examples)
        view._emb = self._emb[: len(view.examples)]
        view._by_label = {lab: list(ix) for lab, ix in self._by_label.items()}
        return view

    def indices_of(self, label: str) -> list[int]:
        return self._by_label.get(label, [])

    def label_counts(self) -> dict[str, int]:
        return {lab: len(ix) for lab, ix in self._by_label.items()}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest pool examples (cosine) for each query row; ids are pool positions (-1 = none)."""
        if self.index is None or len(self) == 0:
            n = len(queries)
            return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)
        return self.index.search(np.asarray(queries, dtype=np.float32), min(k, len(self)))

    def class_means(self, labels: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
        """Unit-norm mean embedding of each label that has examples."""
        labels = [lab for lab in (labels or self.labels) if self._by_label.get(lab)]
        if not labels:
            return [], np.zeros((0, self.dim), dtype=np.float32)
        return labels, self.means_of(labels)

    def means_of(self, labels: Sequence[str]) -> np.ndarray:
        """Unit-norm mean embeddings of ``labels`` (each must have examples), from running sums:
        O(labels x dim), whatever the pool's size."""
        means = np.stack(
            [
                self._sums[lab] / len(self._by_label[lab])
                if lab in self._sums
                else self.embeddings[self._by_label[lab]].astype(np.float64).mean(axis=0)
                for lab in labels
            ]
        )
        means /= np.linalg.norm(means, axis=1, keepdims=True) + 1e-12
        return means.astype(np.float32)

    # -- persistence: JSONL + npy + faiss; never pickle --------------------------------
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        store = _ImageStore(d)
        atomic_write_text(d / "examples.jsonl", "".join(json.dumps(_record(ex, store), ensure_ascii=False) + "\n" for ex in self.examples))
        save_npy(d / "embeddings.npy", self.embeddings)
        self.labels.save(d / "labels.json")
        if self.index is not None:
            self.index.save(d / "index.faiss")

    @classmethod
    def load(cls, directory: str | Path, embedder: Embedder, *, require_checksum: bool = True, trust: bool = False) -> Pool:
        """Read a saved pool; the faiss index must match the size and SHA-256 recorded at save
        (``require_checksum=False`` accepts an older state that recorded none). Images come
        back as bytes from the state's own ``images/`` folder, checked against their SHA-256;
        nothing outside the state's folder is read. An image named by a local path or an
        http(s) URL (a state this code did not write) is refused unless ``trust``: it would be
        read, or fetched by the LM server, when the example is shown as a demonstration."""
        d = Path(directory)
        pool = cls(embedder, LabelSpace.load(d / "labels.json"))
        path = d / "examples.jsonl"
        examples = []
        # Split on "\n" only: str.splitlines() also breaks at U+2028, U+0085, \x1c..\x1e, which
        # JSON (ensure_ascii=False) leaves unescaped inside a text.
        for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            if line.strip():
                try:
                    ex = Example.from_dict(json.loads(line), load_image=lambda r: _read_stored_image(d, r))
                    outside = next((i for i in ex.images if isinstance(i, str) and not i.startswith("data:")), None)
                    if outside is not None and not trust:
                        raise UntrustedStateError(f"names the image {outside[:200]!r} outside the state (load it with trust=True)")
                    examples.append(ex)
                except (ValueError, KeyError, TypeError, OSError) as e:
                    kind = UntrustedStateError if isinstance(e, UntrustedStateError) else ConfigError
                    raise kind(f"{path}, line {n}: bad example: {e}") from None
        embeddings = load_npy(d / "embeddings.npy")
        if len(embeddings) != len(examples):
            raise ConfigError(f"{d}: {len(examples)} examples but {len(embeddings)} embeddings")
        if (d / "index.faiss").is_file():
            # Untrusted (require_checksum): the index (flat or HNSW) is rebuilt from the embeddings, never parsed.
            pool.index = VectorIndex.load(
                d / "index.faiss", require_checksum=require_checksum, rebuild_from=embeddings if require_checksum else None
            )
            if len(pool.index) != len(examples):
                raise ConfigError(f"{d / 'index.faiss'}: holds {len(pool.index)} vectors, expected {len(examples)}")
            pool._append(examples, embeddings, np.arange(len(examples), dtype=np.int64))
        elif examples:
            pool.extend(examples, embeddings)
        return pool


# -- images in a saved state: every local image is stored once, by content -------------
IMAGES_DIR = "images"


class _ImageStore:
    """Writes image bytes as ``images/<sha256>`` files in a state folder (once per content)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._written: set[str] = set()

    def __call__(self, data: bytes) -> dict[str, str]:
        digest = hashlib.sha256(data).hexdigest()
        rel = f"{IMAGES_DIR}/{digest}"
        if digest not in self._written:
            path = self.directory / rel
            if not (path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == digest):
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, data)
            self._written.add(digest)
        return {"file": rel, "sha256": digest}


def _record(ex: Example, store: _ImageStore) -> dict:
    """An example's JSON record; local image files are read now and stored in the state, so a
    loaded state never reads a path outside its folder (URLs stay as they are)."""
    if any(isinstance(i, str) and not i.startswith(("http://", "https://", "data:")) for i in ex.images):
        from iclcls.data.images import image_bytes

        ex = replace(
            ex,
            images=tuple(
                image_bytes(i) if isinstance(i, str) and not i.startswith(("http://", "https://", "data:")) else i for i in ex.images
            ),
        )
    return ex.to_dict(store_image=store)


def _read_stored_image(directory: Path, ref: Any) -> bytes:
    rel, digest = ref.get("file"), ref.get("sha256")
    if not isinstance(rel, str) or not isinstance(digest, str):
        raise ValueError(f"an image record needs 'file' and 'sha256', got {dict(ref)!r}")
    parts = Path(rel).parts
    if Path(rel).is_absolute() or len(parts) != 2 or parts[0] != IMAGES_DIR or parts[1] in ("..", "."):
        raise ValueError(f"image file {rel!r} is not inside the state's {IMAGES_DIR}/ folder")
    path = directory / rel
    if path.is_symlink():
        raise ValueError(f"image file {rel!r} is a link (a state's images are plain files)")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"image file {rel!r} does not match its recorded SHA-256")
    return data
