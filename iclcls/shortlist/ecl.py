"""Gaussian external continual learner (InCA): class means + one shared covariance, in float64 sums.

Per class we keep the count ``n_c`` and the sum ``s_c`` of its inputs' vectors; globally
``S = sum x x^T`` and ``M = sum_c s_c s_c^T / n_c``. Then ``mu_c = s_c / n_c`` and the pooled
within-class covariance ``Sigma = (S - M) / (N - C)`` are exact under any order of arrival,
and an update costs O(d^2) per touched class (``M`` is updated only in the touched terms),
whatever the number of classes. ``Sigma`` is shrunk toward ``(trace/d) I`` (by default with
the OAS coefficient, which adapts to the examples per class; or a fixed ridge / Ledoit-Wolf
coefficient) and whitened by
``W = Sigma^(-1/2)`` (eigh), so the Mahalanobis distance is a Euclidean one: the vector
index holds ``W mu_c`` (metric "l2") and a shortlist over 10^5 classes is one faiss search
of ``W q``. Scores are negative squared Mahalanobis distances (higher is better).

``rewhiten="deferred"`` (the default: additions happen online, and their cost must not grow
with the classes before them) whitens only the touched classes with the current ``W`` and
re-whitens everything when ``Sigma`` has drifted by more than ``drift_tol`` (relative
Frobenius norm, 5% by default: the bound on how stale ``W`` may be), on
:meth:`GaussianECL.rewhiten_all`, after ``fit`` and before saving. Between re-whitenings a
shortlist uses a ``W`` within that drift of the exact one. ``"eager"`` recomputes ``W`` and
every whitened mean whenever ``Sigma`` changes (O(C d^2) per update: 97 s per class at 10^5
classes), for studies that need every shortlist exact.

Input: the text's embedding (``input="text"``), or the mean embedding of LLM-written tags
(``input="tags"``, InCA's setting): training examples carry their tags in
``metadata["tags"]`` (the classifier's ``infer="tags"`` stage writes them at fit), queries
carry them as the Infer stage's guesses. The statistics and the shortlister share one module
(~430 lines): the shortlister's update rules are the statistics' invariants.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from iclcls.index import VectorIndex
from iclcls.pool import Pool
from iclcls.shortlist.base import SHORTLISTERS, BaseShortlister
from iclcls.types import Candidates, Query

STATE_FORMAT = "iclcls.GaussianECL"
STATE_VERSION = 1
TAGS_KEY = "tags"


class GaussianStats:
    """Float64 sufficient statistics of a shared-covariance Gaussian per class.

    Rows are class ids (0..n_rows-1); buffers grow by doubling, so adding a class costs
    O(d^2), not O(C d).
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self._counts = np.zeros(0, dtype=np.float64)
        self._sums = np.zeros((0, self.dim), dtype=np.float64)
        self.n_rows = 0
        self.n_total = 0.0  # N: (example, label) pairs
        self.n_classes = 0  # C: classes with count > 0
        self.outer = np.zeros((self.dim, self.dim), dtype=np.float64)  # S = sum x x^T
        self.between = np.zeros((self.dim, self.dim), dtype=np.float64)  # M = sum_c s_c s_c^T / n_c

    @property
    def counts(self) -> np.ndarray:
        return self._counts[: self.n_rows]

    @property
    def sums(self) -> np.ndarray:
        return self._sums[: self.n_rows]

    def _grow(self, rows: int) -> None:
        if rows <= len(self._counts):
            self.n_rows = max(self.n_rows, rows)
            return
        cap = max(rows, 2 * len(self._counts), 16)
        counts = np.zeros(cap, dtype=np.float64)
        sums = np.zeros((cap, self.dim), dtype=np.float64)
        counts[: self.n_rows] = self.counts
        sums[: self.n_rows] = self.sums
        self._counts, self._sums = counts, sums
        self.n_rows = rows

    def add(self, vectors: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
        """Add vectors (n, d) with integer class ids (n,); return the touched class ids (sorted)."""
        x = np.asarray(vectors, dtype=np.float64)
        y = np.asarray(class_ids, dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {x.shape}")
        if y.shape != (len(x),):
            raise ValueError(f"got {len(x)} vectors but class ids of shape {y.shape}")
        if not len(x):
            return np.zeros(0, dtype=np.int64)
        if (y < 0).any():
            raise ValueError("class ids must be >= 0")
        if not np.isfinite(x).all():
            raise ValueError(f"vector row {int(np.argwhere(~np.isfinite(x))[0, 0])} contains NaN or inf")
        self._grow(int(y.max()) + 1)
        touched, inverse = np.unique(y, return_inverse=True)
        part = np.zeros((len(touched), self.dim), dtype=np.float64)
        np.add.at(part, inverse, x)
        add_n = np.bincount(inverse, minlength=len(touched)).astype(np.float64)
        old_n = self._counts[touched].copy()
        old_s = self._sums[touched].copy()
        had = old_n > 0
        if had.any():
            a = old_s[had] / np.sqrt(old_n[had])[:, None]
            self.between -= a.T @ a
        new_n = old_n + add_n
        new_s = old_s + part
        self._counts[touched] = new_n
        self._sums[touched] = new_s
        b = new_s / np.sqrt(new_n)[:, None]
        self.between += b.T @ b
        self.outer += x.T @ x
        self.n_total += float(len(x))
        self.n_classes += int((~had).sum())
        return touched

    def recompute_between(self) -> None:
        """``M`` from the sums in one product (after loading; exact, no drift)."""
        n = self.counts
        live = n > 0
        b = self.sums[live] / np.sqrt(n[live])[:, None]
        self.between = b.T @ b
        self.n_classes = int(live.sum())
        self.n_total = float(n.sum())

    def means(self, ids: np.ndarray | None = None) -> np.ndarray:
        ids = np.flatnonzero(self.counts > 0) if ids is None else np.asarray(ids, dtype=np.int64)
        return self._sums[ids] / self._counts[ids][:, None]

    def covariance(self) -> np.ndarray:
        """The pooled within-class covariance ``(S - M) / (N - C)`` (zeros if N <= C)."""
        dof = self.n_total - self.n_classes
        if dof <= 0:
            return np.zeros((self.dim, self.dim), dtype=np.float64)
        cov = np.subtract(self.outer, self.between)
        cov /= dof
        return cov


def oas_coefficient(cov: np.ndarray, n: float) -> float:
    """The Oracle Approximating Shrinkage coefficient (Chen et al. 2010, as scikit-learn computes it)
    for ``n`` degrees of freedom.

    A function of ``Sigma`` and ``n`` alone, so it is as order-invariant as they are; it falls
    from ~0.3 at 5 examples per class to ~0.02 at 100 (all-MiniLM-L6-v2, CLINC150).
    """
    p = cov.shape[0]
    mu = float(np.trace(cov)) / p
    alpha = float(np.einsum("ij,ij->", cov, cov)) / (p * p)
    den = (n + 1.0) * (alpha - mu * mu / p)
    if n <= 0 or den <= 0:
        return 1.0
    return float(min(1.0, (alpha + mu * mu) / den))


def shrink(cov: np.ndarray, *, method: str, alpha: float | str, n: float = 0.0) -> np.ndarray:
    """Ridge ``Sigma + alpha (tr/d) I`` or Ledoit-Wolf-style ``(1-alpha) Sigma + alpha (tr/d) I``
    (``alpha="oas"``: the OAS coefficient for ``n`` degrees of freedom)."""
    d = cov.shape[0]
    scale = float(np.trace(cov)) / d
    if scale <= 0 or not np.isfinite(scale):  # no within-class spread yet: Euclidean distance
        return np.eye(d)
    alpha = oas_coefficient(cov, n) if alpha == "oas" else float(alpha)
    out = cov.copy() if method == "ridge" else cov * (1.0 - alpha)
    out[np.diag_indices(d)] += alpha * scale
    return out


def inverse_sqrt(cov: np.ndarray, *, floor: float = 1e-6) -> np.ndarray:
    """``Sigma^(-1/2)`` by eigh; eigenvalues below ``floor * tr/d`` are lifted to it."""
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    lo = floor * max(float(vals.mean()), 1e-300)
    vals = np.maximum(vals, lo)
    w = (vecs * (1.0 / np.sqrt(vals))) @ vecs.T
    return (w + w.T) / 2


@SHORTLISTERS.register("ecl")
class GaussianECL(BaseShortlister):
    """Shortlist by Mahalanobis distance to class means under a shared, shrunk covariance."""

    def __init__(
        self,
        *,
        input: str = "text",
        shrinkage: str = "ledoit_wolf",
        alpha: float | str = "oas",
        rewhiten: str = "deferred",
        drift_tol: float = 0.05,
        exact_threshold: int = 50_000,
    ) -> None:
        if input not in ("text", "tags"):
            raise ValueError(f"ecl input must be 'text' or 'tags', got {input!r}")
        if shrinkage not in ("ridge", "ledoit_wolf"):
            raise ValueError(f"ecl shrinkage must be 'ridge' or 'ledoit_wolf', got {shrinkage!r}")
        if alpha == "oas":
            if shrinkage != "ledoit_wolf":
                raise ValueError("ecl alpha='oas' (an automatic coefficient) goes with shrinkage='ledoit_wolf'")
        elif isinstance(alpha, str) or not alpha >= 0 or (shrinkage == "ledoit_wolf" and alpha > 1):
            raise ValueError(f"ecl alpha must be 'oas' or a number >= 0 (<= 1 for ledoit_wolf), got {alpha!r}")
        if rewhiten not in ("eager", "deferred"):
            raise ValueError(f"ecl rewhiten must be 'eager' or 'deferred', got {rewhiten!r}")
        if not drift_tol >= 0:
            raise ValueError(f"ecl drift_tol must be >= 0, got {drift_tol!r}")
        self.input = input
        self.shrinkage = shrinkage
        self.alpha = alpha
        self.rewhiten = rewhiten
        self.drift_tol = drift_tol
        self.exact_threshold = exact_threshold
        self.stats_: GaussianStats | None = None

    # -- the array-level core (no pool: used by the classifier stage and the benchmark) -------
    def reset(self, dim: int) -> GaussianStats:
        self.stats_ = st = GaussianStats(dim)
        self.whitener_ = np.eye(dim)
        self._whitener32 = np.eye(dim, dtype=np.float32)
        self.sigma_at_whiten_: np.ndarray | None = None
        self.index_ = VectorIndex(dim, metric="l2", exact_threshold=self.exact_threshold)
        self._slot_of = np.zeros(0, dtype=np.int64)  # class id -> index id (-1: not indexed)
        self._class_of_slot = np.zeros(0, dtype=np.int64)  # index id -> class id
        self._n_slots = 0
        self.stale_ = False  # classes whitened with an older W than the current Sigma's
        self.rewhitens_ = 0
        return st

    @property
    def _stats(self) -> GaussianStats:
        assert self.stats_ is not None, "fit the ECL first"  # reset() made them
        return self.stats_

    def fit_vectors(self, vectors: np.ndarray, class_ids: np.ndarray) -> GaussianECL:
        """Fit on arrays alone (no pool): statistics from scratch, then one full whitening."""
        self.reset(np.asarray(vectors).shape[1]).add(vectors, class_ids)
        self.rewhiten_all()
        return self

    def shrunk_covariance(self) -> np.ndarray:
        st = self._stats
        return shrink(st.covariance(), method=self.shrinkage, alpha=self.alpha, n=st.n_total - st.n_classes)

    def drift(self) -> float:
        """Relative Frobenius change of the shrunk covariance since the last full whitening."""
        if self.sigma_at_whiten_ is None:
            return float("inf")
        diff = self.shrunk_covariance()
        diff -= self.sigma_at_whiten_
        return float(np.linalg.norm(diff) / self._ref_norm)

    def add_vectors(self, vectors: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
        """Update the statistics and the index with labelled vectors; returns the touched class ids."""
        st = self.stats_ if self.stats_ is not None else self.reset(np.asarray(vectors).shape[1])
        touched = st.add(vectors, class_ids)
        if not len(touched):
            return touched
        if self.rewhiten == "eager" or self.sigma_at_whiten_ is None or self.drift() > self.drift_tol:
            self.rewhiten_all()
        else:
            self._upsert(touched)
            self.stale_ = True
        return touched

    def rewhiten_all(self) -> None:
        """Recompute ``W`` from the current covariance and rebuild the index of whitened means."""
        st = self._stats
        sigma = self.shrunk_covariance()
        self.whitener_ = inverse_sqrt(sigma)
        self._whitener32 = self.whitener_.astype(np.float32)
        self.sigma_at_whiten_ = sigma
        self._ref_norm = max(float(np.linalg.norm(sigma)), 1e-300)
        ids = np.flatnonzero(st.counts > 0)
        index = VectorIndex(st.dim, metric="l2", exact_threshold=self.exact_threshold)
        if len(ids):
            index.add(self._whiten(st.means(ids)), ids)
        self.index_ = index
        self._slot_of = np.full(max(st.n_rows, 1), -1, dtype=np.int64)
        self._slot_of[ids] = ids
        self._class_of_slot = np.arange(st.n_rows, dtype=np.int64)
        self._n_slots = st.n_rows
        self.stale_ = False
        self.rewhitens_ += 1

    def _whiten(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32) @ self._whitener32  # W is symmetric

    def _upsert(self, class_ids: np.ndarray) -> None:
        """Whiten the touched classes with the current W; replace their old entries (fresh ids)."""
        n_rows = self._stats.n_rows
        if len(self._slot_of) < n_rows:
            grown = np.full(max(n_rows, 2 * len(self._slot_of)), -1, dtype=np.int64)
            grown[: len(self._slot_of)] = self._slot_of
            self._slot_of = grown
        old = self._slot_of[class_ids]
        if (old >= 0).any():
            self.index_.remove(old[old >= 0])
        slots = np.arange(self._n_slots, self._n_slots + len(class_ids), dtype=np.int64)
        self._n_slots += len(class_ids)
        if len(self._class_of_slot) < self._n_slots:
            grown = np.zeros(max(self._n_slots, 2 * len(self._class_of_slot)), dtype=np.int64)
            grown[: len(self._class_of_slot)] = self._class_of_slot
            self._class_of_slot = grown
        self._class_of_slot[slots] = class_ids
        self._slot_of[class_ids] = slots
        self.index_.add(self._whiten(self._stats.means(class_ids)), slots)

    def search_vectors(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k classes per query row: (negative squared Mahalanobis distances, class ids; -1 = none)."""
        if self.stats_ is None:
            raise RuntimeError("the ECL has no statistics yet: fit it first")
        d2, slots = self.index_.search(self._whiten(vectors), k)
        ids = np.where(slots >= 0, self._class_of_slot[np.maximum(slots, 0)], -1)
        return -d2.astype(np.float64), ids

    # -- the shortlister stage -------------------------------------------------------------
    def _example_vectors(self, pool: Pool, ids: np.ndarray) -> np.ndarray:
        if self.input == "text":
            return pool.embeddings[ids]
        examples = [pool.examples[i] for i in ids]
        tags = []
        for i, ex in zip(ids, examples):
            t = ex.metadata.get(TAGS_KEY)
            if t is None:
                raise ValueError(
                    f"ecl input='tags': pool example {int(i)} ({ex.text[:40]!r}) has no metadata['tags']; "
                    "set infer='tags' on the classifier (it writes them at fit) or give the tags yourself"
                )
            tags.append([str(x) for x in t])
        flat = [x for ts in tags for x in ts]
        vecs = pool.embedder.encode(flat) if flat else np.zeros((0, pool.dim), dtype=np.float32)
        out = np.array(pool.embeddings[ids], dtype=np.float64)  # no tags written: the text stands in
        pos = 0
        for row, ts in enumerate(tags):
            if ts:
                out[row] = vecs[pos : pos + len(ts)].mean(axis=0)
            pos += len(ts)
        return out

    def _query_vectors(self, queries: Sequence[Query]) -> np.ndarray:
        if self.input == "text":
            return np.stack([q.embedding for q in queries])
        rows = []
        for q in queries:
            if q.guess_embeddings is None:
                raise ValueError("ecl input='tags' needs the classifier's Infer stage: set infer='tags'")
            g = np.asarray(q.guess_embeddings)
            rows.append(g.mean(axis=0) if len(g) else q.embedding)
        return np.stack(rows)

    def _pairs(self, pool: Pool, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One (vector, class id) row per (example, label) pair; class id = label-space index."""
        ids = np.asarray(ids, dtype=np.int64)
        vecs = self._example_vectors(pool, ids)
        rows, cls = [], []
        for r, i in enumerate(ids):
            for lab in pool.examples[i].labels:
                rows.append(r)
                cls.append(pool.labels.index(lab))
        return np.asarray(vecs)[np.asarray(rows, dtype=np.int64)], np.asarray(cls, dtype=np.int64)

    def fit(self, pool: Pool) -> GaussianECL:
        self.pool_ = pool
        st = self.reset(pool.dim)
        x, y = self._pairs(pool, np.arange(len(pool)))
        st.add(x, y)
        self.rewhiten_all()
        return self

    def update(self, pool: Pool, new_ids: np.ndarray) -> None:
        self.pool_ = pool
        self.add_vectors(*self._pairs(pool, new_ids))

    def shortlist(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        if not queries:
            return []
        scores, ids = self.search_vectors(self._query_vectors(queries), k)
        names = self.pool_.labels.labels
        out = []
        for s, row in zip(scores, ids):
            keep = row >= 0
            out.append(Candidates([names[i] for i in row[keep]], s[keep]))
        return out

    # -- persistence: the statistics themselves (no refit, no re-embedding) ---------------------
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Counts, sums and S (float64) + metadata; a deferred re-whitening is done first."""
        if self.stale_:
            self.rewhiten_all()
        st = self._stats
        meta = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "dim": st.dim,
            "n_total": st.n_total,
            "classes": list(self.pool_.labels.labels[: st.n_rows]),
            "options": {"input": self.input, "shrinkage": self.shrinkage, "alpha": self.alpha},
        }
        return meta, {"counts": st.counts.copy(), "sums": st.sums.copy(), "outer": st.outer.copy()}

    def load_state_dict(self, pool: Pool, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
            raise ValueError(f"ecl state: format {meta.get('format')!r} v{meta.get('version')!r} is not {STATE_FORMAT} v{STATE_VERSION}")
        missing = {"counts", "sums", "outer"} - set(arrays)
        if missing:
            raise ValueError(f"ecl state: missing arrays {sorted(missing)}")
        d, classes = int(meta["dim"]), list(meta["classes"])
        counts, sums, outer = (np.asarray(arrays[k], dtype=np.float64) for k in ("counts", "sums", "outer"))
        if counts.shape != (len(classes),) or sums.shape != (len(classes), d) or outer.shape != (d, d):
            raise ValueError(
                f"ecl state: shapes counts {counts.shape}, sums {sums.shape}, outer {outer.shape} "
                f"do not match {len(classes)} classes of dim {d}"
            )
        if list(pool.labels.labels[: len(classes)]) != classes:
            raise ValueError("ecl state: its class order differs from the pool's label space")
        self.pool_ = pool
        st = self.reset(d)
        st._grow(len(classes))
        st._counts[: len(classes)] = counts
        st._sums[: len(classes)] = sums
        st.outer = outer
        st.recompute_between()
        if abs(st.n_total - float(meta["n_total"])) > 1e-6:
            raise ValueError(f"ecl state: counts sum to {st.n_total}, metadata says {meta['n_total']}")
        self.rewhiten_all()
