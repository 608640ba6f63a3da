"""No shortlist: every label is a candidate (small label spaces)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from iclcls.pool import Pool
from iclcls.shortlist.base import SHORTLISTERS, BaseShortlister
from iclcls.types import Candidates, Query


@SHORTLISTERS.register("all")
class AllLabels(BaseShortlister):
    """All labels in label-space order; scores are class-mean cosines where a class has examples."""

    def fit(self, pool: Pool) -> AllLabels:
        self.pool_ = pool
        self.mean_labels_, self.means_ = pool.class_means()
        return self

    def shortlist(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        labels = list(self.pool_.labels)
        pos = {lab: i for i, lab in enumerate(self.mean_labels_)}
        out = []
        for x in queries:
            sims = x.embedding @ self.means_.T if len(self.mean_labels_) else np.zeros(0)
            scores = np.array([sims[pos[lab]] if lab in pos else 0.0 for lab in labels])
            out.append(Candidates(labels, scores))
        return out
