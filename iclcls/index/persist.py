"""Checksummed save and load of a faiss index: the faiss binary plus a JSON sidecar.

Why more than ``faiss.write_index``: a saved state may come from someone else, and faiss parses
its binary natively, allocating and looping by the numbers inside. So the sidecar records the
binary's size and SHA-256 (checked before faiss reads a byte) and the index settings, each
range-checked so a damaged or hostile sidecar cannot ask for a gigantic graph or an endless
search. A checksum beside a file proves it undamaged, not benign: for untrusted states
:meth:`VectorIndex.load` rebuilds from the vectors instead of parsing the binary at all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np

from iclcls.io import atomic_write_bytes, atomic_write_json, read_json

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
FORMAT_VERSION = 1

# What a sidecar may say: faiss allocates and loops by these numbers.
_SIDECAR_BOUNDS: dict[str, tuple[float, float]] = {
    "dim": (1, 65_536),
    "ntotal": (0, 2**40),
    "exact_threshold": (0, 2**40),
    "hnsw_m": (2, 256),
    "ef_search": (1, 16_384),
    "ef_construction": (1, 4_096),
    "compact_fraction": (0.0, 1.0),
}


class SavedState(NamedTuple):
    """A verified sidecar (``settings``: VectorIndex's arguments) and the faiss bytes it vouches for."""

    settings: dict[str, Any]
    kind: str
    ntotal: int
    deleted: set[int]
    data: bytes
    index_file: Path
    meta_file: Path


def state_paths(path: str | Path) -> tuple[Path, Path]:
    """``x.faiss`` and ``x.faiss.json``, or ``<dir>/index.faiss`` and ``<dir>/index.json``."""
    p = Path(path)
    if p.suffix == ".faiss":
        return p, p.with_name(p.name + ".json")
    return p / INDEX_FILE, p / META_FILE


def write_state(path: str | Path, index: Any, meta: dict[str, Any]) -> Path:
    """Write ``index``, then (both atomically) a sidecar of ``meta`` with its size and SHA-256; returns the faiss file."""
    index_file, meta_file = state_paths(path)
    index_file.parent.mkdir(parents=True, exist_ok=True)
    data = faiss.serialize_index(index).tobytes()
    atomic_write_bytes(index_file, data)
    atomic_write_json(meta_file, {
        "format": "iclcls.VectorIndex", "version": FORMAT_VERSION,
        "file_bytes": len(data), "file_sha256": hashlib.sha256(data).hexdigest(),
        "ntotal": int(index.ntotal), **meta,
    })  # fmt: skip
    return index_file


def _sidecar_numbers(meta: dict[str, Any], where: Path) -> dict[str, Any]:
    """The sidecar's sizes and HNSW parameters, type- and range-checked (ValueError naming the field)."""
    out: dict[str, Any] = {}
    for key, (lo, hi) in _SIDECAR_BOUNDS.items():
        value = meta[key]
        is_float = key == "compact_fraction"
        ok_type = isinstance(value, (int, float)) if is_float else isinstance(value, int)
        if isinstance(value, bool) or not ok_type or not (lo <= value <= hi):
            raise ValueError(f"{where}: {key} is {value!r}; expected {'a number' if is_float else 'an integer'} in [{lo}, {hi}]")
        out[key] = float(value) if is_float else int(value)
    return out


def _deleted_ids(value: Any, ntotal: int, where: Path) -> set[int]:
    """``deleted_ids``: distinct integers, fewer than the stored vectors (else the index is empty)."""
    if not isinstance(value, list) or len(value) > ntotal:
        raise ValueError(f"{where}: deleted_ids must be a list of at most {ntotal} ids (ntotal)")
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 2**63 for i in value):
        raise ValueError(f"{where}: deleted_ids must hold integers in [0, 2**63)")
    ids = set(value)
    if len(ids) != len(value):
        raise ValueError(f"{where}: deleted_ids holds duplicates")
    return ids


def read_state(path: str | Path, *, require_checksum: bool) -> SavedState:
    """Read and check the sidecar, then the faiss bytes against its size and SHA-256.

    ``require_checksum`` refuses a sidecar without them (an older or hand-made state).
    """
    index_file, meta_file = state_paths(path)
    for f in (index_file, meta_file):
        if f.is_symlink() or not f.is_file():
            raise FileNotFoundError(f"{f}: missing or not a regular file (not a saved VectorIndex?)")
    meta = read_json(meta_file)
    if not isinstance(meta, dict) or meta.get("format") != "iclcls.VectorIndex":
        raise ValueError(f"{meta_file}: not a VectorIndex sidecar")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: unsupported version {meta.get('version')!r}")
    try:
        settings = _sidecar_numbers(meta, meta_file)
        ntotal = settings.pop("ntotal")
        settings["metric"], kind = meta["metric"], str(meta["kind"])
        deleted = _deleted_ids(meta["deleted_ids"], ntotal, meta_file)
    except KeyError as e:
        raise ValueError(f"{meta_file}: missing field {e.args[0]!r}") from None
    if kind not in ("flat", "hnsw"):
        raise ValueError(f"{meta_file}: kind {kind!r} is not 'flat' or 'hnsw'")
    data = index_file.read_bytes()
    size, digest = meta.get("file_bytes"), meta.get("file_sha256")
    if size is None or digest is None:
        if require_checksum:
            raise ValueError(
                f"{meta_file}: records no size and SHA-256 of {index_file.name}; refusing to parse an "
                "unverified faiss file (re-save the state with this iclcls, or load it trusted)"
            )
    elif len(data) != size or hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(
            f"{index_file}: {len(data)} bytes with SHA-256 {hashlib.sha256(data).hexdigest()[:16]}..., but "
            f"{meta_file.name} recorded {size} bytes, {str(digest)[:16]}...: the file was changed or damaged"
        )
    return SavedState(settings, kind, ntotal, deleted, data, index_file, meta_file)


def parse_index(saved: SavedState) -> Any:
    """The faiss index in ``saved.data``, checked to be the ``IndexIDMap2`` the sidecar describes."""
    try:
        index = faiss.deserialize_index(np.frombuffer(saved.data, dtype=np.uint8))
    except RuntimeError as e:
        raise ValueError(f"{saved.index_file}: not a faiss index ({str(e).splitlines()[0][:200]})") from None
    dim, metric = saved.settings["dim"], saved.settings["metric"]
    problems = []
    if not isinstance(index, faiss.IndexIDMap2):
        problems.append(f"type {type(index).__name__} (expected IndexIDMap2)")
    if index.d != dim:
        problems.append(f"dim {index.d} (sidecar says {dim})")
    if index.ntotal != saved.ntotal:
        problems.append(f"{index.ntotal} vectors (sidecar says {saved.ntotal})")
    if index.metric_type != (faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2):
        problems.append(f"metric type {index.metric_type} (sidecar says {metric})")
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None
    expected = faiss.IndexHNSWFlat if saved.kind == "hnsw" else faiss.IndexFlat
    if inner is not None and not isinstance(inner, expected):
        problems.append(f"inner index {type(inner).__name__} (sidecar says {saved.kind})")
    if problems:
        raise ValueError(f"{saved.index_file}: does not match {saved.meta_file}: " + "; ".join(problems))
    return index
