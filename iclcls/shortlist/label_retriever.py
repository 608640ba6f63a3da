"""Label retriever (Infer-Retrieve-Rank): embed every label, match the query and the LM's guesses.

score(label) = max cosine over {query, guesses}, optionally times ln(A * prior(label) + e)
(D'Oosterlinck et al. 2024), so frequent labels win near-ties. Needs no training examples:
it works from the label space alone (13,896 ESCO skills, for instance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from iclcls.pool import Pool
from iclcls.prompt import label_text  # lives with the prompt (a lower layer); re-exported here
from iclcls.shortlist.base import SHORTLISTERS, BaseShortlister, top_candidates
from iclcls.types import Candidates, Query

__all__ = ["LabelRetriever", "label_text"]


@SHORTLISTERS.register("label_retriever")
class LabelRetriever(BaseShortlister):
    def __init__(
        self, *, use_query: bool = True, use_descriptions: bool = True, priors: Mapping[str, float] | None = None, prior_a: float = 0.0
    ) -> None:
        self.use_query = use_query
        self.use_descriptions = use_descriptions
        self.priors = dict(priors) if priors else None
        self.prior_a = prior_a

    def fit(self, pool: Pool) -> LabelRetriever:
        self.pool_ = pool
        self.labels_ = list(pool.labels)
        desc = pool.labels.descriptions if self.use_descriptions else {}
        texts = [label_text(lab, desc.get(lab)) for lab in self.labels_]
        self.label_embeddings_ = pool.embedder.encode(texts) if texts else np.zeros((0, pool.dim), dtype=np.float32)
        weights = np.ones(len(self.labels_))
        if self.priors and self.prior_a > 0:
            p = np.array([self.priors.get(lab, 0.0) for lab in self.labels_], dtype=np.float64)
            weights = np.log(self.prior_a * p + np.e)
        self.weights_ = weights
        return self

    def update(self, pool: Pool, new_ids: np.ndarray) -> None:
        if len(pool.labels) != len(self.labels_):
            self.fit(pool)

    def shortlist(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        out = []
        for x in queries:
            vecs = []
            if self.use_query or x.guess_embeddings is None or not len(x.guess_embeddings):
                vecs.append(x.embedding[None, :])
            if x.guess_embeddings is not None and len(x.guess_embeddings):
                vecs.append(np.asarray(x.guess_embeddings, dtype=np.float32))
            sims = np.vstack(vecs) @ self.label_embeddings_.T  # (m, L)
            best = sims.max(axis=0) if sims.size else np.zeros(len(self.labels_))
            out.append(top_candidates(self.labels_, best * self.weights_, k))
        return out
