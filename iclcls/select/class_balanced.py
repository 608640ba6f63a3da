"""Class-balanced demonstrations: n per shortlisted class, so every candidate is shown."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from iclcls.select.base import SELECTORS, BaseSelector, order_by_similarity
from iclcls.types import Candidates, Query


@SELECTORS.register("class_balanced")
class ClassBalancedSelector(BaseSelector):
    """Up to ``per_class`` most similar examples of each candidate class (all classes if none),
    capped at k overall (the best-ranked candidate classes first), ordered by similarity."""

    def __init__(self, *, per_class: int = 1, order: str = "ascending") -> None:
        if per_class < 1:
            raise ValueError("class_balanced needs per_class >= 1")
        order_by_similarity([], [], order)
        self.per_class = per_class
        self.order = order

    def select(self, queries: Sequence[Query], candidates: Sequence[Candidates], k: int) -> list[list[int]]:
        pool = self.pool_
        out = []
        for x, cand in zip(queries, candidates):
            classes = cand.labels if cand is not None and cand.labels else list(pool.labels)
            chosen: list[tuple[float, int]] = []
            for lab in classes:
                ids = np.array(pool.indices_of(lab), dtype=np.int64)
                if not len(ids):
                    continue
                s = pool.embeddings[ids] @ x.embedding
                for t in np.argsort(-s)[: self.per_class]:
                    if int(ids[t]) not in {i for _, i in chosen}:
                        chosen.append((float(s[t]), int(ids[t])))
                if len(chosen) >= k:
                    break
            chosen = chosen[:k]
            out.append(order_by_similarity([i for _, i in chosen], [s for s, _ in chosen], self.order))
        return out
