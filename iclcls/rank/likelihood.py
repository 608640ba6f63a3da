"""Likelihood ranking: score every candidate label's tokens given the prompt.

One ``LM.score_batch`` call per batch (the transformers backend shares the prompt's KV
cache across candidates). Scores are log-probabilities normalised over the candidates.
Calibration (Zhao et al. 2021; Fei et al. 2023) divides by the label probabilities under a
content-free input: ``contextual`` uses "N/A", ``domain`` random words from the pool.
"""

from __future__ import annotations

import numpy as np

from iclcls.lm.base import reduce_logprobs
from iclcls.rank.base import RANKERS, BaseRanker, RankContext, Ranking, log_softmax, sort_ranking
from iclcls.select.base import query_rng


@RANKERS.register("likelihood")
class LikelihoodRanker(BaseRanker):
    def __init__(self, *, reduce: str = "sum", calibration: str = "none", domain_words: int = 12) -> None:
        if reduce not in ("sum", "mean", "first"):
            raise ValueError(f"likelihood reduce must be sum, mean or first, got {reduce!r}")
        if calibration not in ("none", "contextual", "domain"):
            raise ValueError(f"calibration must be none, contextual or domain, got {calibration!r}")
        self.reduce = reduce
        self.calibration = calibration
        self.domain_words = domain_words

    def _content_free(self, ctx: RankContext, qi: int) -> str:
        if self.calibration == "contextual":
            return "N/A"
        rng = query_rng(0, ctx.queries[qi].text)
        pool = ctx.pool.examples
        words = []
        for i in rng.integers(0, len(pool), size=self.domain_words):
            w = pool[int(i)].text.split()
            if w:
                words.append(w[int(rng.integers(0, len(w)))])
        return " ".join(words) or "N/A"

    def rank(self, ctx: RankContext) -> list[Ranking]:
        if ctx.lm is None:
            raise ValueError("the likelihood ranker needs an LM; pass lm=... or use rank='retriever'")
        verbal = ctx.builder.verbalize
        requests = [
            (p.text, [" " + verbal(lab) for lab in c.labels]) for p, c in zip(ctx.prompts, ctx.candidates)
        ]
        if self.calibration != "none":
            for qi, (p, c) in enumerate(zip(ctx.prompts, ctx.candidates)):
                demos = [ctx.pool.examples[i] for i in p.demonstrations]
                cf = ctx.builder.render(self._content_free(ctx, qi), demos, c.labels)
                requests.append((cf, [" " + verbal(lab) for lab in c.labels]))
        token_scores = ctx.lm.score_batch(requests)
        n = len(ctx.prompts)
        out = []
        for qi, c in enumerate(ctx.candidates):
            raw = np.array([reduce_logprobs(t, self.reduce) for t in token_scores[qi]])
            scores = log_softmax(raw)
            trace = {"ranker": "likelihood", "lm_logprob": dict(zip(c.labels, raw.round(4).tolist()))}
            if self.calibration != "none":
                cf = log_softmax([reduce_logprobs(t, self.reduce) for t in token_scores[n + qi]])
                scores = log_softmax(scores - cf)
                trace["calibration"] = self.calibration
            trace["lm_score"] = dict(zip(c.labels, scores.round(5).tolist()))
            out.append(sort_ranking(c.labels, scores, trace))
        return out
