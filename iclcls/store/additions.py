"""One addition of classes, from request to store record and back.

``Addition`` is what a client asked for (texts, labels, descriptions); its ``digest`` tells a
retry (same body, same key) from a different request under the same idempotency key.
``Prepared`` adds what the classifier computed for it before the write lock: embeddings and
what an LM wrote (tags, class summaries). All are logged: replay never calls an LM and gives the
same state whatever LM is configured at restart, and a replica following the store applies a
record without embedding it again (no wait for the embedder behind its own classify requests,
and bit-identical vectors on every replica). Records without embeddings (older ones) are
embedded when applied.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from iclcls.store import StoreError
from iclcls.types import Example, check_text

RECORD_VERSION = 1


@dataclass(frozen=True)
class Addition:
    """A validated addition; construction checks every text, label and description."""

    examples: tuple[Example, ...]
    descriptions: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, pairs: list[tuple[str, str]], descriptions: Mapping[str, str] | None = None) -> Addition:
        """From (text, label) pairs; ValueError naming the first bad field."""
        examples = []
        for i, (text, label) in enumerate(pairs):
            check_text(text, f"examples.{i}.text")
            check_text(label, f"examples.{i}.label")
            examples.append(Example(text, (label,)))
        labels = {ex.labels[0] for ex in examples}
        descs: dict[str, str] = {}
        for lab, desc in (descriptions or {}).items():
            check_text(lab, "descriptions: a label")
            check_text(desc, f"descriptions.{lab!r}")
            if lab not in labels:
                raise ValueError(f"descriptions: label {lab!r} has no example in this request")
            descs[lab] = desc
        return cls(tuple(examples), descs)

    @property
    def labels(self) -> set[str]:
        return {ex.labels[0] for ex in self.examples}

    def digest(self) -> str:
        """SHA-256 of the request's content (order of examples kept, descriptions sorted)."""
        canon = {"examples": [[ex.text, ex.labels[0]] for ex in self.examples],
                 "descriptions": sorted(self.descriptions.items())}
        return hashlib.sha256(json.dumps(canon, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Prepared:
    """An addition ready to apply without an LM: tagged examples, summaries, embeddings."""

    addition: Addition
    examples: tuple[Example, ...]  # with metadata['tags'] when the shortlister reads tags
    summaries: Mapping[str, str]
    embeddings: np.ndarray | None = None

    def apply_to(self, clf: Any) -> None:
        """Add to ``clf`` in place, never calling an LM; summaries only for classes still without one
        (the same rule at replay, so two additions of one new class give one summary either way)."""
        summaries = {lab: s for lab, s in self.summaries.items() if lab not in clf.summaries_}
        clf.add_classes(list(self.examples), descriptions=dict(self.addition.descriptions), summaries=summaries,
                        embeddings=self.embeddings, generate=False)

    def record(self) -> dict[str, Any]:
        out = {
            "version": RECORD_VERSION,
            "examples": [
                {"text": ex.text, "label": ex.labels[0], **({"tags": list(ex.metadata["tags"])} if "tags" in ex.metadata else {})}
                for ex in self.examples
            ],
            "descriptions": dict(self.addition.descriptions),
            "summaries": dict(self.summaries),
        }
        if self.embeddings is not None:
            out["embeddings"] = encode_array(self.embeddings)
        return out

    @classmethod
    def from_record(cls, body: Mapping[str, Any], where: str) -> Prepared:
        """A logged record back as a ``Prepared`` (embeddings are recomputed when applied)."""
        try:
            if body.get("version") != RECORD_VERSION:
                raise ValueError(f"record version {body.get('version')!r}, expected {RECORD_VERSION}")
            pairs, examples = [], []
            for e in body["examples"]:
                pairs.append((str(e["text"]), str(e["label"])))
                meta = {"tags": [str(t) for t in e["tags"]]} if "tags" in e else {}
                examples.append(Example(str(e["text"]), (str(e["label"]),), metadata=meta))
            addition = Addition.build(pairs, {str(k): str(v) for k, v in (body.get("descriptions") or {}).items()})
            summaries = {str(k): str(v) for k, v in (body.get("summaries") or {}).items()}
            emb = decode_array(body["embeddings"], rows=len(examples)) if "embeddings" in body else None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreError(f"{where}: malformed addition record: {e}") from None
        return cls(addition, tuple(examples), summaries, emb)


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """A float32 matrix as JSON: shape and little-endian bytes in base64 (exact, unlike decimals)."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(obj: Mapping[str, Any], *, rows: int) -> np.ndarray:
    """The matrix ``encode_array`` wrote; checked: 2-D, ``rows`` rows, finite."""
    if obj.get("dtype") != "float32":
        raise ValueError(f"embeddings: dtype {obj.get('dtype')!r}, expected float32")
    shape = [int(x) for x in obj["shape"]]
    if len(shape) != 2 or shape[0] != rows or not 0 < shape[1] <= 65536:
        raise ValueError(f"embeddings: shape {shape}, expected ({rows}, dim)")
    a = np.frombuffer(base64.b64decode(obj["b64"], validate=True), dtype="<f4")
    if a.size != shape[0] * shape[1] or not np.isfinite(a).all():
        raise ValueError("embeddings: wrong size or not finite")
    return a.reshape(shape).astype(np.float32)
