"""The part every exported-model embedder shares: resolve the export, tokenise, batch, normalise.

A subclass says how to load its runtime (``_load``) and run one padded batch (``_run``).
Loading is lazy: building the embedder (or reading a fully cached experiment) exports and
imports nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from iclcls.embed.sentence_transformers import check_texts


class ExportedEmbedder:
    """Embedder over a model exported into iclcls's cache (see :mod:`iclcls.embed.export`)."""

    backend = ""  # set by subclasses: a key of export.MODEL_FILES

    def __init__(self, model_folder: str | Path, *, name: str, batch_size: int = 64, threads: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_folder = Path(model_folder)
        self.name = name
        self.batch_size = batch_size
        self.threads = threads
        self._folder: Path | None = None
        self._manifest: dict[str, Any] = {}
        self._runtime: Any = None
        self._batcher: Any = None

    def export_folder(self) -> Path:
        """The export's folder in the cache, exported first on first use (offline)."""
        if self._folder is None:
            from iclcls.embed.export import ensure_export, read_manifest
            from iclcls.embed.source import describe

            self._folder = ensure_export(describe(self.model_folder), self.backend)
            self._manifest = read_manifest(self._folder) or {}
        return self._folder

    def load(self) -> None:
        """Export if needed, then load the tokenizer and the runtime (idempotent)."""
        if self._runtime is not None:
            return
        from iclcls.embed.tokens import TokenBatcher

        folder = self.export_folder()
        self._batcher = TokenBatcher(folder / "tokenizer.json", max_length=int(self._manifest["max_seq_length"]))
        self._runtime = self._load(folder / self._manifest["model_file"])

    @property
    def dim(self) -> int:
        self.export_folder()
        return int(self._manifest["dim"])

    def encode(
        self, texts: Sequence[str], *, batch_size: int | None = None, show_progress: bool | None = None
    ) -> np.ndarray:
        """Return an (n, dim) float32 array of unit-norm rows (progress is never shown)."""
        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        self.load()
        out = self._embed(texts, batch_size)
        norms = np.linalg.norm(out, axis=1, keepdims=True)  # the graph normalises; int8 drifts slightly
        return np.ascontiguousarray(out / np.maximum(norms, 1e-12), dtype=np.float32)

    def _embed(self, texts: list[str], batch_size: int | None) -> np.ndarray:
        """Raw vectors of ``texts`` (the runtime is loaded), in order."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for idx, ids, mask in self._batcher.batches(texts, batch_size=batch_size or self.batch_size):
            out[idx] = self._run(ids, mask)
        return out

    def _load(self, model_file: Path) -> Any:
        raise NotImplementedError

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
