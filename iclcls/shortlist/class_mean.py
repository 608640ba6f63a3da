"""Nearest class mean (cosine): a strong, cheap shortlist for few-shot pools."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from iclcls.pool import Pool
from iclcls.shortlist.base import SHORTLISTERS, BaseShortlister, top_candidates
from iclcls.shortlist.means import ClassMeans
from iclcls.types import Candidates, Query


@SHORTLISTERS.register("class_mean")
class ClassMeanShortlister(BaseShortlister):
    """Rank classes by cosine between the query and each class's unit-norm mean embedding."""

    def fit(self, pool: Pool) -> ClassMeanShortlister:
        self.pool_ = pool
        self.table_ = ClassMeans(pool)
        return self

    def update(self, pool: Pool, new_ids: np.ndarray) -> None:
        """O(new examples + their classes), equal to a refit (see ``ClassMeans``)."""
        self.pool_ = pool
        self.table_.update(pool, new_ids)

    @property
    def labels_(self) -> list[str]:
        return self.table_.labels

    @property
    def means_(self) -> np.ndarray:
        return self.table_.means

    def scores(self, queries: Sequence[Query]) -> np.ndarray:
        q = np.stack([x.embedding for x in queries]).astype(np.float32)
        return q @ self.means_.T

    def shortlist(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        if not queries:
            return []
        s = self.scores(queries)
        return [top_candidates(self.labels_, row, k) for row in s]
