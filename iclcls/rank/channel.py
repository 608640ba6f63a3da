"""Noisy-channel ranking: score each candidate by P(query | label), not P(label | query).

The direct likelihood asks a small LM to name one of many labels after a mixed prompt, and
135M-270M models are poor at that. The channel direction (Min et al. 2022, "Noisy Channel
Language Model Prompting for Few-Shot Text Classification") asks how likely the query text
is after the label's own examples: per candidate ``c`` the prompt is ``c``'s name and its
pool examples, the continuation is the query, and the score is the log-probability of the
query's tokens. It uses the LM as a class-conditional model of text, which is what small
LMs do well; on BANKING77 it beats the direct ranker by ~14 points (eval/RESULTS.md).

A class's prompt depends only on the pool, not on the query: every query of a batch that
has ``c`` on its shortlist is one continuation of the same prompt (one prefill), and LMs
that take ``shared_prefix`` keep each class's KV cache across batches.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from iclcls.lm.common import accepts_shared_prefix
from iclcls.rank.base import RANKERS, BaseRanker, RankContext, Ranking, log_softmax, sort_ranking


@RANKERS.register("channel")
class ChannelRanker(BaseRanker):
    """``per_class``: pool examples shown for each candidate (the most typical, nearest the class mean).

    ``equal_shots``: show every candidate of a query with as many examples as its sparsest
    candidate has. The query's log-probability grows with the examples before it, so a class
    with fewer examples would lose for that alone (an imbalanced pool; and in cross-validation
    the held-out example's own class is one short, which would bias the tuning against it).
    """

    needs_prompts = False  # builds its own per-class prompts; the selector's demonstrations are unused

    def __init__(self, *, per_class: int = 16, equal_shots: bool = True, show_summary: bool = True) -> None:
        if per_class < 0:
            raise ValueError(f"channel per_class must be >= 0, got {per_class}")
        self.per_class = per_class
        self.equal_shots = equal_shots
        self.show_summary = show_summary

    def class_examples(self, ctx: RankContext, label: str, k: int | None = None) -> list[int]:
        """Pool positions shown for ``label``: up to ``k`` (``per_class``) nearest its mean, least typical first."""
        k = self.per_class if k is None else min(k, self.per_class)
        ids = [i for i in ctx.pool.indices_of(label) if ctx.pool.examples[i].text]
        if len(ids) > k:
            emb = ctx.pool.embeddings[ids]
            sims = emb @ emb.mean(axis=0)
            ids = [ids[j] for j in np.argsort(-sims, kind="stable")[:k]]
            ids = ids[::-1]
        return ids

    def _shots(self, ctx: RankContext, labels: list[str]) -> int:
        if not self.equal_shots:
            return self.per_class
        counts = [len(ctx.pool.indices_of(lab)) for lab in labels]
        return min([self.per_class] + [n for n in counts if n > 0])

    def class_prompt(self, ctx: RankContext, label: str, ids: list[int]) -> str:
        b = ctx.builder
        head = f"{b.label_prefix} {b.verbalize(label)}\n"
        summary = b.summaries.get(label) if self.show_summary else None
        if summary:
            head += f"{summary}\n"
        return head + "".join(f"{b.input_prefix}{ctx.pool.examples[i].text}\n" for i in ids) + b.input_prefix.rstrip()

    def rank(self, ctx: RankContext) -> list[Ranking]:
        if ctx.lm is None:
            raise ValueError("the channel ranker needs an LM; pass lm=... or use rank='retriever'")
        for qi, q in enumerate(ctx.queries):
            if not q.text:
                raise ValueError(f"the channel ranker scores the query's text; query {qi} has none (an image?): use rank='chat' for images")
        window = ctx.lm.context_window
        # (label, shots) -> the queries that have the label on their shortlist
        wanted: dict[tuple[str, int], list[int]] = defaultdict(list)
        shots = [self._shots(ctx, list(c.labels)) for c in ctx.candidates]
        for qi, c in enumerate(ctx.candidates):
            for lab in c.labels:
                wanted[lab, shots[qi]].append(qi)
        conts = [" " + q.text for q in ctx.queries]
        query_tokens = [ctx.lm.count_tokens(t) for t in conts]
        prompts: dict[tuple[str, int], str] = {}
        shown: dict[tuple[str, int], list[int]] = {}
        for (lab, k), qs in wanted.items():
            ids = self.class_examples(ctx, lab, k)
            prompt = self.class_prompt(ctx, lab, ids)
            room = window - max(query_tokens[qi] for qi in qs) - 2
            while ids and ctx.lm.count_tokens(prompt) > room:  # drop the least typical first
                ids = ids[1:]
                prompt = self.class_prompt(ctx, lab, ids)
            prompts[lab, k], shown[lab, k] = prompt, ids
        requests = [(prompts[key], [conts[qi] for qi in qs]) for key, qs in wanted.items()]
        # One call per class keeps its prompt's KV cache for the next batch (a CPU's best); an LM
        # that scores many requests per forward on a GPU gains more from one call for all classes.
        if accepts_shared_prefix(ctx.lm) and not getattr(ctx.lm, "prefer_batched_requests", False):
            scored = [ctx.lm.score_batch([r], shared_prefix=r[0])[0] for r in requests]  # type: ignore[call-arg]  # an optional LM argument (not in BaseLM), checked above
        else:
            scored = ctx.lm.score_batch(requests)
        raw: dict[tuple[int, str], float] = {}
        for ((lab, _), qs), tokens in zip(wanted.items(), scored):
            for qi, t in zip(qs, tokens):
                raw[qi, lab] = float(np.sum(t))
        out = []
        for qi, c in enumerate(ctx.candidates):
            logp = np.array([raw[qi, lab] for lab in c.labels])
            scores = log_softmax(logp)
            trace = {
                "ranker": "channel",
                "channel_logprob": dict(zip(c.labels, logp.round(4).tolist())),
                "channel_examples": {lab: shown[lab, shots[qi]] for lab in c.labels},
                "lm_score": dict(zip(c.labels, scores.round(5).tolist())),
            }
            out.append(sort_ranking(c.labels, scores, trace))
        return out
