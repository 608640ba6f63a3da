"""Rankers, reachable by registry name (``get_ranker("likelihood")``)."""

from iclcls.rank.base import RANKERS, BaseRanker, RankContext, Ranker, Ranking


def get_ranker(name: str, **options) -> Ranker:
    return RANKERS.get(name, **options)


from iclcls.rank import channel, chat, fusion, generative, likelihood, query_batch, retriever  # noqa: E402,F401  (register)

__all__ = ["RANKERS", "BaseRanker", "RankContext", "Ranker", "Ranking", "get_ranker"]
