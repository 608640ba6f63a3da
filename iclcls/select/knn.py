"""kNN demonstrations (Liu et al. 2022): the pool examples most similar to the query."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from iclcls.select.base import SELECTORS, BaseSelector, order_by_similarity
from iclcls.types import Candidates, Query


@SELECTORS.register("knn")
class KNNSelector(BaseSelector):
    def __init__(self, *, order: str = "ascending", restrict_to_candidates: bool = True) -> None:
        order_by_similarity([], [], order)  # validate early
        self.order = order
        self.restrict_to_candidates = restrict_to_candidates

    def select(self, queries: Sequence[Query], candidates: Sequence[Candidates], k: int) -> list[list[int]]:
        pool = self.pool_
        if k <= 0 or len(pool) == 0:
            return [[] for _ in queries]
        out = []
        q = np.stack([x.embedding for x in queries]).astype(np.float32)
        # One batched index search; restricted queries that find too few fall back to exact.
        fetch = min(len(pool), max(4 * k, 64))
        sims, ids = pool.search(q, fetch)
        for row, cand in enumerate(candidates):
            allowed = set(self.eligible(cand).tolist())
            chosen = [(s, i) for s, i in zip(sims[row], ids[row]) if i >= 0 and i in allowed][:k]
            if len(chosen) < min(k, len(allowed)):
                idx = np.fromiter(allowed, dtype=np.int64)
                s = pool.embeddings[idx] @ q[row]
                top = np.argsort(-s)[:k]
                chosen = [(s[t], idx[t]) for t in top]
            out.append(order_by_similarity([i for _, i in chosen], [s for s, _ in chosen], self.order))
        return out
