"""Generative ranking (Milios et al. 2023): the LM writes labels; map them to the label space.

Each written label maps exactly, then case-insensitively, then to the nearest label by
embedding (cosine >= ``min_similarity``); the remaining candidates follow in retriever
order. An answer that maps to nothing falls back to retriever order, flagged in the trace.
"""

from __future__ import annotations

import re

import numpy as np

from iclcls.rank.base import RANKERS, BaseRanker, RankContext, Ranking


@RANKERS.register("generative")
class GenerativeRanker(BaseRanker):
    def __init__(self, *, max_tokens: int = 24, min_similarity: float = 0.6, constrained: bool = False, multi_label: bool = False) -> None:
        self.max_tokens = max_tokens
        self.min_similarity = min_similarity
        self.constrained = constrained
        self.multi_label = multi_label
        self._emb_labels: tuple[str, ...] = ()

    def _label_matrix(self, ctx: RankContext) -> tuple[list[str], np.ndarray]:
        labels = tuple(ctx.pool.labels)
        if labels != self._emb_labels:
            verbal = ctx.builder.verbalize
            self._emb = ctx.pool.embedder.encode([verbal(lab) for lab in labels])
            self._emb_labels = labels
        return list(labels), self._emb

    def map_answer(self, answer: str, ctx: RankContext) -> list[tuple[str, float, str]]:
        """Written text -> [(label, similarity, how)] in the order the LM wrote them."""
        verbal = ctx.builder.verbalize
        labels, emb = self._label_matrix(ctx)
        exact: dict[str, str] = {}
        lower: dict[str, str] = {}
        for lab in labels:
            for form in (lab, verbal(lab)):
                exact.setdefault(form, lab)
                lower.setdefault(form.lower(), lab)
        first_line = answer.strip().split("\n")[0]
        parts = re.split(r"[,;]", first_line) if self.multi_label else [first_line]
        out: list[tuple[str, float, str]] = []
        pending = []
        for part in parts:
            part = part.strip().strip(".\"'` ")
            if not part:
                continue
            if part in exact:
                out.append((exact[part], 1.0, "exact"))
            elif part.lower() in lower:
                out.append((lower[part.lower()], 1.0, "case"))
            else:
                out.append(("", 0.0, "pending"))
                pending.append((len(out) - 1, part))
        if pending:
            vecs = ctx.pool.embedder.encode([p for _, p in pending])
            sims = vecs @ emb.T
            for (pos, _), row in zip(pending, sims):
                j = int(np.argmax(row))
                out[pos] = (labels[j], float(row[j]), "nearest") if row[j] >= self.min_similarity else ("", 0.0, "none")
        seen: set[str] = set()
        result = []
        for lab, sim, how in out:
            if lab and lab not in seen:
                seen.add(lab)
                result.append((lab, sim, how))
        return result

    def rank(self, ctx: RankContext) -> list[Ranking]:
        if ctx.lm is None:
            raise ValueError("the generative ranker needs an LM; pass lm=... or use rank='retriever'")
        verbal = ctx.builder.verbalize
        prompts = [p.text for p in ctx.prompts]
        if self.constrained:
            answers = []
            for p, c in zip(prompts, ctx.candidates):
                answers += ctx.lm.generate([p], max_tokens=self.max_tokens, choices=[" " + verbal(lab) for lab in c.labels])
        else:
            answers = ctx.lm.generate(prompts, max_tokens=self.max_tokens, temperature=0.0, stop=["\n"])
        out = []
        for answer, c in zip(answers, ctx.candidates):
            mapped = self.map_answer(answer, ctx)
            labels = [lab for lab, _, _ in mapped]
            scores = [1.0 + sim for _, sim, _ in mapped]
            rest = [lab for lab in c.labels if lab not in set(labels)]
            n = len(rest)
            labels += rest
            scores += [1.0 - (i + 1) / (n + 1) for i in range(n)]
            trace: dict = {"ranker": "generative", "answer": answer, "mapped": [[a, round(s, 4), h] for a, s, h in mapped]}
            if not mapped:
                trace["unmapped_answer"] = True
            # LM score for fusion: 1 for what the LM wrote (by similarity), 0 otherwise.
            lm_score = {lab: 0.0 for lab in c.labels}
            for lab, sim, _ in mapped:
                if lab in lm_score:
                    lm_score[lab] = sim
            trace["lm_score"] = lm_score
            out.append(Ranking(labels, np.array(scores), trace))
        return out
