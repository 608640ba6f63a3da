"""Random demonstrations: the baseline every selection study needs."""

from __future__ import annotations

from collections.abc import Sequence

from iclcls.select.base import SELECTORS, BaseSelector
from iclcls.types import Candidates, Query
from iclcls.util import query_rng


@SELECTORS.register("random")
class RandomSelector(BaseSelector):
    """k pool examples drawn per query, reproducible from (seed, query text)."""

    def __init__(self, *, seed: int = 0, restrict_to_candidates: bool = False) -> None:
        self.seed = seed
        self.restrict_to_candidates = restrict_to_candidates

    def select(self, queries: Sequence[Query], candidates: Sequence[Candidates], k: int) -> list[list[int]]:
        out = []
        for x, cand in zip(queries, candidates):
            ids = self.eligible(cand)
            rng = query_rng(self.seed, x.text)
            out.append([int(i) for i in rng.permutation(ids)[: max(k, 0)]])
        return out
