"""The real all-MiniLM-L6-v2 embedder and the on-disk embedding cache."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from iclcls.embed import CachedEmbedder, Embedder, SentenceTransformerEmbedder, default_embedder, get_embedder
from iclcls.embed.cache import cache_key
from iclcls.embed.sentence_transformers import model_identity


class Counting:
    """Delegates to a real embedder and records which texts reached it."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: list[list[str]] = []

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode(self, texts, *, batch_size=64, show_progress=None):
        self.calls.append(list(texts))
        return self.inner.encode(texts, batch_size=batch_size, show_progress=show_progress)



@pytest.fixture(scope="module")
def st() -> SentenceTransformerEmbedder:
    return default_embedder(cache=False)


def test_default_embedder_identity(st):
    assert isinstance(st, SentenceTransformerEmbedder) and isinstance(st, Embedder)
    assert st.name == "st:all-MiniLM-L6-v2" and st.dim == 384
    assert default_embedder(cache=False) is st  # one instance per process
    assert get_embedder("all-MiniLM-L6-v2", cache=False) is st
    cached = default_embedder()
    assert isinstance(cached, CachedEmbedder) and cached.embedder is st
    assert get_embedder(None) is cached and get_embedder("default") is cached


def test_vectors_unit_norm_float32(st):
    texts = ["I lost my card", "How do I top up?", "", "Wie spät ist es?"]
    v = st.encode(texts)
    assert v.dtype == np.float32 and v.shape == (4, 384) and v.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert st.encode([]).shape == (0, 384)
    np.testing.assert_allclose(st.encode(texts[:1])[0], v[0], atol=1e-5)  # batch-independent


def test_similar_sentences_are_closer(st):
    a, b, c = st.encode(
        [
            "My card has not arrived yet.",
            "I am still waiting for my new card to be delivered.",
            "What is the best recipe for chocolate cake?",
        ]
    )
    assert a @ b > 0.5
    assert a @ b > a @ c + 0.3


def test_bad_texts_are_named(st):
    with pytest.raises(TypeError, match=r"texts\[1\] is float"):
        st.encode(["ok", float("nan")])
    with pytest.raises(TypeError, match="not one string"):
        st.encode("a single string")


def test_model_identity_for_paths_and_names(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    name = model_identity(folder)
    assert name.startswith("st:my-model-") and len(name) == len("st:my-model-") + 8
    assert model_identity(str(folder) + "/") == name  # resolved path
    other = tmp_path / "b" / "my-model"
    other.mkdir(parents=True)
    assert model_identity(other) != name
    assert model_identity("sentence-transformers/all-mpnet-base-v2") == "st:all-mpnet-base-v2"
    assert model_identity("BAAI/bge-small-en-v1.5") == "st:BAAI/bge-small-en-v1.5"
    raw = SentenceTransformerEmbedder(folder, normalize=False)
    assert raw.name == name + ":raw"  # different vectors, different cache key


def test_local_path_embedder_loads_any_folder(st, tmp_path):
    """The same code path as a user's own model folder: a copy of the offline model."""
    import shutil

    src = Path(st.model_name_or_path)
    dst = tmp_path / "minilm-copy"
    shutil.copytree(src, dst)
    mine = get_embedder(str(dst), cache=False)
    assert mine.name.startswith("st:minilm-copy-")
    np.testing.assert_allclose(mine.encode(["hello"]), st.encode(["hello"]), atol=1e-5)


def test_cache_hit_skips_model(st, tmp_path):
    counting = Counting(st)
    cached = CachedEmbedder(counting, cache_dir=tmp_path)
    texts = ["refund please", "card declined", "refund please", "exchange rate"]
    first = cached.encode(texts)
    assert counting.calls == [["refund please", "card declined", "exchange rate"]]  # deduplicated
    np.testing.assert_array_equal(first[0], first[2])
    np.testing.assert_allclose(first, st.encode(texts), atol=1e-6)

    again = cached.encode(texts)
    assert len(counting.calls) == 1  # all hits: the model is not called
    np.testing.assert_array_equal(again, first)  # identical bytes

    mixed = cached.encode(["new text", "card declined", "another new"])
    assert counting.calls[-1] == ["new text", "another new"]  # only the misses
    np.testing.assert_array_equal(mixed[1], first[1])
    assert cached.hits == 4 + 1 and cached.misses == 3 + 2
    assert cached.stored_rows() == 5
    assert cached.encode([]).shape == (0, 384)


def test_fully_cached_run_never_loads_the_model(st, tmp_path):
    CachedEmbedder(st, cache_dir=tmp_path).encode(["one", "two"])
    fresh = SentenceTransformerEmbedder(st.model_name_or_path, name=st.name)
    out = CachedEmbedder(fresh, cache_dir=tmp_path).encode(["two", "one", "two"])
    assert fresh._model is None  # served from disk: no model load, no torch needed
    np.testing.assert_allclose(out[[1, 0]], st.encode(["one", "two"]), atol=1e-6)


def test_cache_key_separates_embedders(st, tmp_path):
    assert cache_key("a", "x") != cache_key("b", "x") != cache_key("a", "y")
    cached = CachedEmbedder(st, cache_dir=tmp_path)
    cached.encode(["hello"])
    other = Counting(st)
    other.name = "st:some-other-model"
    CachedEmbedder(other, cache_dir=tmp_path).encode(["hello"])
    assert other.calls == [["hello"]]  # same text, other embedder: a miss


def test_cache_shared_by_two_instances(st, tmp_path):
    a = CachedEmbedder(Counting(st), cache_dir=tmp_path)
    b = CachedEmbedder(Counting(st), cache_dir=tmp_path)
    va = a.encode(["alpha", "beta"])
    vb = b.encode(["beta", "alpha", "gamma"])
    assert b.embedder.calls == [["gamma"]]
    np.testing.assert_array_equal(vb[:2], va[::-1])
    assert a.encode(["gamma"]).tobytes() == vb[2].tobytes()
    assert a.embedder.calls == [["alpha", "beta"]]


def _worker(cache_dir: str, start: int, queue) -> None:
    from iclcls.embed import default_embedder

    cached = CachedEmbedder(default_embedder(cache=False), cache_dir=cache_dir)
    texts = [f"sentence number {i}" for i in range(start, start + 40)]
    queue.put(cached.encode(texts).tobytes())


@pytest.mark.slow
def test_cache_safe_across_processes(st, tmp_path):
    """Two processes write overlapping texts to one folder at once; everything reads back."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), s, queue)) for s in (0, 20)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    counting = Counting(st)
    cached = CachedEmbedder(counting, cache_dir=tmp_path)
    texts = [f"sentence number {i}" for i in range(60)]
    vecs = cached.encode(texts)
    assert counting.calls == []  # both processes' rows are there
    got = {np.frombuffer(r, np.float32).reshape(40, 384)[0].tobytes() for r in results}
    assert got == {vecs[0].tobytes(), vecs[20].tobytes()}
    np.testing.assert_allclose(vecs, st.encode(texts), atol=1e-5)


def test_cache_refuses_pickled_entries(st, tmp_path):
    cached = CachedEmbedder(st, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="bytes only"):
        cached._cache.set("k", np.zeros(3))
    cached.encode(["x"])
    cached.close()
    key = cache_key(st.name, "x")
    with sqlite3.connect(tmp_path / "cache.db") as db:  # tamper: mark the row as pickled
        n = db.execute("UPDATE Cache SET mode = 4 WHERE key = ?", (key,)).rowcount
    assert n == 1
    with pytest.raises(ValueError, match="refusing"):
        CachedEmbedder(st, cache_dir=tmp_path).encode(["x"])
