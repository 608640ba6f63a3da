"""An on-disk LM request cache: the same request never reaches the backend twice.

Experiments re-run the same prompts (a config tweak downstream of the LM, a crashed
run resumed); LM calls dominate their cost. ``CachedLM`` wraps any LM and keys every
item — one generated prompt, one conversation, one (prompt, continuation) score — by
(backend name incl. model, method, request, parameters). Only the misses go to the
backend, in one batched call; results come back in request order.

Storage is ``diskcache`` (SQLite; safe across threads and processes) with keys and
values as plain strings (a SHA-256 of the canonical JSON key; JSON values), so reading
the cache never unpickles anything.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import diskcache
import numpy as np

from iclcls.lm.base import BaseLM, Conversation, ScoreRequest
from iclcls.lm.models import cache_dir as default_cache_dir

KEY_VERSION = 1


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
        self.directory = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "lm_requests"
        self._store = diskcache.Cache(str(self.directory), size_limit=size_limit)
        try:
            self._takes_prefix = "shared_prefix" in inspect.signature(lm.score_batch).parameters
        except (TypeError, ValueError):
            self._takes_prefix = False
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
            raw = self._store.get(k)
            if isinstance(raw, str):  # anything else is not ours: treat as a miss
                found[k] = json.loads(raw)
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
        keys = [request_key(self.name, method, item, params) for item in items]
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
        keys = [[request_key(self.name, "score", p, c) for c in conts] for p, conts in requests]
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
            for (prompt, m), scores in zip(todo.items(), results):
                for k, s in zip(m, scores):
                    fresh[k] = [float(x) for x in np.asarray(s, dtype=np.float64)]
            self._store_all(fresh)
            found.update(fresh)
        return [[np.asarray(found[k], dtype=np.float64) for k in ks] for ks in keys]
