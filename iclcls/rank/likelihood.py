"""Likelihood ranking: score every candidate label's tokens given the prompt.

One ``LM.score_batch`` call per batch (the transformers backend shares the prompt's KV
cache across candidates). Scores are log-probabilities normalised over the candidates.
Calibration (Zhao et al. 2021; Fei et al. 2023) divides by the label probabilities under a
content-free input: ``contextual`` uses "N/A", ``domain`` random words from the pool;
``batch`` (Zhou et al. 2024) divides by each label's mean probability over the batch's queries
(no extra LM call; a label seen once is left as is, so one query alone is uncalibrated).
When every prompt of a batch starts with the same demonstrations (many-shot), that shared
text is passed as ``score_batch(..., shared_prefix=...)`` to LMs that accept it, which then
reuse its KV cache across queries and batches.
"""

from __future__ import annotations

import numpy as np

from iclcls.lm.base import reduce_logprobs
from iclcls.lm.common import accepts_shared_prefix
from iclcls.rank.base import RANKERS, BaseRanker, RankContext, Ranking, log_softmax, sort_ranking
from iclcls.util import common_prefix_len, query_rng


@RANKERS.register("likelihood")
class LikelihoodRanker(BaseRanker):
    def __init__(self, *, reduce: str = "sum", calibration: str = "none", domain_words: int = 12) -> None:
        if reduce not in ("sum", "mean", "first"):
            raise ValueError(f"likelihood reduce must be sum, mean or first, got {reduce!r}")
        if calibration not in ("none", "contextual", "domain", "batch"):
            raise ValueError(f"calibration must be none, contextual, domain or batch, got {calibration!r}")
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
        requests = [(p.text, [" " + verbal(lab) for lab in c.labels]) for p, c in zip(ctx.prompts, ctx.candidates)]
        if self.calibration in ("contextual", "domain"):
            for qi, (p, c) in enumerate(zip(ctx.prompts, ctx.candidates)):
                demos = [ctx.pool.examples[i] for i in p.demonstrations]
                cf = ctx.builder.render(self._content_free(ctx, qi), demos, c.labels)
                requests.append((cf, [" " + verbal(lab) for lab in c.labels]))
        prefix = shared_prefix(ctx)
        if prefix and all(r[0].startswith(prefix) for r in requests):
            token_scores = ctx.lm.score_batch(requests, shared_prefix=prefix)  # type: ignore[call-arg]  # an optional LM argument (not in BaseLM), checked above
        else:
            token_scores = ctx.lm.score_batch(requests)
        n = len(ctx.prompts)
        raws = [np.array([reduce_logprobs(t, self.reduce) for t in token_scores[qi]]) for qi in range(n)]
        prior = batch_prior(ctx.candidates, [log_softmax(r) for r in raws]) if self.calibration == "batch" else {}
        out = []
        for qi, c in enumerate(ctx.candidates):
            raw = raws[qi]
            scores = log_softmax(raw)
            trace = {"ranker": "likelihood", "lm_logprob": dict(zip(c.labels, raw.round(4).tolist()))}
            if self.calibration in ("contextual", "domain"):
                cf_logp = log_softmax([reduce_logprobs(t, self.reduce) for t in token_scores[n + qi]])
                scores = log_softmax(scores - cf_logp)
            elif self.calibration == "batch":
                scores = log_softmax(scores - np.array([prior.get(lab, 0.0) for lab in c.labels]))
            if self.calibration != "none":
                trace["calibration"] = self.calibration
            trace["lm_score"] = dict(zip(c.labels, scores.round(5).tolist()))
            out.append(sort_ranking(c.labels, scores, trace))
        return out


def batch_prior(candidates, logps) -> dict[str, float]:
    """Each label's log mean probability over the queries that have it (two or more)."""
    seen: dict[str, list[float]] = {}
    for c, lp in zip(candidates, logps):
        for lab, v in zip(c.labels, lp):
            seen.setdefault(lab, []).append(float(v))
    return {lab: float(np.log(np.mean(np.exp(v)))) for lab, v in seen.items() if len(v) > 1}


def _fixed_text(ctx: RankContext, demos: list) -> str:
    """The text a prompt with ``demos`` has before any per-query content (cut at a line end)."""
    a = ctx.builder.render("\x00", demos, ["\x00"])
    b = ctx.builder.render("\x01", demos, ["\x01"])
    n = common_prefix_len(a, b)
    return a[: a.rfind("\n", 0, n) + 1]


def shared_prefix(ctx: RankContext) -> str | None:
    """The demonstrations prefix all of the batch's prompts share, if the LM can reuse it; else None.

    Only when every prompt has the same demonstrations and the template puts them before
    anything query-specific (so the shared text holds more than the instructions).
    """
    if not accepts_shared_prefix(ctx.lm) or not ctx.prompts:
        return None
    demo_sets = {tuple(p.demonstrations) for p in ctx.prompts}
    if len(demo_sets) != 1:
        return None
    ids = demo_sets.pop()
    if not ids:
        return None
    prefix = _fixed_text(ctx, [ctx.pool.examples[i] for i in ids])
    if len(prefix) <= len(_fixed_text(ctx, [])):
        return None
    return prefix
