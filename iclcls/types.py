"""The nouns every stage shares: Example, LabelSpace, Query, Candidates, Prediction.

Examples and predictions are frozen (they flow one way through the pipeline and are
safe to cache and share); a LabelSpace grows when classes are added, so it is a small
validated vocabulary object with an explicit ``add``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import InitVar, dataclass, field
from pathlib import Path, PurePath
from types import MappingProxyType
from typing import Any

import numpy as np

from iclcls.io import atomic_write_text


def _as_str_tuple(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    out = tuple(value)
    for v in out:
        if not isinstance(v, str):
            raise TypeError(f"{what} must be strings, got {type(v).__name__}: {v!r}")
    return out


ImageRef = Any  # a file path (str/Path), an http(s):// or data: URL, or the image's raw bytes


@dataclass(frozen=True)
class Example:
    """One input (text, images, or both) with its gold labels (empty when unknown).

    ``images`` are file paths, URLs (``http(s)://`` or ``data:``) or raw bytes;
    ``image=`` is the one-image shorthand (``Example(image="cat.png", labels="cat")``).
    ``text`` may be left out when there is an image; an example with neither is an error.
    """

    text: str = ""  # None is taken as ""
    labels: tuple[str, ...] = ()
    images: tuple[ImageRef, ...] = ()
    id: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    image: InitVar[ImageRef] = None

    def __post_init__(self, image: ImageRef = None) -> None:
        text = "" if self.text is None else self.text
        if not isinstance(text, str):
            raise TypeError(f"Example.text must be a string, got {type(text).__name__}")
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "labels", _as_str_tuple(self.labels, "Example.labels"))
        images = self.images
        if images is None:
            images = ()
        elif isinstance(images, (str, bytes, bytearray, PurePath)):
            images = (images,)
        images = tuple(images)
        if image is not None:
            images = (image, *images)
        images = tuple(_image_ref(i, n) for n, i in enumerate(images))
        object.__setattr__(self, "images", images)
        if not text.strip() and not images:
            raise ValueError("Example has neither text nor an image")
        if any(not lab.strip() for lab in self.labels):
            raise ValueError(f"Example has an empty label: {self.labels!r}")
        if self.id is not None and not isinstance(self.id, str):
            object.__setattr__(self, "id", str(self.id))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    @property
    def label(self) -> str | None:
        """The first gold label (the label, for single-label data)."""
        return self.labels[0] if self.labels else None

    def to_dict(self, *, store_image: Callable[[bytes], Any] | None = None) -> dict[str, Any]:
        """A JSON-able record. Image bytes become ``store_image(bytes)`` (a state writes them
        as files and records the file and its SHA-256), else ``{"sha256", "size"}``: a
        reference, not the image (a prediction dump does not carry megabytes of base64)."""
        d: dict[str, Any] = {"text": self.text, "labels": list(self.labels)}
        if self.id is not None:
            d["id"] = self.id
        if self.images:
            d["images"] = [
                i
                if isinstance(i, str)
                else (store_image(i) if store_image is not None else {"sha256": hashlib.sha256(i).hexdigest(), "size": len(i)})
                for i in self.images
            ]
        if self.metadata:
            d["metadata"] = dict(self.metadata)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, load_image: Callable[[Mapping[str, Any]], bytes] | None = None) -> Example:
        """Inverse of :meth:`to_dict`; ``load_image`` turns a stored image record back into bytes."""
        images = []
        for ref in d.get("images", ()) or ():
            if isinstance(ref, Mapping):
                if load_image is None:
                    raise ValueError("the record names image bytes that were not saved with it")
                ref = load_image(ref)
            images.append(ref)
        return cls(
            text=d.get("text", ""), labels=tuple(d.get("labels", ())), images=tuple(images), id=d.get("id"), metadata=d.get("metadata", {})
        )


def _image_ref(ref: Any, n: int) -> ImageRef:
    if isinstance(ref, bytearray):
        ref = bytes(ref)
    if isinstance(ref, PurePath):
        ref = str(ref)
    if isinstance(ref, str):
        if not ref.strip():
            raise ValueError(f"Example image {n} is an empty path")
        return ref
    if isinstance(ref, bytes):
        if not ref:
            raise ValueError(f"Example image {n} is empty bytes")
        return ref
    raise TypeError(f"Example image {n} must be a path, URL or bytes, got {type(ref).__name__}")


class LabelSpace:
    """Ordered unique labels with optional descriptions; ``index`` is stable under ``add``."""

    def __init__(self, labels: Iterable[str] = (), descriptions: Mapping[str, str] | None = None) -> None:
        self._labels: list[str] = []
        self._index: dict[str, int] = {}
        self.descriptions: dict[str, str] = {}
        for lab in labels:
            self.add(lab)
        for lab, desc in (descriptions or {}).items():
            if lab not in self._index:
                raise KeyError(f"description given for unknown label {lab!r}")
            self.descriptions[lab] = str(desc)

    def add(self, label: str, description: str | None = None) -> int:
        """Add ``label`` if new; return its index either way."""
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"a label must be a non-empty string, got {label!r}")
        if label not in self._index:
            self._index[label] = len(self._labels)
            self._labels.append(label)
        if description is not None:
            self.descriptions[label] = description
        return self._index[label]

    def index(self, label: str) -> int:
        try:
            return self._index[label]
        except KeyError:
            raise KeyError(f"unknown label {label!r} (label space has {len(self)} labels)") from None

    def get(self, label: str) -> int | None:
        return self._index.get(label)

    def describe(self, label: str) -> str:
        """The text that stands for a label when it is embedded or shown: name, and description if any."""
        desc = self.descriptions.get(label)
        return f"{label}: {desc}" if desc else label

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._labels))

    def __contains__(self, label: object) -> bool:
        return label in self._index

    def __getitem__(self, i: int) -> str:
        return self._labels[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSpace) and self._labels == other._labels and self.descriptions == other.descriptions

    def __repr__(self) -> str:
        head = ", ".join(repr(x) for x in self._labels[:5])
        more = f", ... (+{len(self) - 5})" if len(self) > 5 else ""
        return f"LabelSpace([{head}{more}])"

    @classmethod
    def from_examples(cls, examples: Iterable[Example]) -> LabelSpace:
        """Labels in order of first appearance."""
        space = cls()
        for ex in examples:
            for lab in ex.labels:
                space.add(lab)
        return space

    def to_json(self) -> str:
        return json.dumps({"labels": self._labels, "descriptions": self.descriptions}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> LabelSpace:
        d = json.loads(text)
        if not isinstance(d, dict) or not isinstance(d.get("labels"), list):
            raise ValueError("label space JSON must be an object with a 'labels' list")
        return cls(d["labels"], d.get("descriptions") or {})

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> LabelSpace:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


@dataclass
class Query:
    """One input on its way through the pipeline, with what earlier stages learned about it."""

    example: Example
    embedding: np.ndarray
    guesses: tuple[str, ...] = ()  # the Infer stage's free-text guesses or tags
    guess_embeddings: np.ndarray | None = None
    trace: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.example.text


@dataclass
class Candidates:
    """A shortlist: candidate labels, best first, with the retriever's scores."""

    labels: list[str]
    scores: np.ndarray

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if len(self.labels) != len(self.scores):
            raise ValueError("Candidates: labels and scores differ in length")

    def top(self, k: int) -> Candidates:
        return Candidates(self.labels[:k], self.scores[:k])


@dataclass(frozen=True)
class Prediction:
    """Ranked labels with scores, and what produced them (candidates, demonstrations, trace)."""

    labels: tuple[str, ...]
    scores: tuple[float, ...] = ()
    candidates: tuple[str, ...] = ()
    demonstrations: tuple[Example, ...] = ()
    prompt_tokens: int = 0
    trace: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _as_str_tuple(self.labels, "Prediction.labels"))
        object.__setattr__(self, "candidates", _as_str_tuple(self.candidates, "Prediction.candidates"))
        object.__setattr__(self, "scores", tuple(float(s) for s in self.scores))
        object.__setattr__(self, "demonstrations", tuple(self.demonstrations))
        if self.scores and len(self.scores) != len(self.labels):
            raise ValueError(f"Prediction has {len(self.labels)} labels but {len(self.scores)} scores")
        object.__setattr__(self, "trace", MappingProxyType(dict(self.trace)))

    @property
    def label(self) -> str | None:
        """The top-ranked label."""
        return self.labels[0] if self.labels else None

    def top(self, k: int) -> tuple[str, ...]:
        return self.labels[:k]

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": list(self.labels),
            "scores": list(self.scores),
            "candidates": list(self.candidates),
            "demonstrations": [d.to_dict() for d in self.demonstrations],
            "prompt_tokens": self.prompt_tokens,
            "trace": _jsonable(dict(self.trace)),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Prediction:
        return cls(
            labels=tuple(d["labels"]),
            scores=tuple(d.get("scores", ())),
            candidates=tuple(d.get("candidates", ())),
            demonstrations=tuple(Example.from_dict(x) for x in d.get("demonstrations", ())),
            prompt_tokens=int(d.get("prompt_tokens", 0)),
            trace=d.get("trace", {}),
        )


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def labels_of(examples: Sequence[Example]) -> list[tuple[str, ...]]:
    return [ex.labels for ex in examples]


def check_text(text: str, where: str) -> str:
    """``text`` if the tokenizer and the JSON/UTF-8 writers can take it; else ValueError naming ``where``.

    A lone surrogate (JSON ``"ab\\ud800cd"``) cannot be encoded as UTF-8, so the tokenizer raises a
    TypeError deep inside a batch and every text batched with it fails; a NUL byte is cut or
    refused by C tokenizers, CSV writers and many log readers. Checking at each boundary (serve,
    label, predict, fit) makes one bad text fail alone, with a message that says which one.
    """
    if not isinstance(text, str):
        raise ValueError(f"{where}: must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: contains a lone surrogate {text[e.start]!r} at character {e.start} (not valid Unicode text)") from None
    nul = text.find("\x00")
    if nul >= 0:
        raise ValueError(f"{where}: contains a NUL character at character {nul}")
    return text
