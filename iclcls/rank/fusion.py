"""Fusion of LM and retriever scores, with a weight tuned on validation data.

score = w * z(lm) + (1 - w) * z(retriever), z-scored over each query's candidates. At
w = 0 the system is its retriever, and tuning picks w on validation data, so a weak LM
does not make the system worse than its retriever (up to validation/test drift).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from iclcls.rank.base import RANKERS, BaseRanker, RankContext, Ranking, sort_ranking, zscore


@RANKERS.register("fusion")
class FusionRanker(BaseRanker):
    def __init__(self, *, inner: str = "likelihood", inner_options: dict | None = None,
                 weight: float | None = 0.5, grid: int = 21) -> None:
        from iclcls.rank import get_ranker

        self.inner = inner
        self.inner_options = inner_options or {}
        self.weight = weight
        self.grid = grid
        self.inner_ranker_ = get_ranker(inner, **self.inner_options)
        if getattr(self.inner_ranker_, "needs_lm", True) is False:
            raise ValueError("fusion mixes an LM ranker with the retriever; its inner ranker must use the LM")

    @staticmethod
    def fuse(labels: Sequence[str], lm: Sequence[float], retr: Sequence[float], w: float) -> np.ndarray:
        return w * zscore(np.asarray(lm)) + (1.0 - w) * zscore(np.asarray(retr))

    def rank(self, ctx: RankContext) -> list[Ranking]:
        inner = self.inner_ranker_.rank(ctx)
        w = 0.5 if self.weight is None else float(self.weight)
        out = []
        for r, c in zip(inner, ctx.candidates):
            lm_score = r.trace["lm_score"]
            lm = [lm_score[lab] for lab in c.labels]
            trace = dict(r.trace)
            trace.update(ranker="fusion", weight=w, retriever_score=dict(zip(c.labels, np.round(c.scores, 5).tolist())))
            out.append(sort_ranking(c.labels, self.fuse(c.labels, lm, c.scores, w), trace))
        return out

    def tune(self, traces: Sequence[dict[str, Any]], gold: Sequence[Sequence[str]]) -> dict[str, Any]:
        """Grid-search w in [0, 1] for validation accuracy (ties go to the smaller w: trust the retriever)."""
        weights = np.linspace(0.0, 1.0, self.grid)
        acc = np.zeros(len(weights))
        for tr, g in zip(traces, gold):
            labels = list(tr["lm_score"])
            lm = [tr["lm_score"][lab] for lab in labels]
            retr = [tr["retriever_score"][lab] for lab in labels]
            zl, zr = zscore(np.asarray(lm)), zscore(np.asarray(retr))
            for j, w in enumerate(weights):
                s = w * zl + (1 - w) * zr
                acc[j] += labels[int(np.argmax(s))] in set(g)
        best = int(np.argmax(acc))  # first max = smallest weight
        self.weight = float(weights[best])
        n = max(len(gold), 1)
        return {"fusion_weight": self.weight, "validation_accuracy": float(acc[best] / n),
                "validation_accuracy_retriever": float(acc[0] / n),
                "validation_accuracy_lm": float(acc[-1] / n)}

    def tuned_state(self) -> dict[str, Any]:
        return {"weight": self.weight}
