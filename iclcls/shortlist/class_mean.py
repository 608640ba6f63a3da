"""Nearest class mean (cosine): a strong, cheap shortlist for few-shot pools."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from iclcls.pool import Pool
from iclcls.types import Candidates, Query
from iclcls.shortlist.base import SHORTLISTERS, BaseShortlister, top_candidates


@SHORTLISTERS.register("class_mean")
class ClassMeanShortlister(BaseShortlister):
    """Rank classes by cosine between the query and each class's unit-norm mean embedding."""

    def fit(self, pool: Pool) -> ClassMeanShortlister:
        self.pool_ = pool
        self.labels_, self.means_ = pool.class_means()
        return self

    def scores(self, queries: Sequence[Query]) -> np.ndarray:
        q = np.stack([x.embedding for x in queries]).astype(np.float32)
        return q @ self.means_.T

    def shortlist(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        if not queries:
            return []
        s = self.scores(queries)
        return [top_candidates(self.labels_, row, k) for row in s]
