"""Exact top-k without faiss: numpy over a score matrix, torch matmul over stored vectors.

Why this exists beside faiss: with a CUDA device, one matmul plus ``torch.topk`` over every live
vector is exact at any size and faster than faiss-cpu's HNSW, so :class:`VectorIndex` searches
that way when a GPU is present (keeping its faiss index for saving and reconstruction). Tests
run the same torch path on the CPU. :func:`topk` is the numpy counterpart for callers that
already hold a score matrix (argpartition, then a sort of only k entries per row).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

_GPU_SCORE_BUDGET = 2**28  # max query x vector scores held on the GPU at once (1 GiB fp32)


def topk(scores: np.ndarray, k: int, *, largest: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of a (n, m) (or (m,)) score matrix: (values, indices), best first; k is clipped to m."""
    s = np.asarray(scores)
    one = s.ndim == 1
    s2 = s[None, :] if one else s
    if s2.ndim != 2:
        raise ValueError(f"scores must be 1-D or 2-D, got shape {s.shape}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    k = min(k, s2.shape[1])
    key = -s2 if largest else s2
    if k == 0:
        idx = np.zeros((s2.shape[0], 0), dtype=np.int64)
    else:
        part = np.argpartition(key, k - 1, axis=1)[:, :k] if k < s2.shape[1] else np.tile(np.arange(s2.shape[1]), (s2.shape[0], 1))
        order = np.argsort(np.take_along_axis(key, part, axis=1), axis=1, kind="stable")
        idx = np.take_along_axis(part, order, axis=1).astype(np.int64)
    vals = np.take_along_axis(s2, idx, axis=1)
    return (vals[0], idx[0]) if one else (vals, idx)


def cuda_present(*, required: bool = False) -> bool:
    """Whether torch sees a CUDA device; ``required`` (``use_gpu=True``) raises RuntimeError if not.

    Where no NVIDIA driver is installed torch is not imported to ask: that costs seconds of start-up.
    """
    if not required and "torch" not in sys.modules and not Path("/proc/driver/nvidia/version").exists():
        return False
    try:
        import torch
    except ImportError:
        if required:
            raise RuntimeError("use_gpu=True needs torch with CUDA") from None
        return False
    if required and not torch.cuda.is_available():
        raise RuntimeError("use_gpu=True but torch.cuda.is_available() is False")
    return bool(torch.cuda.is_available())


def to_device(ids: np.ndarray, vectors: np.ndarray, device: str) -> tuple[Any, Any, Any]:
    """(vectors, ids, squared norms) as torch tensors on ``device``, for :func:`torch_search`."""
    import torch

    v = torch.from_numpy(vectors).to(device)
    return v, torch.from_numpy(ids).to(device), (v * v).sum(1)


def torch_search(data: tuple[Any, Any, Any], q: np.ndarray, k: int, *, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k ids of ``data`` (from :func:`to_device`) for each query row: scores = q @ V^T
    (``largest``: inner product) or |q|^2 - 2 q.v + |v|^2 (squared L2), queries in chunks."""
    import torch

    v, ids_t, v_sq = data
    out_s = np.empty((len(q), k), dtype=np.float32)
    out_i = np.empty((len(q), k), dtype=np.int64)
    step = max(1, _GPU_SCORE_BUDGET // len(ids_t))
    with torch.no_grad():
        for s in range(0, len(q), step):
            qt = torch.from_numpy(q[s : s + step]).to(v.device)
            sc = qt @ v.T
            if not largest:
                sc = ((qt * qt).sum(1, keepdim=True) - 2 * sc + v_sq[None, :]).clamp_min_(0)
            vals, pos = torch.topk(sc, k, dim=1, largest=largest, sorted=True)
            out_s[s : s + step] = vals.cpu().numpy()
            out_i[s : s + step] = ids_t[pos].cpu().numpy()
    return out_s, out_i
