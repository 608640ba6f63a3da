"""DPP demonstrations (CEIL without training; Ye et al. 2023): relevant AND diverse sets.

For each query, the top ``candidates`` pool examples by relevance ``r_i = (cos(query, i) + 1) / 2``
form the kernel ``L = diag(q) S diag(q)`` with ``q_i = exp(r_i / (2 lambda))`` and
``S_ij = (cos_ij + 1) / 2``; so ``log det L_Y = sum_{i in Y} r_i / lambda + log det S_Y``:
a small ``lambda`` favours relevance, a large one diversity. Greedy MAP inference with
incremental Cholesky updates (Chen et al. 2018) adds the item with the largest marginal
gain ``det(L_{Y+j}) / det(L_Y)`` until k are chosen or the best gain is not positive
(near-duplicates give zero gains, and NaN square roots without this guard); nothing is
filled in after that. The chosen set is ordered by relevance (``ascending``: the most
relevant next to the query, as kNN's default).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from iclcls.pool import Pool
from iclcls.select.base import SELECTORS, BaseSelector, order_by_similarity
from iclcls.types import Candidates, Query


def dpp_kernel(relevance: np.ndarray, embeddings: np.ndarray, *, lam: float) -> np.ndarray:
    """``L = diag(q) S diag(q)``; ``q`` is scaled so that its largest entry is 1 (same argmaxes, no overflow)."""
    r = np.asarray(relevance, dtype=np.float64)
    e = np.asarray(embeddings, dtype=np.float64)
    q = np.exp((r - r.max()) / (2.0 * lam)) if len(r) else r
    sim = (e @ e.T + 1.0) / 2.0
    return q[:, None] * sim * q[None, :]


def greedy_map(kernel: np.ndarray, k: int, *, min_gain: float = 1e-9) -> list[int]:
    """Fast greedy MAP of a DPP (Chen et al. 2018): rows of ``kernel`` in the order chosen.

    ``d2[j]`` is the marginal gain ``det(L_{Y+j}) / det(L_Y)`` (a Schur complement), kept up to
    date with one Cholesky row per step. Selection stops when the best gain is not positive:
    ``<= min_gain * L_jj``, i.e. relative to the item's own weight, so that rounding noise on
    a duplicate counts as zero while a distinct but much less relevant item (tiny ``L_jj``
    under a small lambda) still counts.
    """
    n = kernel.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return []
    c = np.zeros((k, n), dtype=np.float64)
    d2 = np.diag(kernel).astype(np.float64).copy()
    chosen: list[int] = []
    j = int(np.argmax(d2))
    while True:
        gain = d2[j]
        if not np.isfinite(gain) or gain <= min_gain * kernel[j, j] or gain <= 0.0:
            break
        chosen.append(j)
        if len(chosen) == k:
            break
        s = len(chosen) - 1
        e = (kernel[j] - c[:s, j] @ c[:s]) / np.sqrt(gain)
        c[s] = e
        d2 = d2 - e * e
        d2[chosen] = -np.inf
        j = int(np.argmax(d2))
    return chosen


def top_by_relevance(sims: np.ndarray, allowed: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` most similar positions (optionally among ``allowed``), best first, and their cosines."""
    ids = np.arange(len(sims)) if allowed is None else np.asarray(allowed, dtype=np.int64)
    s = sims[ids]
    n = min(n, len(ids))
    if n <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    part = np.argpartition(-s, n - 1)[:n] if n < len(ids) else np.arange(len(ids))
    part = part[np.argsort(-s[part], kind="stable")]
    return ids[part], s[part]


@SELECTORS.register("dpp")
class DPPSelector(BaseSelector):
    """Relevance-diversity DPP over the top ``candidates`` examples; ``lam`` trades them off."""

    def __init__(
        self,
        *,
        lam: float = 0.05,
        candidates: int = 100,
        order: str = "ascending",
        restrict_to_candidates: bool = True,
        min_gain: float = 1e-9,
    ) -> None:
        if lam <= 0:
            raise ValueError(f"dpp lam (lambda) must be > 0, got {lam}")
        if candidates < 1:
            raise ValueError(f"dpp candidates must be >= 1, got {candidates}")
        order_by_similarity([], [], order)
        self.lam = lam
        self.candidates = candidates
        self.order = order
        self.restrict_to_candidates = restrict_to_candidates
        self.min_gain = min_gain

    # Embedding spaces: the pool's own here; CEIL substitutes its trained one.
    def pool_vectors(self) -> np.ndarray:
        return self.pool_.embeddings

    def query_vectors(self, queries: Sequence[Query]) -> np.ndarray:
        return np.stack([np.asarray(x.embedding, dtype=np.float32) for x in queries])

    def select_one(self, sims: np.ndarray, allowed: np.ndarray | None, k: int) -> list[int]:
        """DPP MAP for one query, given its cosines to every pool example."""
        ids, cos = top_by_relevance(sims, allowed, self.candidates)
        if not len(ids):
            return []
        rel = (cos + 1.0) / 2.0
        kernel = dpp_kernel(rel, self.pool_vectors()[ids], lam=self.lam)
        picked = greedy_map(kernel, k, min_gain=self.min_gain)
        return order_by_similarity([int(ids[t]) for t in picked], [float(cos[t]) for t in picked], self.order)

    def select(self, queries: Sequence[Query], candidates: Sequence[Candidates], k: int) -> list[list[int]]:
        pool = self.pool_
        if k <= 0 or len(pool) == 0 or not queries:
            return [[] for _ in queries]
        qv = self.query_vectors(queries)
        vecs = self.pool_vectors()
        out = []
        for start in range(0, len(queries), 64):  # bounded memory on large pools
            sims = qv[start : start + 64] @ vecs.T
            for row, cand in enumerate(candidates[start : start + 64]):
                allowed = self.eligible(cand) if self.restrict_to_candidates else None
                picked = self.select_one(sims[row].astype(np.float64), allowed, k)
                if len(picked) < k:
                    available = len(pool) if allowed is None else len(allowed)
                    self._report_short(queries[start + row], k, len(picked), min(available, self.candidates))
                out.append(picked)
        return out

    def _report_short(self, query: Query, k: int, got: int, considered: int) -> None:
        """Fewer than k demonstrations: say so once per selector, and in every query's trace."""
        why = (
            f"only {considered} candidate examples"
            if considered <= got
            else "the DPP's marginal gain stopped being positive (near-duplicate candidates)"
        )
        query.trace["select_short"] = {"selector": "dpp", "asked": k, "got": got, "why": why}
        if not getattr(self, "_warned_short", False):
            self._warned_short = True
            warnings.warn(
                f"dpp selector returned {got} of {k} demonstrations for a query ({why}); further "
                "shortfalls are recorded in each prediction's trace['select_short'] only",
                RuntimeWarning,
                stacklevel=3,
            )

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {}

    def load_state_dict(self, pool: Pool, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.fit(pool)
