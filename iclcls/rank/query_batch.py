"""Query batching (ManyICL; Jiang et al. 2024): several queries answered in one LM call.

With many-shot prompts the long demonstrations prefix dominates the cost; asking for
``queries_per_call`` numbered answers after one copy of it divides that cost. Queries that
share their demonstrations are grouped; the LM answers ``N: label`` lines, parsed by index
and mapped to the label space as the generative ranker does. Queries whose answers are
missing or unmappable are asked again in a smaller batch (``retries`` times); any left then
fall back to retriever order, flagged in the trace (``batch_fallback``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from iclcls.prompt import render
from iclcls.rank.base import RANKERS, BaseRanker, RankContext, Ranking
from iclcls.rank.generative import GenerativeRanker

_LINE = re.compile(r"^\s*(\d+)\s*[:.)\-]\s*(.*?)\s*$")


def collect_answers(chunks, texts, map_answer) -> tuple[dict[int, list], dict[int, str]]:
    """Each chunk's numbered answers ("1: ...", "2: ...") to its queries: the raw answer per
    query, and the mapped labels where ``map_answer`` finds any."""
    mapped, raw = {}, {}
    for ch, text in zip(chunks, texts):
        answers = parse_indexed("1:" + text, len(ch))
        for pos, qi in enumerate(ch, 1):
            if pos in answers:
                raw[qi] = answers[pos]
                m = map_answer(answers[pos])
                if m:
                    mapped[qi] = m
    return mapped, raw


def parse_indexed(text: str, n: int) -> dict[int, str]:
    """``"1: a\\n2: b"`` -> ``{1: "a", 2: "b"}`` for indices 1..n (first answer per index wins)."""
    out: dict[int, str] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        i, answer = int(m.group(1)), m.group(2).strip()
        if 1 <= i <= n and answer and i not in out:
            out[i] = answer
    return out


@RANKERS.register("batched_generative")
class BatchedGenerativeRanker(BaseRanker):
    def __init__(
        self,
        *,
        queries_per_call: int = 5,
        max_tokens_per_query: int = 16,
        retries: int = 2,
        min_similarity: float = 0.6,
        template: str = "classify_batch",
    ) -> None:
        if queries_per_call < 1:
            raise ValueError(f"queries_per_call must be >= 1, got {queries_per_call}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.queries_per_call = queries_per_call
        self.max_tokens_per_query = max_tokens_per_query
        self.retries = retries
        self.min_similarity = min_similarity
        self.template = template
        self._mapper = GenerativeRanker(min_similarity=min_similarity)

    def batch_prompt(self, ctx: RankContext, members: Sequence[int]) -> str:
        """One prompt for the queries ``members`` (which share their demonstrations)."""
        b = ctx.builder
        demos = [ctx.pool.examples[i] for i in ctx.prompts[members[0]].demonstrations]
        cands: list[str] = []
        for qi in members:
            cands += [lab for lab in ctx.candidates[qi].labels if lab not in cands]
        return render(
            self.template,
            instructions=b.instructions,
            demonstrations=[{"text": d.text, "labels": [b.verbalize(x) for x in d.labels]} for d in demos],
            candidates=[b.verbalize(c) for c in cands] if b.show_candidates else [],
            queries=[ctx.queries[qi].text.replace("\n", " ")[: b.max_query_chars] for qi in members],
            input_prefix=b.input_prefix,
            label_prefix=b.label_prefix,
        )

    def _ask(self, ctx: RankContext, members: list[int]) -> tuple[dict[int, list], dict[int, str]]:
        """One round: generate for each chunk, parse, map; returns mapped labels and raw answers."""
        chunks = [members[i : i + self.queries_per_call] for i in range(0, len(members), self.queries_per_call)]
        prompts = [self.batch_prompt(ctx, ch) for ch in chunks]
        longest = max(len(ch) for ch in chunks)
        assert ctx.lm is not None  # rank() checked it
        texts = ctx.lm.generate(prompts, max_tokens=self.max_tokens_per_query * longest + 4, temperature=0.0)
        return collect_answers(chunks, texts, lambda answer: self._mapper.map_answer(answer, ctx))

    def rank(self, ctx: RankContext) -> list[Ranking]:
        if ctx.lm is None:
            raise ValueError("the batched generative ranker needs an LM; pass lm=... or use rank='retriever'")
        groups: dict[tuple[int, ...], list[int]] = {}
        for qi, p in enumerate(ctx.prompts):
            groups.setdefault(tuple(p.demonstrations), []).append(qi)
        mapped: dict[int, list] = {}
        raw: dict[int, str] = {}
        attempts = {qi: 0 for qi in range(len(ctx.prompts))}
        for members in groups.values():
            todo = list(members)
            for _ in range(self.retries + 1):
                if not todo:
                    break
                for qi in todo:
                    attempts[qi] += 1
                got, answers = self._ask(ctx, todo)
                mapped.update(got)
                raw.update(answers)
                todo = [qi for qi in todo if qi not in mapped]
        out = []
        for qi, c in enumerate(ctx.candidates):
            m = mapped.get(qi, [])
            labels = [lab for lab, _, _ in m]
            scores = [1.0 + sim for _, sim, _ in m]
            rest = [lab for lab in c.labels if lab not in set(labels)]
            labels += rest
            scores += [1.0 - (i + 1) / (len(rest) + 1) for i in range(len(rest))]
            lm_score = {lab: 0.0 for lab in c.labels}
            for lab, sim, _ in m:
                if lab in lm_score:
                    lm_score[lab] = sim
            trace = {
                "ranker": "batched_generative",
                "answer": raw.get(qi, ""),
                "attempts": attempts[qi],
                "mapped": [[a, round(s, 4), h] for a, s, h in m],
                "lm_score": lm_score,
            }
            if not m:
                trace["batch_fallback"] = True
            out.append(Ranking(labels, np.array(scores), trace))
        return out
