"""VectorIndex: integer-keyed nearest-neighbour search over faiss, exact or HNSW by size.

Small collections (up to ``exact_threshold`` vectors) live in an exact
``IndexIDMap2(IndexFlatIP/L2)``. When an ``add`` takes the size past the threshold the
index is rebuilt once as ``IndexIDMap2(IndexHNSWFlat)`` and grows incrementally from
then on (it never switches back by itself; :meth:`VectorIndex.rebuild` re-decides).

Removal: the flat index removes vectors for real (``remove_ids``). faiss HNSW cannot
remove, so removed ids are *marked deleted* and filtered out inside the faiss search
with an ID selector (results stay exactly k long, no over-fetching needed); when
deleted ids exceed ``compact_fraction`` of the stored vectors, or a deleted id is added
again, the index is rebuilt from its live vectors (flat or HNSW by the new size).

With a CUDA device (``use_gpu="auto"`` and one present, or ``use_gpu=True``) search is
exact top-k by torch matmul instead (:mod:`iclcls.index.exact`); saving and loading with
checksums is :mod:`iclcls.index.persist`.

Scores: ``metric="ip"`` gives inner products (higher is better, cosine for unit
vectors); ``metric="l2"`` gives *squared* L2 distances (lower is better). Missing
results (k larger than the index) have id -1 and score -inf (ip) or +inf (l2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from iclcls.index.exact import cuda_present, to_device, torch_search
from iclcls.index.persist import parse_index, read_state, write_state

Metric = Literal["ip", "l2"]
_PROGRESS_MIN = 20_000  # HNSW inserts of more vectors than this show a progress bar


class VectorIndex:
    """Nearest-neighbour index with int64 ids: add, remove, search, reconstruct, save, load."""

    def __init__(
        self, dim: int, *, metric: Metric = "ip", exact_threshold: int = 50_000, hnsw_m: int = 32, ef_search: int = 128,
        ef_construction: int = 80, compact_fraction: float = 0.25, use_gpu: bool | Literal["auto"] = "auto",
    ) -> None:  # fmt: skip
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
        if exact_threshold < 0 or hnsw_m < 2 or ef_search < 1 or ef_construction < 1:
            raise ValueError("need exact_threshold >= 0, hnsw_m >= 2, ef_search >= 1, ef_construction >= 1")
        if use_gpu not in (True, False, "auto"):
            raise ValueError(f"use_gpu must be True, False or 'auto', got {use_gpu!r}")
        self.dim = int(dim)
        self.metric: Metric = metric
        self.exact_threshold = int(exact_threshold)
        self.hnsw_m = int(hnsw_m)
        self.ef_construction = int(ef_construction)
        self.compact_fraction = float(compact_fraction)
        self.use_gpu = use_gpu
        self._ef_search = int(ef_search)
        self._gpu_ok: bool | None = None if use_gpu == "auto" else bool(use_gpu)
        if use_gpu is True:
            cuda_present(required=True)
        self._gpu_data: Any = None  # (vectors, ids, sq_norms) torch tensors; rebuilt on change
        self._torch_device = "cuda"  # tests run the same torch path on "cpu"
        self._deleted: set[int] = set()
        self._kind = "flat"
        self._index = self._new_index("flat")

    # ---------------------------------------------------------------- state
    @property
    def kind(self) -> str:
        """ "flat" (exact) or "hnsw"."""
        return self._kind

    @property
    def ef_search(self) -> int:
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._ef_search = int(value)
        if self._kind == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = self._ef_search  # type: ignore[attr-defined]  # faiss stubs: downcast_index returns faiss.Index

    @property
    def deleted_ids(self) -> np.ndarray:
        """Ids removed from an HNSW index but still stored in it (filtered from results)."""
        return np.array(sorted(self._deleted), dtype=np.int64)

    @property
    def ids(self) -> np.ndarray:
        """Live ids in storage order."""
        ids = self._stored_ids()
        return ids[~np.isin(ids, self.deleted_ids)] if self._deleted else ids

    def __len__(self) -> int:
        return int(self._index.ntotal) - len(self._deleted)

    def __contains__(self, id_: object) -> bool:
        if not isinstance(id_, (int, np.integer)) or int(id_) in self._deleted:
            return False
        return bool(np.isin(int(id_), self._stored_ids()))

    def __repr__(self) -> str:
        return f"VectorIndex(dim={self.dim}, metric={self.metric!r}, kind={self._kind!r}, n={len(self)})"

    # ---------------------------------------------------------------- build
    def _new_index(self, kind: str) -> Any:
        if kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim))
        if kind != "hnsw":
            raise ValueError(f"index kind must be 'flat' or 'hnsw', got {kind!r}")
        inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2)
        inner.hnsw.efConstruction = self.ef_construction
        inner.hnsw.efSearch = self._ef_search
        return faiss.IndexIDMap2(inner)

    def _build(self, kind: str, vectors: np.ndarray, ids: np.ndarray) -> None:
        index = self._new_index(kind)
        self._add_to(index, kind, vectors, ids)
        self._index, self._kind, self._deleted = index, kind, set()
        self._gpu_data = None
        self._max_id: tuple[int, int, int] | None = None  # a new faiss object may reuse the old one's id()

    @staticmethod
    def _add_to(index: Any, kind: str, vectors: np.ndarray, ids: np.ndarray) -> None:
        n = len(ids)
        if kind != "hnsw" or n <= _PROGRESS_MIN:
            if n:
                index.add_with_ids(vectors, ids)
            return
        from tqdm.auto import tqdm

        step = 10_000
        with tqdm(total=n, desc="HNSW build", unit="vec", leave=False) as bar:
            for s in range(0, n, step):
                index.add_with_ids(vectors[s : s + step], ids[s : s + step])
                bar.update(min(step, n - s))

    def _stored_ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of every live entry, in storage order (a copy)."""
        n = int(self._index.ntotal)
        ids = self._stored_ids()
        if n == 0:
            return ids, np.zeros((0, self.dim), dtype=np.float32)
        vecs = faiss.downcast_index(self._index.index).reconstruct_n(0, n)
        if self._deleted:
            keep = ~np.isin(ids, self.deleted_ids)
            ids, vecs = ids[keep], vecs[keep]
        return ids, vecs

    def rebuild(self, kind: str | None = None) -> None:
        """Rebuild from the live vectors (drops deleted ones); ``kind`` None re-decides by size."""
        ids, vecs = self.all_vectors()
        if kind is None:
            kind = "hnsw" if len(ids) > self.exact_threshold else "flat"
        self._build(kind, vecs, ids)

    # ---------------------------------------------------------------- input checks
    def _matrix(self, x: Any, what: str) -> np.ndarray:
        a = np.asarray(x, dtype=np.float32)
        if a.ndim == 1 and what == "queries":
            a = a[None, :]
        if a.ndim != 2:
            raise ValueError(f"{what} must be a 2-D (n, {self.dim}) array, got shape {a.shape}")
        if a.shape[1] != self.dim:
            raise ValueError(f"{what} have dimension {a.shape[1]}, but the index has dim {self.dim}")
        if a.size and not np.isfinite(a).all():
            bad = int(np.argwhere(~np.isfinite(a))[0, 0])
            raise ValueError(f"{what} row {bad} contains NaN or inf")
        return np.ascontiguousarray(a)

    @staticmethod
    def _id_array(ids: Any, what: str = "ids") -> np.ndarray:
        a = np.asarray(ids)
        if a.ndim == 0:
            a = a[None]
        if a.size == 0:
            return np.zeros(0, dtype=np.int64)
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{what} must be a 1-D array of integers, got {a.dtype} shape {a.shape}")
        return a.astype(np.int64)

    # ---------------------------------------------------------------- mutate
    def add(self, vectors: Any, ids: Any = None) -> np.ndarray:
        """Add (n, dim) vectors under int64 ``ids`` (default: after the largest id); returns the ids.

        Ids must be >= 0 and new: a duplicate (within the batch or already stored) is an error.
        """
        x = self._matrix(vectors, "vectors")
        n = len(x)
        prev_max = self._max_stored_id()
        ids = self._id_array(np.arange(prev_max + 1, prev_max + 1 + n) if ids is None else ids)
        if len(ids) != n:
            raise ValueError(f"got {n} vectors but {len(ids)} ids")
        if n == 0:
            return ids
        if (ids < 0).any():
            raise ValueError(f"ids must be >= 0 (-1 marks a missing result); got {int(ids.min())}")
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"duplicate ids within this add: {uniq[counts > 1][:10].tolist()}")
        # Ids above every stored one (the usual append) cannot clash: no O(stored) check.
        clash = ids[:0] if int(ids.min()) > prev_max else ids[np.isin(ids, self._stored_ids())]
        if len(clash):
            live = [int(i) for i in clash if int(i) not in self._deleted]
            if live:
                raise ValueError(f"{len(live)} ids are already in the index (e.g. {live[:10]}); remove them first")
            self.rebuild(self._kind)  # re-adding a deleted HNSW id: drop the stale vector first
        if self._kind == "flat" and int(self._index.ntotal) + n > self.exact_threshold:
            old_ids, old_vecs = self.all_vectors()
            self._build("hnsw", np.concatenate([old_vecs, x]), np.concatenate([old_ids, ids]))
        else:
            self._add_to(self._index, self._kind, x, ids)
            self._gpu_data = None
        self._max_id = (id(self._index), int(self._index.ntotal), max(prev_max, int(ids.max())))
        return ids

    def _max_stored_id(self) -> int:
        """The largest stored id (-1 when empty), cached while the faiss index is the same object
        holding the same number of vectors (every other change recomputes it)."""
        key = (id(self._index), int(self._index.ntotal))
        cached = getattr(self, "_max_id", None)
        if cached is None or cached[:2] != key:
            stored = self._stored_ids()
            cached = self._max_id = (*key, int(stored.max()) if len(stored) else -1)
        return cached[2]

    def remove(self, ids: Any) -> int:
        """Remove ids (unknown ones are ignored); returns how many were removed."""
        ids = self._id_array(ids)
        if len(ids) == 0 or len(self) == 0:
            return 0
        ids = np.unique(ids)
        present = ids[np.isin(ids, self._stored_ids())]
        present = np.array([i for i in present.tolist() if i not in self._deleted], dtype=np.int64)
        if len(present) == 0:
            return 0
        if self._kind == "flat":
            self._index.remove_ids(present)
        else:
            self._deleted.update(present.tolist())
            if len(self._deleted) > self.compact_fraction * self._index.ntotal:
                self.rebuild()
        self._gpu_data = None
        return len(present)

    def reconstruct(self, ids: Any) -> np.ndarray:
        """The stored vectors of ``ids``, as an (n, dim) array; KeyError for unknown ids."""
        ids = self._id_array(ids)
        if len(ids) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        missing = ids[~np.isin(ids, self._stored_ids())].tolist()
        missing += [i for i in ids.tolist() if i in self._deleted]
        if missing:
            raise KeyError(f"ids not in the index: {sorted(set(missing))[:10]}")
        return self._index.reconstruct_batch(ids)

    # ---------------------------------------------------------------- search
    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for each query row: (scores float32 (nq, k), ids int64 (nq, k)), best first."""
        q = self._matrix(queries, "queries")
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        k = int(k)
        nq, n = len(q), len(self)
        fill = -np.inf if self.metric == "ip" else np.inf
        scores = np.full((nq, k), fill, dtype=np.float32)
        labels = np.full((nq, k), -1, dtype=np.int64)
        kk = min(k, n)
        if kk == 0 or nq == 0:
            return scores, labels
        if self._gpu_ok is None:  # "auto": decided once, on first search
            self._gpu_ok = cuda_present()
        if self._gpu_ok:
            if self._gpu_data is None:  # a tensor copy of the live vectors, dropped on every change
                self._gpu_data = to_device(*self.all_vectors(), self._torch_device)
            s, i = torch_search(self._gpu_data, q, kk, largest=self.metric == "ip")
        else:
            s, i = self._search_faiss(q, kk)
        scores[:, :kk], labels[:, :kk] = s, i
        scores[labels < 0] = fill
        return scores, labels

    def _search_faiss(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self._deleted:
            return self._index.search(q, k)
        # Filter deleted ids inside the HNSW traversal; keep the selectors alive meanwhile.
        batch = faiss.IDSelectorBatch(self.deleted_ids)
        sel = faiss.IDSelectorNot(batch)
        params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(self._ef_search, k))  # type: ignore[attr-defined]  # missing from faiss stubs
        out = self._index.search(q, k, params=params)
        del params, sel, batch
        return out

    # ---------------------------------------------------------------- persist
    def save(self, path: str | Path) -> Path:
        """Write ``<dir>/index.faiss`` + ``<dir>/index.json`` (or ``x.faiss`` + ``x.faiss.json``).

        Both writes are atomic; the JSON sidecar is written last. Returns the faiss file.
        """
        return write_state(path, self._index, {
            "dim": self.dim, "metric": self.metric, "kind": self._kind,
            "exact_threshold": self.exact_threshold, "hnsw_m": self.hnsw_m, "ef_search": self._ef_search,
            "ef_construction": self.ef_construction, "compact_fraction": self.compact_fraction,
            "deleted_ids": sorted(self._deleted),
        })  # fmt: skip

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        use_gpu: bool | Literal["auto"] = "auto",
        require_checksum: bool = False,
        rebuild_from: np.ndarray | None = None,
    ) -> VectorIndex:
        """Read an index written by :meth:`save` (faiss binary + JSON; nothing is executed).

        Only bytes whose size and SHA-256 match the sidecar are parsed; ``require_checksum`` refuses a
        sidecar without them (an older or hand-made state). ``rebuild_from`` (the vectors, ids 0..n-1,
        as a pool keeps them) rebuilds the index as recorded, without the deleted ids, instead of
        parsing the bytes at all: for untrusted states (see :mod:`iclcls.index.persist`).
        """
        saved = read_state(path, require_checksum=require_checksum)
        obj = cls(**saved.settings, use_gpu=use_gpu)
        if rebuild_from is None:
            obj._index, obj._kind, obj._deleted = parse_index(saved), saved.kind, saved.deleted
        else:  # untrusted: never parse the bytes, rebuild (flat or HNSW) from the vectors
            vectors, n = np.asarray(rebuild_from, dtype=np.float32), saved.ntotal
            if vectors.ndim != 2 or len(vectors) != n or (n and vectors.shape[1] != obj.dim):
                raise ValueError(f"{saved.meta_file}: {n} vectors of dim {obj.dim}, but {vectors.shape} given to rebuild from")
            ids = np.arange(n, dtype=np.int64)
            live = ~np.isin(ids, np.fromiter(saved.deleted, dtype=np.int64, count=len(saved.deleted)))
            obj._build(saved.kind, np.ascontiguousarray(vectors[live]), ids[live])
        obj.ef_search = obj._ef_search
        return obj
