"""Image embedders beside the text ones: raw pixels (no weights) and CLIP-family models.

The pool and the classifier embed *examples*, not strings, through :func:`encode_examples`:
an embedder with an ``encode_examples`` method (the image embedders here) sees the whole
Example (text, images or both); a text embedder gets the texts. So kNN, class means and
the Gaussian continual learner work unchanged on image vectors: they only see rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from iclcls.data.images import open_image
from iclcls.types import Example

__all__ = ["PixelEmbedder", "ClipEmbedder", "encode_examples"]


def encode_examples(embedder: Any, examples: Sequence[Example]) -> np.ndarray:
    """(n, dim) unit-norm rows for Examples: the embedder's own ``encode_examples`` when it
    has one (images), else its ``encode`` of the texts. An image-only example given to a
    text embedder is an error, not an embedding of ""."""
    hook = getattr(embedder, "encode_examples", None)
    if hook is not None:
        return hook(examples)
    for i, ex in enumerate(examples):
        if ex.images and not ex.text.strip():
            raise ValueError(
                f"example {i} ({ex.id or 'no id'}) is an image without text, and the embedder "
                f"{getattr(embedder, 'name', embedder)!r} embeds text only; use an image embedder "
                "(embedder='pixels', or 'clip:<model>')"
            )
    return embedder.encode([ex.text for ex in examples])


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12), dtype=np.float32)


class PixelEmbedder:
    """An image as its resized pixels, flattened and L2-normalised: needs no weights, and is a
    fair baseline for small, aligned images (digits, icons, glyphs)."""

    def __init__(self, *, size: tuple[int, int] = (16, 16), mode: str = "L") -> None:
        if mode not in ("L", "RGB"):
            raise ValueError(f"mode must be 'L' (grey) or 'RGB', got {mode!r}")
        w, h = size
        if w < 1 or h < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.size = (int(w), int(h))
        self.mode = mode
        self.name = f"pixels:{w}x{h}:{mode}"

    @property
    def dim(self) -> int:
        return self.size[0] * self.size[1] * (3 if self.mode == "RGB" else 1)

    def encode(self, texts: Sequence[str], **_: Any) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        raise TypeError(f"the {self.name} embedder embeds images, not text (a text stage needs a text embedder)")

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        from PIL import Image

        rows = np.zeros((len(images), self.dim), dtype=np.float32)
        for i, ref in enumerate(images):
            img = open_image(ref, mode=self.mode).resize(self.size, Image.Resampling.BILINEAR)
            rows[i] = np.asarray(img, dtype=np.float32).reshape(-1)
        return _unit(rows)

    def encode_examples(self, examples: Sequence[Example]) -> np.ndarray:
        """Each example's images (their mean, if several); the text is not used."""
        out = np.zeros((len(examples), self.dim), dtype=np.float32)
        for i, ex in enumerate(examples):
            if not ex.images:
                raise ValueError(f"example {i} ({ex.id or 'no id'}) has no image; the {self.name} embedder needs one")
            out[i] = self.encode_images(ex.images).mean(axis=0)
        return _unit(out)

    def __repr__(self) -> str:
        return f"PixelEmbedder({self.name!r})"


class ClipEmbedder:
    """A CLIP-family model through sentence-transformers: texts and images in one space.

    An example with text and image is the normalised sum of both vectors (sentence-transformers
    encodes one modality per input); several images are averaged.
    """

    def __init__(self, model_name_or_path: str | Path, *, device: str | None = None, batch_size: int = 32,
                 name: str | None = None) -> None:
        from iclcls.embed.sentence_transformers import model_identity

        self.model_name_or_path = str(model_name_or_path)
        self.device = device
        self.batch_size = batch_size
        self.name = name or "clip:" + model_identity(model_name_or_path).removeprefix("st:")
        self._model: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            from iclcls.embed.sentence_transformers import load_sentence_transformer

            self._model = load_sentence_transformer(self.model_name_or_path, self.device, "CLIP model")
        return self._model

    @property
    def dim(self) -> int:
        m = self.model
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get())

    def _encode(self, items: list[Any]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(items, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        return _unit(vecs)

    def encode(self, texts: Sequence[str], **_: Any) -> np.ndarray:
        from iclcls.embed.sentence_transformers import check_texts

        return self._encode(check_texts(texts))

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        return self._encode([open_image(ref) for ref in images])

    def encode_examples(self, examples: Sequence[Example]) -> np.ndarray:
        image_refs = [(i, ref) for i, ex in enumerate(examples) for ref in ex.images]
        text_rows = [i for i, ex in enumerate(examples) if ex.text.strip()]
        img_vecs = self.encode_images([ref for _, ref in image_refs])
        txt_vecs = self.encode([examples[i].text for i in text_rows])
        dim = img_vecs.shape[1] if len(img_vecs) else txt_vecs.shape[1] if len(txt_vecs) else self.dim
        img_sum = np.zeros((len(examples), dim), dtype=np.float32)
        for (i, _), v in zip(image_refs, img_vecs):
            img_sum[i] += v
        out = _unit(img_sum)  # mean direction of an example's images (zero rows stay zero)
        for i, v in zip(text_rows, txt_vecs):
            out[i] += v
        return _unit(out)

    def __repr__(self) -> str:
        return f"ClipEmbedder({self.name!r}, device={self.device!r})"
