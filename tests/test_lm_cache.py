"""The request cache: hits never reach the backend, results are identical, and it persists."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from iclcls.lm.base import BaseLM
from iclcls.lm.cache import CachedLM


class CountingLM(BaseLM):
    """The real backend behind a thin wrapper that records every item sent to it."""

    def __init__(self, lm: Any) -> None:
        self.lm = lm
        self.name = lm.name
        self.sent: list[tuple[str, Any]] = []
        self.prefixes: list[str | None] = []
        self._lock = threading.Lock()

    def _record(self, method: str, items: Sequence[Any]) -> None:
        with self._lock:
            self.sent.extend((method, item) for item in items)

    @property
    def context_window(self) -> int:
        return self.lm.context_window

    def count_tokens(self, text: str) -> int:
        return self.lm.count_tokens(text)

    def generate(self, prompts, **kw):
        self._record("generate", prompts)
        return self.lm.generate(prompts, **kw)

    def chat(self, conversations, **kw):
        self._record("chat", conversations)
        return self.lm.chat(conversations, **kw)

    def score_batch(self, requests, *, shared_prefix=None):
        self._record("score", [(p, c) for p, conts in requests for c in conts])
        self.prefixes.append(shared_prefix)
        return self.lm.score_batch(requests, shared_prefix=shared_prefix)


@pytest.fixture
def counting(smollm) -> CountingLM:
    return CountingLM(smollm)


REQUESTS = [
    ("The capital of France is", [" Paris", " banana", " a city"]),
    ("Monday, Tuesday, Wednesday,", [" Thursday", " Paris"]),
]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y)
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)


def test_score_hits_skip_the_backend(counting, tmp_path):
    lm = CachedLM(counting, cache_dir=tmp_path)
    first = lm.score_batch(REQUESTS)
    assert (lm.hits, lm.misses) == (0, 5)
    assert len(counting.sent) == 5
    assert_same(first, counting.lm.score_batch(REQUESTS))

    second = lm.score_batch(REQUESTS)
    assert len(counting.sent) == 5  # nothing new reached the backend
    assert (lm.hits, lm.misses) == (5, 5)
    assert_same(first, second)

    # A partly cached request sends only its new continuations, still grouped by prompt.
    third = lm.score_batch([(REQUESTS[0][0], [" banana", " Lyon", " Paris", " Lyon"])])
    assert counting.sent[5:] == [("score", (REQUESTS[0][0], " Lyon"))]
    np.testing.assert_array_equal(third[0][0], first[0][1])
    np.testing.assert_array_equal(third[0][1], third[0][3])
    assert lm.score(REQUESTS[0][0], [" Paris"]) == pytest.approx([float(first[0][0].sum())])


def test_generate_and_chat_are_cached(counting, tmp_path):
    lm = CachedLM(counting, cache_dir=tmp_path)
    prompts = ["Once upon a time", "The capital of France is"]
    out = lm.generate(prompts, max_tokens=8)
    assert lm.generate(prompts, max_tokens=8) == out
    assert [m for m, _ in counting.sent] == ["generate", "generate"]
    lm.generate(prompts[:1], max_tokens=9)  # other parameters: another key
    assert len(counting.sent) == 3

    conv = [{"role": "user", "content": "Say hello."}]
    reply = lm.chat([conv], max_tokens=8)
    assert lm.chat([conv], max_tokens=8) == reply
    assert sum(m == "chat" for m, _ in counting.sent) == 1


def test_cache_persists_across_instances_as_plain_json(counting, tmp_path):
    first = CachedLM(counting, cache_dir=tmp_path)
    want = first.score_batch(REQUESTS)
    first.close()
    again = CachedLM(counting, cache_dir=tmp_path)
    assert_same(again.score_batch(REQUESTS), want)
    assert again.hits == 5 and again.misses == 0
    assert len(counting.sent) == 5
    again.close()
    # Values are JSON text in SQLite (never pickles): read them back without diskcache.
    with sqlite3.connect(tmp_path / "cache.db") as db:
        rows = db.execute("SELECT key, value, mode FROM Cache").fetchall()
    assert len(rows) == 5
    assert all(isinstance(k, str) and isinstance(v, str) and v.startswith("[") for k, v, _ in rows)


def test_two_threads_write_concurrently(counting, tmp_path):
    lm = CachedLM(counting, cache_dir=tmp_path)
    jobs = [
        [(f"Item {i}: the colour of the sky is", [" blue", " green"]) for i in range(3)],
        [(f"Item {i}: the colour of grass is", [" green", " blue"]) for i in range(3)],
    ]
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            results[t] = lm.score_batch(jobs[t])
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert lm.misses == 12 and len(counting.sent) == 12
    reread = CachedLM(counting, cache_dir=tmp_path)
    for t in range(2):
        assert_same(reread.score_batch(jobs[t]), results[t])
    assert reread.hits == 12 and len(counting.sent) == 12


def test_shared_prefix_hint_reaches_the_backend_but_not_the_key(counting, tmp_path):
    lm = CachedLM(counting, cache_dir=tmp_path)
    prefix = "Answer with one word.\n"
    requests = [(prefix + "The capital of France is", [" Paris", " Rome"])]
    with_hint = lm.score_batch(requests, shared_prefix=prefix)
    assert counting.prefixes == [prefix]
    assert_same(lm.score_batch(requests), with_hint)  # same key without the hint: a hit
    assert lm.hits == 2 and len(counting.sent) == 2


def test_delegates_sizes_and_name(smollm, tmp_path):
    lm = CachedLM(smollm, cache_dir=tmp_path)
    assert lm.name == smollm.name
    assert lm.context_window == smollm.context_window
    assert lm.count_tokens("hello world") == smollm.count_tokens("hello world")
    assert lm.score_naive.__self__ is smollm  # backend extras pass through


def test_keys_carry_the_weights_hash(smollm, tmp_path):
    from iclcls.lm.cache import model_identity

    ident = model_identity(smollm)
    assert ident.startswith(smollm.name + "#sha256:")
    assert CachedLM(CountingLM(smollm), cache_dir=tmp_path).identity == ident  # wrappers answer as their backend


class _FileLM(BaseLM):
    """Two 'versions' of one model: same name, different weights files (control flow only)."""

    name = "same-name"

    def __init__(self, weights, answer: str) -> None:
        from iclcls.lm.models import ModelSource

        self.source = ModelSource("same-name", str(weights.parent), weights.name)
        self.answer = answer
        self.calls = 0

    context_window = 2048

    def count_tokens(self, text):
        return len(text.split())

    def generate(self, prompts, **kw):
        self.calls += len(prompts)
        return [self.answer for _ in prompts]

    def chat(self, conversations, **kw):
        return self.generate(conversations)

    def score_batch(self, requests):
        return [[np.zeros(1) for _ in conts] for _, conts in requests]


def test_two_models_sharing_a_cache_never_mix(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"weights A")
    (tmp_path / "b.gguf").write_bytes(b"weights B")
    a = CachedLM(_FileLM(tmp_path / "a.gguf", "from A"), cache_dir=tmp_path / "cache")
    b = CachedLM(_FileLM(tmp_path / "b.gguf", "from B"), cache_dir=tmp_path / "cache")
    assert a.identity != b.identity and a.name == b.name
    assert a.generate(["hi"]) == ["from A"]
    assert b.generate(["hi"]) == ["from B"]  # not A's cached answer
    assert a.generate(["hi"]) == ["from A"] and a.lm.calls == 1 and b.lm.calls == 1


def test_a_planted_pickle_is_never_loaded(tmp_path):
    import diskcache

    from iclcls.lm.cache import request_key

    (tmp_path / "w.gguf").write_bytes(b"w")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    lm = CachedLM(_FileLM(tmp_path / "w.gguf", "real"), cache_dir=tmp_path / "cache")
    params = {"max_tokens": 64, "temperature": 0.0, "stop": None, "seed": 0, "choices": None}
    key = request_key(lm.identity, "generate", "hi", params)
    lm.close()
    with diskcache.Cache(str(tmp_path / "cache")) as plain:  # the default Disk pickles
        plain.set(key, Payload())
        plain.set(request_key(lm.identity, "generate", "ho", params), b"\x80\x04binary")
    lm = CachedLM(_FileLM(tmp_path / "w.gguf", "real"), cache_dir=tmp_path / "cache")
    assert lm.generate(["hi", "ho"]) == ["real", "real"]  # both misses: computed, not loaded
    assert not marker.exists()
    assert lm.misses == 2 and lm.lm.calls == 2
    with pytest.raises(TypeError, match="stores JSON text only"):
        lm._store.set("x", {"not": "text"})
