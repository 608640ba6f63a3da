"""Images as data: reading an image reference, an image column of a table, and the
folder-per-class layout (``train/<label>/*.png``, as torchvision's ``ImageFolder``).

An image reference is a local file path, an ``http(s)://`` or ``data:`` URL, or the raw
bytes. Paths in a data file are relative to that file; a loader makes them absolute so
an Example means the same thing wherever it is used. Pillow is imported only to decode.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iclcls.data.records import OnBad, split_labels
from iclcls.errors import DataError
from iclcls.types import Example, LabelSpace

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")

__all__ = [
    "IMAGE_SUFFIXES", "build_image_examples", "digits_examples", "image_bytes", "image_cell", "load_image_folder", "open_image",
]


def image_bytes(ref: Any) -> bytes:
    """The encoded bytes of an image reference (file or ``data:`` URL; bytes as they are)."""
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    text = str(ref)
    if text.startswith("data:"):
        head, _, payload = text.partition(",")
        if ";base64" not in head:
            raise ValueError("a data: URL image must be base64-encoded")
        return base64.b64decode(payload)
    if text.startswith(("http://", "https://")):
        raise ValueError(f"cannot read {text!r} here: iclcls does not download images; save the file locally")
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    return path.read_bytes()


def open_image(ref: Any, *, mode: str = "RGB") -> Any:
    """A decoded ``PIL.Image`` in ``mode`` (a PIL image passes through, converted)."""
    import io

    from PIL import Image

    if isinstance(ref, Image.Image):
        return ref.convert(mode) if ref.mode != mode else ref
    try:
        img = Image.open(io.BytesIO(image_bytes(ref)))
        img.load()
    except (OSError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        where = f"{len(ref)} bytes" if isinstance(ref, (bytes, bytearray)) else str(ref)[:200]
        raise ValueError(f"cannot decode image ({where}): {e}") from None
    return img.convert(mode)


def image_cell(value: Any, *, base: Path) -> Any:
    """One cell of an image column as an image reference, or None when empty.

    Strings are paths relative to ``base`` (the data file's folder) or URLs; bytes are the
    image; a ``{"bytes": ..., "path": ...}`` struct (Hugging Face's Image feature in Parquet)
    gives its bytes, else its path.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if not value:
            return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) or None
    if not isinstance(value, str):
        raise TypeError(f"an image cell must be a path, URL or bytes, got {type(value).__name__}")
    if not value.strip():
        return None
    if value.startswith(("http://", "https://", "data:")):
        return value
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    return str(path.resolve())


def build_image_examples(
    texts: Sequence[Any] | None,
    images: Sequence[Any],
    labels: Sequence[Any] | None,
    ids: Sequence[Any] | None,
    *,
    path: Path,
    locate: Any,
    text_field: str | None,
    image_field: str,
    label_field: str | None,
    multi_label_sep: str | None = None,
    label_space: LabelSpace | Sequence[str] | None = None,
    on_empty: OnBad = "error",
) -> list[Example]:
    """Examples from an image column (and optional text, label, id columns); errors name the row."""
    known = None if label_space is None else (label_space if isinstance(label_space, LabelSpace) else set(label_space))
    out: list[Example] = []
    for i, cell in enumerate(images):
        try:
            image = image_cell(cell, base=path.parent)
        except (TypeError, FileNotFoundError) as e:
            raise DataError(str(e), path=path, location=locate(i), field=image_field) from None
        text = texts[i] if texts is not None else None
        if text is None or (isinstance(text, float) and math.isnan(text)):
            text = ""
        if not isinstance(text, str):
            raise DataError(f"must be text, got {type(text).__name__}", path=path, location=locate(i), field=text_field)
        labs = split_labels(labels[i], sep=multi_label_sep) if labels is not None else ()
        empty = (image is None and not text.strip()) or (labels is not None and not labs)
        if empty:
            if on_empty == "skip":
                continue
            what = "label is empty" if image is not None or text.strip() else "row has neither an image nor text"
            raise DataError(what, path=path, location=locate(i), field=label_field if image is not None else image_field)
        unknown = [lab for lab in labs if known is not None and lab not in known]
        if unknown:
            raise DataError(f"label {unknown[0]!r} is not in the label space", path=path, location=locate(i), field=label_field)
        ex_id = str(ids[i]) if ids is not None and ids[i] is not None else None
        out.append(Example(text=text, labels=labs, images=(image,) if image is not None else (), id=ex_id))
    return out


def load_image_folder(root: str | Path, *, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Example]:
    """Examples from ``root/<label>/<image>`` (torchvision's ImageFolder layout), sorted by
    label folder then file name; each id is the path relative to ``root``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError("is not a folder (expected <root>/<label>/<image files>)", path=root)
    allowed = {s.lower() for s in suffixes}
    out: list[Example] = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(label_dir.iterdir()):
            if f.is_file() and f.suffix.lower() in allowed:
                out.append(Example(labels=(label_dir.name,), images=(str(f.resolve()),), id=f"{label_dir.name}/{f.name}"))
    if not out:
        raise DataError(f"holds no images ({', '.join(sorted(allowed))}) in label subfolders", path=root)
    return out


def few_shot_split(examples: Sequence[Example], shots: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """``shots`` examples per class (seeded) as the pool, the rest as the test set."""
    import random

    rng = random.Random(seed)
    by: dict[str, list[Example]] = {}
    for e in examples:
        by.setdefault(e.label, []).append(e)
    pool = [e for lab in sorted(by) for e in rng.sample(by[lab], shots)]
    ids = {e.id for e in pool}
    return pool, [e for e in examples if e.id not in ids]


def digits_examples() -> list[Example]:
    """scikit-learn's ``load_digits`` (1,797 8x8 grey images, labels "0".."9") as PNG-bytes
    Examples with ids ``digits:<row>``: real images that ship with a package, for tests."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        buf = io.BytesIO()
        Image.fromarray(np.round(img * (255 / 16)).astype(np.uint8), mode="L").save(buf, format="PNG")
        out.append(Example(labels=(str(int(y)),), images=(buf.getvalue(),), id=f"digits:{i}"))
    return out
