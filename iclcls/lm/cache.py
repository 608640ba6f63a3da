"""An on-disk LM request cache: the same request never reaches the backend twice.

Experiments re-run the same prompts (a config tweak downstream of the LM, a crashed
run resumed); LM calls dominate their cost. ``CachedLM`` wraps any LM and keys every
item — one generated prompt, one conversation, one (prompt, continuation) score — by
(backend name incl. model, method, request, parameters). Only the misses go to the
backend, in one batched call; results come back in request order.

Storage is ``diskcache`` (SQLite; safe across threads and processes) with keys and
values as plain strings (a SHA-256 of the canonical JSON key; JSON values). The cache's
``Disk`` stores and returns ``str`` only and refuses a pickled entry, so a cache folder
someone hands you holds data, never code.

Every key starts with the model's identity (``model_identity``): its name plus a hash of
its weights file(s) (a local model) or the server URL (an endpoint), so two models, or
two versions of one model, sharing a cache folder never read each other's results.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import diskcache
import numpy as np

from iclcls.lm.base import BaseLM, Conversation, ScoreRequest
from iclcls.lm.common import accepts_shared_prefix
from iclcls.lm.models import cache_dir as default_cache_dir

KEY_VERSION = 2  # 2: keys carry the model identity (weights hash), not only its name

log = logging.getLogger(__name__)


class _TextOnlyDisk(diskcache.Disk):
    """A diskcache Disk that stores and returns only ``str`` values: never pickle."""

    def store(self, value, read, key=diskcache.core.UNKNOWN):  # type: ignore[override]
        if type(value) is not str:
            raise TypeError(f"LM request cache stores JSON text only, got {type(value).__name__}")
        return super().store(value, read, key=key)

    def fetch(self, mode, filename, value, read):  # type: ignore[override]
        if mode in (diskcache.core.MODE_PICKLE, diskcache.core.MODE_BINARY):
            raise ValueError("LM request cache entry is not text (pickled or binary); refusing to load it")
        return super().fetch(mode, filename, value, read)


_WEIGHT_FILES = ("*.gguf", "*.safetensors", "*.bin", "*.pt", "config.json", "tokenizer.json", "tokenizer_config.json")


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def content_hash(path: str | Path) -> str:
    """SHA-256 of a model file, or of a model folder's weight, config and tokenizer files
    (names and contents); computed once per process per file version."""
    p = Path(path)
    files = [p] if p.is_file() else sorted({f for pat in _WEIGHT_FILES for f in p.glob(pat) if f.is_file()})
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f.name.encode("utf-8") + b"\0" + _file_sha256(str(f.resolve()), st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()


def model_identity(lm: Any) -> str:
    """What distinguishes ``lm``'s answers: ``lm.identity`` if it has one, else its name plus
    the hash of its local weights (GGUF file or model folder), or plus its server URL."""
    ident = getattr(lm, "identity", None)
    if isinstance(ident, str) and ident:
        return ident
    name = str(getattr(lm, "name", type(lm).__name__))
    inner = getattr(lm, "lm", None)  # a thin wrapper (a counter, a cache) answers as its backend
    if inner is not None and inner is not lm and getattr(inner, "name", None) == name:
        return model_identity(inner)
    base = getattr(lm, "api_base", None)
    if isinstance(base, str):
        return f"{name}@{base}"
    source = getattr(lm, "source", None)  # TransformersLM: a ModelSource
    where = None
    if source is not None and getattr(source, "path", None):
        where = source.gguf_path or Path(source.path)
    elif isinstance(getattr(lm, "model", None), str):  # VLLMEngine: the model folder
        where = Path(lm.model)
    if where is not None and Path(where).exists():
        return f"{name}#sha256:{content_hash(where)[:32]}"
    return name  # a hub id: the name is all we know (pin a revision in the name)


def _json_default(o: Any) -> Any:
    if isinstance(o, (bytes, bytearray)):  # image bytes: key by content, not by 10 MB of base64
        return {"sha256": hashlib.sha256(bytes(o)).hexdigest()}
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"cannot key an LM request containing {type(o).__name__}")


def request_key(*parts: Any) -> str:
    """A stable string key for a request: SHA-256 of its canonical JSON."""
    text = json.dumps([KEY_VERSION, *parts], sort_keys=True, ensure_ascii=False, default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class CachedLM(BaseLM):
    """Wrap ``lm`` with a persistent request cache in ``cache_dir`` (default: iclcls cache/lm_requests).

    ``hits``/``misses`` count cached items (prompts, conversations, scored continuations).
    """

    def __init__(self, lm: Any, *, cache_dir: str | Path | None = None, size_limit: int = 2**32) -> None:
        self.lm = lm
        self.name = lm.name
        self.identity = model_identity(lm)
        self.directory = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "lm_requests"
        self._store = diskcache.Cache(str(self.directory), disk=_TextOnlyDisk, size_limit=size_limit)
        self._takes_prefix = accepts_shared_prefix(lm)
        self._count_lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    # ---- delegation --------------------------------------------------------------------

    @property
    def context_window(self) -> int:
        return self.lm.context_window

    def count_tokens(self, text: str) -> int:
        return self.lm.count_tokens(text)

    def __getattr__(self, attr: str) -> Any:
        # Backend-specific extras (score_naive, model, ...) pass through; guard against
        # recursion while ``self.lm`` is not yet set.
        if attr == "lm":
            raise AttributeError(attr)
        return getattr(self.lm, attr)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> CachedLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the cache ---------------------------------------------------------------------

    def _lookup(self, keys: Sequence[str]) -> dict[str, Any]:
        found = {}
        for k in dict.fromkeys(keys):
            try:
                raw = self._store.get(k)
                if isinstance(raw, str):  # anything else is not ours: treat as a miss
                    found[k] = json.loads(raw)
            except (ValueError, TypeError) as e:  # a pickled, binary or corrupt entry: a miss
                log.warning("%s: ignoring a cache entry that is not ours (%s)", self.directory, e)
        with self._count_lock:
            n_hit = sum(1 for k in keys if k in found)
            self.hits += n_hit
            self.misses += len(keys) - n_hit
        return found

    def _store_all(self, items: dict[str, Any]) -> None:
        if not items:
            return
        with self._store.transact():
            for k, v in items.items():
                self._store.set(k, json.dumps(v, ensure_ascii=False))

    def _cached_map(self, method: str, items: Sequence[Any], params: dict[str, Any], call: Any) -> list[Any]:
        """Results for ``items`` (JSON-able requests): cached ones from disk, the rest from ``call(misses)``."""
        keys = [request_key(self.identity, method, item, params) for item in items]
        found = self._lookup(keys)
        todo: dict[str, Any] = {}
        for k, item in zip(keys, items):
            if k not in found:
                todo.setdefault(k, item)
        if todo:
            results = call(list(todo.values()))
            fresh = dict(zip(todo, results))
            self._store_all(fresh)
            found.update(fresh)
        return [found[k] for k in keys]

    # ---- the LM protocol ---------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        seed: int = 0,
        choices: Sequence[str] | None = None,
    ) -> list[str]:
        params = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stop": list(stop) if stop else None,
            "seed": seed,
            "choices": list(choices) if choices is not None else None,
        }
        return self._cached_map(
            "generate",
            list(prompts),
            params,
            lambda todo: self.lm.generate(
                todo, max_tokens=max_tokens, temperature=temperature, stop=stop, seed=seed, choices=choices
            ),
        )

    def chat(
        self,
        conversations: Sequence[Conversation],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        seed: int = 0,
    ) -> list[str]:
        params = {"max_tokens": max_tokens, "temperature": temperature, "stop": list(stop) if stop else None, "seed": seed}
        return self._cached_map(
            "chat",
            [list(c) for c in conversations],
            params,
            lambda todo: self.lm.chat(todo, max_tokens=max_tokens, temperature=temperature, stop=stop, seed=seed),
        )

    def score_batch(
        self, requests: Sequence[ScoreRequest], *, shared_prefix: str | None = None
    ) -> list[list[np.ndarray]]:
        """Each (prompt, continuation) is cached on its own; misses go out grouped by prompt.

        ``shared_prefix`` (a KV-reuse hint) reaches backends that accept it and is not part
        of the key: it changes how scores are computed, not what they are.
        """
        options = {"shared_prefix": shared_prefix} if shared_prefix is not None and self._takes_prefix else {}
        requests = [(p, list(c)) for p, c in requests]
        keys = [[request_key(self.identity, "score", p, c) for c in conts] for p, conts in requests]
        found = self._lookup([k for ks in keys for k in ks])
        # Group the misses by prompt so the backend still shares each prompt's prefill.
        todo: dict[str, dict[str, str]] = {}
        for (prompt, conts), ks in zip(requests, keys):
            for c, k in zip(conts, ks):
                if k not in found:
                    todo.setdefault(prompt, {}).setdefault(k, c)
        if todo:
            backend_requests = [(p, list(m.values())) for p, m in todo.items()]
            results = self.lm.score_batch(backend_requests, **options)
            fresh = {}
            for (_prompt, m), scores in zip(todo.items(), results):
                for k, s in zip(m, scores):
                    fresh[k] = [float(x) for x in np.asarray(s, dtype=np.float64)]
            self._store_all(fresh)
            found.update(fresh)
        return [[np.asarray(found[k], dtype=np.float64) for k in ks] for ks in keys]
