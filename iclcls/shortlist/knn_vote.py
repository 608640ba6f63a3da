"""kNN vote: labels of the nearest training examples, weighted by similarity.

Classes no neighbour votes for are appended in class-mean order (below every voted
class), so the shortlist always has k labels and recall@k stays high.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from iclcls.pool import Pool
from iclcls.types import Candidates, Query
from iclcls.shortlist.base import SHORTLISTERS, BaseShortlister, top_candidates


@SHORTLISTERS.register("knn_vote")
class KNNVoteShortlister(BaseShortlister):
    """Score(c) = sum over the n nearest examples labelled c of exp((sim - best_sim) / temperature)."""

    def __init__(self, *, neighbors: int = 50, temperature: float = 0.05) -> None:
        if neighbors < 1 or temperature <= 0:
            raise ValueError("knn_vote needs neighbors >= 1 and temperature > 0")
        self.neighbors = neighbors
        self.temperature = temperature

    def fit(self, pool: Pool) -> KNNVoteShortlister:
        self.pool_ = pool
        self.mean_labels_, self.means_ = pool.class_means()
        return self

    def shortlist(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        if not queries:
            return []
        pool = self.pool_
        q = np.stack([x.embedding for x in queries]).astype(np.float32)
        sims, ids = pool.search(q, self.neighbors)
        mean_sims = q @ self.means_.T if len(self.mean_labels_) else np.zeros((len(q), 0))
        out = []
        for row in range(len(q)):
            votes: dict[str, float] = {}
            valid = ids[row] >= 0
            if valid.any():
                best = float(sims[row][valid].max())
                for s, i in zip(sims[row][valid], ids[row][valid]):
                    w = float(np.exp((s - best) / self.temperature))
                    for lab in pool.examples[i].labels:
                        votes[lab] = votes.get(lab, 0.0) + w
            labels = list(votes)
            scores = [votes[lab] for lab in labels]
            # Unvoted classes rank below all voted ones, ordered by class-mean cosine.
            for lab, ms in zip(self.mean_labels_, mean_sims[row]):
                if lab not in votes:
                    labels.append(lab)
                    scores.append(-1.0 + (float(ms) + 1.0) / 4.0)  # in (-1, -0.5]
            out.append(top_candidates(labels, np.array(scores), k))
        return out
