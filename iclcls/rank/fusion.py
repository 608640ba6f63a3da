"""Fusion of LM and retriever scores, with a weight tuned on validation data.

score = w * z(lm) + (1 - w) * z(retriever), z-scored over each query's candidates. At
w = 0 the system is its retriever, and tuning picks w on validation data, so a weak LM
does not make the system worse than its retriever (up to validation/test drift).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from iclcls.rank.base import RANKERS, BaseRanker, RankContext, Ranking, sort_ranking, zscore


def fuse(lm: Sequence[float], retriever: Sequence[float] | np.ndarray, w: float) -> np.ndarray:
    """One query's fused scores: ``w * z(lm) + (1 - w) * z(retriever)``."""
    return w * zscore(np.asarray(lm)) + (1.0 - w) * zscore(np.asarray(retriever))


def fusion_accuracy(
    traces: Sequence[Mapping[str, Any]], gold: Sequence[Sequence[str]], weights: Sequence[float] | np.ndarray
) -> np.ndarray | None:
    """Top-1 accuracy of the fused score at each weight, recomputed from fusion traces
    (``lm_score`` and ``retriever_score`` per candidate), so no LM is called again; None when
    there are no traces or one lacks either score. Ties go to the first candidate."""
    traces = list(traces)
    if not traces or not all("lm_score" in t and "retriever_score" in t for t in traces):
        return None
    w = np.asarray(weights, dtype=np.float64)[:, None]
    hits = np.zeros(len(w))
    for t, g in zip(traces, gold):
        labels = [lab for lab in t["lm_score"] if lab in t["retriever_score"]]
        if labels:
            zl = zscore(np.array([t["lm_score"][lab] for lab in labels]))
            zr = zscore(np.array([t["retriever_score"][lab] for lab in labels]))
            best = np.argmax(w * zl + (1.0 - w) * zr, axis=1)
            hits += [labels[b] in set(g) for b in best]
    return hits / len(traces)


@RANKERS.register("fusion")
class FusionRanker(BaseRanker):
    def __init__(self, *, inner: str = "likelihood", inner_options: dict | None = None, weight: float | None = 0.5, grid: int = 21) -> None:
        from iclcls.rank import get_ranker

        self.inner = inner
        self.inner_options = inner_options or {}
        self.weight = weight
        self.grid = grid
        self.inner_ranker_ = get_ranker(inner, **self.inner_options)
        if not self.inner_ranker_.needs_lm:
            raise ValueError("fusion mixes an LM ranker with the retriever; its inner ranker must use the LM")

    @property
    def needs_prompts(self) -> bool:
        return self.inner_ranker_.needs_prompts

    def rank(self, ctx: RankContext) -> list[Ranking]:
        inner = self.inner_ranker_.rank(ctx)
        w = 0.5 if self.weight is None else float(self.weight)
        out = []
        for r, c in zip(inner, ctx.candidates):
            lm_score = r.trace["lm_score"]
            lm = [lm_score[lab] for lab in c.labels]
            trace = dict(r.trace)
            trace.update(ranker="fusion", weight=w, retriever_score=dict(zip(c.labels, np.round(c.scores, 5).tolist())))
            out.append(sort_ranking(c.labels, fuse(lm, c.scores, w), trace))
        return out

    def tune(self, traces: Sequence[dict[str, Any]], gold: Sequence[Sequence[str]]) -> dict[str, Any]:
        """Grid-search w in [0, 1] for validation accuracy (ties go to the smaller w: trust the retriever)."""
        weights = np.linspace(0.0, 1.0, self.grid)
        acc = fusion_accuracy(traces, gold, weights)
        acc = np.zeros(len(weights)) if acc is None else acc
        best = int(np.argmax(acc))  # first max = smallest weight
        self.weight = float(weights[best])
        return {
            "fusion_weight": self.weight,
            "validation_accuracy": float(acc[best]),
            "validation_accuracy_retriever": float(acc[0]),
            "validation_accuracy_lm": float(acc[-1]),
            "accuracy_by_weight": {f"{w:.2f}": round(float(a), 4) for w, a in zip(weights, acc)},
        }

    def rescore(self, trace: Mapping[str, Any]) -> Ranking:
        """A ranking at the current weight from a fusion trace: tuning re-scores without the LM."""
        labels = [lab for lab in trace["lm_score"] if lab in trace["retriever_score"]]
        w = 0.5 if self.weight is None else float(self.weight)
        lm = [trace["lm_score"][lab] for lab in labels]
        retr = [trace["retriever_score"][lab] for lab in labels]
        return sort_ranking(labels, fuse(lm, retr, w), {"weight": w})

    def tuned_state(self) -> dict[str, Any]:
        return {"weight": self.weight}


def fuse_rankings(primary: Sequence[str], secondary: Sequence[str], weight: float, *, c: float = 60.0) -> list[str]:
    """Weighted reciprocal-rank fusion of two ranked label lists; every label of either is kept.

    score = (1 - w) / (c + rank in primary) + w / (c + rank in secondary), 0 where a list lacks
    the label. At w = 0 the result is ``primary`` exactly, then the labels only ``secondary``
    has, in its order (ties go to the secondary rank): so the retriever's list is what a weight
    of 0 returns, and a tuned weight can only move labels when the other list earns it.
    """
    w = float(weight)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {w}")
    first = {lab: i for i, lab in enumerate(dict.fromkeys(primary))}
    second = {lab: i for i, lab in enumerate(dict.fromkeys(secondary))}
    labels = list(dict.fromkeys([*first, *second]))
    far = len(labels) + 1  # a missing rank sorts after every present one

    def key(lab: str) -> tuple[float, int, int]:
        a, b = first.get(lab), second.get(lab)
        score = (1.0 - w) * (0.0 if a is None else 1.0 / (c + a + 1)) + w * (0.0 if b is None else 1.0 / (c + b + 1))
        return (
            (-score, far if a is None else a, far if b is None else b)
            if w < 1.0
            else (-score, far if b is None else b, far if a is None else a)
        )

    return sorted(labels, key=key)
