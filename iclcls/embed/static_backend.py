"""A static embedding (model2vec) distilled locally from a sentence-transformers model: ``<model>@static``.

One vector per vocabulary token, made by running the transformer once over each token
(offline, about a minute for MiniLM on 2 cores), reduced by PCA to 256 dimensions and
SIF-weighted; a text is the mean of its tokens' vectors. Thousands of times cheaper than a
transformer per text, at a measured cost in accuracy: for very large corpora.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from iclcls.embed.exported import ExportedEmbedder


class StaticEmbedder(ExportedEmbedder):
    """model2vec ``StaticModel`` loaded from the distilled export in iclcls's cache."""

    backend = "static"

    def load(self) -> None:
        if self._runtime is not None:
            return
        from model2vec import StaticModel

        folder = self.export_folder()
        self._runtime = StaticModel.from_pretrained(str(folder), normalize=True, force_download=False)

    @property
    def dim(self) -> int:
        self.load()
        return int(self._runtime.dim)

    def _embed(self, texts: list[str], batch_size: int | None) -> np.ndarray:
        return np.asarray(
            self._runtime.encode(texts, show_progress_bar=False, use_multiprocessing=False, batch_size=max(batch_size or 1024, 1)),
            dtype=np.float32,
        )

    def _load(self, model_file: Path) -> Any:  # pragma: no cover - load() is overridden
        raise NotImplementedError
