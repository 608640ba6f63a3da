"""VectorIndex over real faiss: exact and HNSW, removal, padding, errors, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from iclcls.index import VectorIndex, topk


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int, metric: str = "ip"):
    if metric == "ip":
        s = q @ x.T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    else:
        s = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        order = np.argsort(s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), ids[order]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_search_matches_brute_force(metric):
    rng = np.random.default_rng(0)
    x, q = unit(rng, 500, 24), unit(rng, 20, 24)
    ids = rng.permutation(10_000)[:500].astype(np.int64)
    index = VectorIndex(24, metric=metric, use_gpu=False)
    index.add(x, ids)
    assert len(index) == 500 and index.kind == "flat"
    scores, found = index.search(q, 7)
    exp_scores, exp_ids = brute(x, ids, q, 7, metric)
    assert scores.dtype == np.float32 and found.dtype == np.int64
    np.testing.assert_array_equal(found, exp_ids)
    np.testing.assert_allclose(scores, exp_scores, rtol=1e-4, atol=1e-5)


def test_single_query_vector_and_default_ids():
    rng = np.random.default_rng(1)
    x = unit(rng, 10, 8)
    index = VectorIndex(8, use_gpu=False)
    assert index.add(x[:5]).tolist() == [0, 1, 2, 3, 4]
    assert index.add(x[5:]).tolist() == [5, 6, 7, 8, 9]
    scores, ids = index.search(x[3], 1)
    assert scores.shape == (1, 1) and ids[0, 0] == 3
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_padding_when_k_exceeds_size():
    rng = np.random.default_rng(2)
    x = unit(rng, 3, 16)
    for metric, fill in (("ip", -np.inf), ("l2", np.inf)):
        index = VectorIndex(16, metric=metric, use_gpu=False)
        scores, ids = index.search(x, 4)  # empty index
        assert (ids == -1).all() and (scores == fill).all()
        index.add(x, [10, 11, 12])
        scores, ids = index.search(x, 5)
        assert scores.shape == ids.shape == (3, 5)
        assert (ids[:, 3:] == -1).all() and (scores[:, 3:] == fill).all()
        assert sorted(ids[0, :3].tolist()) == [10, 11, 12]
        assert np.isfinite(scores[:, :3]).all()
        assert index.search(x, 0)[1].shape == (3, 0)


def test_input_errors():
    index = VectorIndex(16, use_gpu=False)
    index.add(np.eye(16, dtype=np.float32)[:4], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="dimension 8.*dim 16"):
        index.search(np.zeros((2, 8), np.float32), 3)
    with pytest.raises(ValueError, match="dimension 8.*dim 16"):
        index.add(np.zeros((2, 8), np.float32), [7, 8])
    with pytest.raises(ValueError, match=r"already in the index.*\[3\]"):
        index.add(np.ones((2, 16), np.float32), [3, 9])
    with pytest.raises(ValueError, match=r"duplicate ids within this add: \[5\]"):
        index.add(np.ones((2, 16), np.float32), [5, 5])
    with pytest.raises(ValueError, match="2 vectors but 1 ids"):
        index.add(np.ones((2, 16), np.float32), [5])
    with pytest.raises(ValueError, match=">= 0"):
        index.add(np.ones((1, 16), np.float32), [-3])
    with pytest.raises(TypeError, match="integers"):
        index.add(np.ones((1, 16), np.float32), [1.5])
    with pytest.raises(ValueError, match="row 1 contains NaN"):
        index.search(np.array([[0] * 16, [np.nan] * 16], np.float32), 1)
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.zeros((1, 16), np.float32), -1)
    assert len(index) == 4  # failed adds changed nothing


def test_flat_remove_and_reconstruct():
    rng = np.random.default_rng(3)
    x = unit(rng, 50, 12)
    ids = np.arange(100, 150)
    index = VectorIndex(12, use_gpu=False)
    index.add(x, ids)
    np.testing.assert_array_equal(index.reconstruct([120, 100]), x[[20, 0]])
    assert index.remove([120, 121, 999]) == 2  # unknown ids are ignored
    assert len(index) == 48 and 120 not in index and 122 in index
    _, found = index.search(x[[20, 21]], 1)
    assert 120 not in found and 121 not in found
    with pytest.raises(KeyError, match="120"):
        index.reconstruct([120])
    index.add(x[[20]], [120])  # a removed id can be added again
    assert index.search(x[[20]], 1)[1][0, 0] == 120


def test_switches_to_hnsw_and_agrees_with_exact():
    rng = np.random.default_rng(4)
    dim, n = 32, 4000
    x, q = unit(rng, n, dim), unit(rng, 100, dim)
    ids = np.arange(n, dtype=np.int64) * 3
    hnsw = VectorIndex(dim, exact_threshold=1000, hnsw_m=16, ef_search=128, use_gpu=False)
    hnsw.add(x[:800], ids[:800])
    assert hnsw.kind == "flat"
    hnsw.add(x[800:], ids[800:])  # crosses the threshold: rebuilt as HNSW, nothing lost
    assert hnsw.kind == "hnsw" and len(hnsw) == n
    exact = VectorIndex(dim, exact_threshold=10**9, use_gpu=False)
    exact.add(x, ids)
    assert exact.kind == "flat"
    _, truth = exact.search(q, 10)
    _, found = hnsw.search(q, 10)
    assert recall(found, truth) >= 0.95
    np.testing.assert_array_equal(np.sort(hnsw.ids), np.sort(ids))


def test_hnsw_removal_filters_then_compacts():
    rng = np.random.default_rng(5)
    dim, n = 16, 600
    x = unit(rng, n, dim)
    index = VectorIndex(dim, exact_threshold=100, hnsw_m=16, use_gpu=False, compact_fraction=0.25)
    index.add(x, np.arange(n))
    assert index.kind == "hnsw"
    gone = np.arange(0, 100)
    assert index.remove(gone) == 100
    assert len(index) == 500 and index.deleted_ids.tolist() == gone.tolist()
    assert index.remove(gone) == 0  # already removed
    scores, found = index.search(x[:100], 10)  # each query's own vector is deleted
    assert not np.isin(found, gone).any()
    assert (found >= 0).all() and np.isfinite(scores).all()  # still k real results
    with pytest.raises(KeyError):
        index.reconstruct([5])
    # removing a deleted id again then re-adding it replaces the stale vector
    index.add(x[[5]] * -1, [5])
    assert len(index) == 501 and not index.deleted_ids.size
    np.testing.assert_allclose(index.reconstruct([5])[0], -x[5])
    # past compact_fraction of the stored vectors, the index is rebuilt without them
    index.remove(np.arange(100, 260))
    assert index.deleted_ids.size == 0 and len(index) == 341
    assert index.search(x[100:260], 1)[1].min() >= 0
    assert not np.isin(index.search(x[100:260], 5)[1], np.arange(100, 260)).any()


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    rng = np.random.default_rng(6)
    dim, n = 20, 400
    x, q = unit(rng, n, dim), unit(rng, 30, dim)
    threshold = 10**6 if kind == "flat" else 50
    index = VectorIndex(dim, metric="ip", exact_threshold=threshold, hnsw_m=8, ef_search=40, use_gpu=False)
    index.add(x, np.arange(n) + 1000)
    index.remove([1000, 1001, 1002])
    before = index.search(q, 8)
    path = index.save(tmp_path / "idx")
    assert path.name == "index.faiss"
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["kind"] == kind and meta["dim"] == dim and meta["metric"] == "ip"
    assert meta["deleted_ids"] == ([1000, 1001, 1002] if kind == "hnsw" else [])
    loaded = VectorIndex.load(tmp_path / "idx", use_gpu=False)
    assert loaded.kind == kind and len(loaded) == n - 3 and loaded.ef_search == 40
    after = loaded.search(q, 8)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(loaded.reconstruct([1100]), x[[100]])
    loaded.add(x[:1], [1])  # the loaded index is live
    assert len(loaded) == n - 2
    # a single .faiss file path works too
    index.save(tmp_path / "one.faiss")
    assert (tmp_path / "one.faiss.json").is_file()
    assert len(VectorIndex.load(tmp_path / "one.faiss", use_gpu=False)) == n - 3


def test_load_rejects_mismatch(tmp_path):
    index = VectorIndex(4, use_gpu=False)
    index.add(np.eye(4, dtype=np.float32), [0, 1, 2, 3])
    index.save(tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    meta["dim"] = 8
    (tmp_path / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="dim 4 .sidecar says 8"):
        VectorIndex.load(tmp_path, use_gpu=False)
    with pytest.raises(FileNotFoundError, match="missing"):
        VectorIndex.load(tmp_path / "nothing", use_gpu=False)


def test_topk_helper():
    rng = np.random.default_rng(7)
    s = rng.standard_normal((5, 40))
    vals, idx = topk(s, 6)
    exp = np.argsort(-s, axis=1)[:, :6]
    np.testing.assert_array_equal(idx, exp)
    np.testing.assert_array_equal(vals, np.take_along_axis(s, exp, 1))
    vals, idx = topk(s[0], 3, largest=False)
    np.testing.assert_array_equal(idx, np.argsort(s[0])[:3])
    assert topk(s, 100)[1].shape == (5, 40)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_torch_search_path_matches_faiss(metric):
    """The GPU branch's exact torch matmul + topk, run on the CPU here."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    dim, n = 32, 800
    x, q = unit(rng, n, dim), unit(rng, 25, dim)
    ids = rng.permutation(5 * n)[:n].astype(np.int64)
    cpu = VectorIndex(dim, metric=metric, use_gpu=False)
    tor = VectorIndex(dim, metric=metric, use_gpu=False)
    tor._gpu_ok, tor._torch_device = True, "cpu"
    for index in (cpu, tor):
        index.add(x, ids)
        index.remove(ids[:10])
    s_cpu, i_cpu = cpu.search(q, 9)
    s_tor, i_tor = tor.search(q, 9)
    assert tor._gpu_data is not None  # the torch branch really ran
    np.testing.assert_array_equal(i_tor, i_cpu)
    np.testing.assert_allclose(s_tor, s_cpu, rtol=1e-4, atol=1e-5)
    tor.add(x[:1] * 0 + 1 / np.sqrt(dim), [10**6])  # a change invalidates the tensor copy
    assert tor._gpu_data is None
    assert 10**6 in tor.search(np.full((1, dim), 1 / np.sqrt(dim), np.float32), 1)[1]
    _, i_pad = tor.search(q[:2], n + 5)
    assert (i_pad[:, n - 9 :] == -1).all() and not np.isin(i_pad, ids[:10]).any()


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_gpu_search_matches_faiss(metric):
    rng = np.random.default_rng(8)
    dim, n = 64, 3000
    x, q = unit(rng, n, dim), unit(rng, 50, dim)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    cpu = VectorIndex(dim, metric=metric, use_gpu=False)
    gpu = VectorIndex(dim, metric=metric, use_gpu=True)
    for index in (cpu, gpu):
        index.add(x, ids)
        index.remove(ids[:10])
    s_cpu, i_cpu = cpu.search(q, 12)
    s_gpu, i_gpu = gpu.search(q, 12)
    assert recall(i_gpu, i_cpu) >= 0.99  # ties/rounding may swap a neighbour
    np.testing.assert_allclose(s_gpu, s_cpu, rtol=1e-3, atol=1e-4)
    s_pad, i_pad = gpu.search(q[:2], n + 5)  # padding on the GPU path too
    assert (i_pad[:, n - 10 :] == -1).all()
    assert not np.isin(i_pad, ids[:10]).any()
