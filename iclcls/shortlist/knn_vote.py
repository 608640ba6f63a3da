"""kNN vote: labels of the nearest training examples, weighted by similarity.

Classes no neighbour votes for are appended in class-mean order (below every voted
class), so the shortlist always has k labels and recall@k stays high.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from iclcls.pool import Pool
from iclcls.shortlist.base import SHORTLISTERS, BaseShortlister
from iclcls.shortlist.means import ClassMeans
from iclcls.types import Candidates, Query
from iclcls.util import GrowingArray


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
        self.table_ = ClassMeans(pool)
        self._ptr = GrowingArray(dtype=np.int64)
        self._ptr.append(np.zeros(1, dtype=np.int64))
        self._idx = GrowingArray(dtype=np.int64)
        self._index_examples(range(len(pool)))
        return self

    @property
    def mean_labels_(self) -> list[str]:
        return self.table_.labels

    @property
    def means_(self) -> np.ndarray:
        return self.table_.means

    def update(self, pool: Pool, new_ids: np.ndarray) -> None:
        """New examples in O(their number + their classes), equal to a refit (see ``ClassMeans``)."""
        if not len(new_ids):
            return
        self.pool_ = pool
        if len(self._ptr) - 1 != int(new_ids[0]) or not self.table_.update(pool, new_ids):
            self.fit(pool)
            return
        self._index_examples(new_ids)

    def _index_examples(self, ids) -> None:
        """Append the examples' label indices to the CSR the vote reads (examples in pool order)."""
        index = self.table_.index
        per = [[index[lab] for lab in self.pool_.examples[i].labels] for i in ids]
        ends = int(self._ptr.view[-1]) + np.cumsum([len(x) for x in per], dtype=np.int64)
        self._ptr.append(ends)
        self._idx.append(np.fromiter((j for x in per for j in x), dtype=np.int64))

    def _example_labels(self) -> tuple[np.ndarray, np.ndarray]:
        return self._ptr.view, self._idx.view

    def shortlist(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        if not queries:
            return []
        q = np.stack([x.embedding for x in queries]).astype(np.float32)
        sims, ids = self.pool_.search(q, self.neighbors)
        mean_sims = q @ self.means_.T if len(self.mean_labels_) else np.zeros((len(q), 0), np.float32)
        n_labels = len(self.mean_labels_)
        step = max(1, 4_000_000 // max(n_labels, 1))  # bounds the [queries, labels] vote matrix
        out: list[Candidates] = []
        for s in range(0, len(q), step):
            out += self._votes(sims[s : s + step], ids[s : s + step], mean_sims[s : s + step], k)
        return out

    def _votes(self, sims: np.ndarray, ids: np.ndarray, mean_sims: np.ndarray, k: int) -> list[Candidates]:
        """Vectorised voting; the same scores and order as summing neighbour by neighbour.

        Voted classes rank by vote, ties by first appearance among the neighbours; unvoted
        classes follow by class-mean cosine (in (-1, -0.5]), ties in class order.
        """
        nq, n_labels = len(sims), len(self.mean_labels_)
        ptr, idx = self._example_labels()
        valid = ids >= 0
        best = np.where(valid, sims, -np.inf).max(axis=1, initial=-np.inf).astype(np.float32)
        with np.errstate(invalid="ignore"):  # rows without neighbours: -inf - -inf, never used
            w = np.exp((sims - best[:, None]) / np.float32(self.temperature)).astype(np.float64)
        rows, cols = np.nonzero(valid)  # row-major: each query's neighbours in rank order
        ex = ids[rows, cols]
        counts = ptr[ex + 1] - ptr[ex]
        rep_rows = np.repeat(rows, counts)
        starts = np.repeat(ptr[ex], counts)
        within = np.arange(len(rep_rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        labs = idx[starts + within]
        flat = rep_rows * n_labels + labs
        votes = np.bincount(flat, weights=np.repeat(w[rows, cols], counts), minlength=nq * n_labels)
        votes = votes.reshape(nq, n_labels)
        first: np.ndarray = np.full(nq * n_labels, np.iinfo(np.int64).max, dtype=np.int64)
        uniq, at = np.unique(flat, return_index=True)
        first[uniq] = at  # the expansion is row-major, so a smaller index appeared earlier
        first = first.reshape(nq, n_labels)
        voted = first < np.iinfo(np.int64).max
        scores = np.where(voted, votes, -1.0 + (mean_sims.astype(np.float64) + 1.0) / 4.0)
        tie = np.where(voted, first, np.iinfo(np.int64).max // 2 + np.arange(n_labels)[None, :])
        kk = min(k, n_labels)
        out = []
        for r in range(nq):
            if kk <= 0:
                out.append(Candidates([], np.zeros(0)))
                continue
            sc = scores[r]
            if kk < n_labels:  # everything tied with the k-th best is kept, then ordered exactly
                kth = np.partition(sc, n_labels - kk)[n_labels - kk]
                pick = np.nonzero(sc >= kth)[0]
            else:
                pick = np.arange(n_labels)
            order = pick[np.lexsort((tie[r, pick], -sc[pick]))][:kk]
            out.append(Candidates([self.mean_labels_[i] for i in order], sc[order]))
        return out
