"""What an exporter needs to know about a sentence-transformers folder: its hash and layout.

Exports are cached by the hash of the source model's files, so a changed model (a new
package version) is exported anew and an unchanged one never is. Hashing 90-420 MB on every
start-up would cost a second, so the digest is remembered beside the cache, keyed by the
files' sizes and modification times (``digests.json`` beside the exports).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from iclcls.io import atomic_write_text
from iclcls.util import cache_dir

_SKIP_DIRS = {"onnx", "openvino", ".git"}  # exports a folder may already carry are not the source


@dataclass(frozen=True)
class SourceModel:
    """A sentence-transformers folder: where, its content hash, how it pools and truncates."""

    path: Path
    digest: str
    pooling: str  # "mean" or "cls"
    max_seq_length: int
    dim: int


def _files(folder: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        out += [Path(root) / f for f in sorted(files)]
    return out


def _fingerprint(folder: Path, files: list[Path]) -> str:
    h = hashlib.sha256(str(folder).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _content_digest(folder: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def exports_root() -> Path:
    """Where exports live: beside the Python environment, like the opt-in mpnet model.

    Not under ``$ICLCLS_CACHE``: a fresh embedding cache (a benchmark's, a test session's) must
    not re-export. ``$ICLCLS_MODELS/exports`` when set; else ``<sys.prefix>/share/iclcls/models/
    exports`` when writable; else ``<iclcls cache>/embed-models``.
    """
    if os.environ.get("ICLCLS_MODELS"):
        return Path(os.environ["ICLCLS_MODELS"]) / "exports"
    beside_env = Path(sys.prefix) / "share" / "iclcls" / "models" / "exports"
    existing = next(p for p in (beside_env, *beside_env.parents) if p.exists())
    return beside_env if os.access(existing, os.W_OK) else cache_dir() / "embed-models"


def model_digest(folder: str | Path) -> str:
    """sha256 of a model folder's files (names and bytes), remembered by size and mtime."""
    folder = Path(folder).resolve()
    files = _files(folder)
    memo = exports_root() / "digests.json"
    fp = _fingerprint(folder, files)
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(fp), str):
        return known[fp]
    digest = _content_digest(folder, files)
    known = known if isinstance(known, dict) else {}
    known[fp] = digest
    atomic_write_text(memo, json.dumps(known, indent=0))  # concurrent writers: last one wins, readers see whole JSON
    return digest


def describe(folder: str | Path) -> SourceModel:
    """Read a sentence-transformers folder's pooling and length; refuse layouts we cannot export."""
    folder = Path(folder).resolve()
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder}: no tokenizer.json (a fast tokenizer is needed to export this model)")
    modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").is_file() else []
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    unknown = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if unknown:
        raise ValueError(f"{folder}: modules {unknown} are not supported by the exported backends")
    pooling, dim = "mean", 0
    pool_dir = next((folder / m["path"] for m in modules if m.get("type", "").endswith("Pooling")), None)
    if pool_dir is not None and (pool_dir / "config.json").is_file():
        cfg = json.loads((pool_dir / "config.json").read_text())
        dim = int(cfg.get("word_embedding_dimension", 0))
        if cfg.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif not cfg.get("pooling_mode_mean_tokens", True) or cfg.get("pooling_mode_max_tokens") or cfg.get(
            "pooling_mode_mean_sqrt_len_tokens"
        ):
            raise ValueError(f"{folder}: only mean or CLS pooling can be exported")
    max_len = 512
    if (folder / "sentence_bert_config.json").is_file():
        max_len = int(json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length") or 512)
    if not dim and (folder / "config.json").is_file():
        dim = int(json.loads((folder / "config.json").read_text()).get("hidden_size", 0))
    return SourceModel(folder, model_digest(folder), pooling, max_len, dim)
