"""Retriever order: no LM; the shortlister's scores decide (the baseline the LM must beat)."""

from __future__ import annotations

from iclcls.rank.base import RANKERS, BaseRanker, RankContext, Ranking, sort_ranking


@RANKERS.register("retriever")
class RetrieverRanker(BaseRanker):
    needs_lm = False

    def rank(self, ctx: RankContext) -> list[Ranking]:
        return [sort_ranking(c.labels, c.scores, {"ranker": "retriever"}) for c in ctx.candidates]
