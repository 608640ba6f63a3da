"""Fixed demonstrations: the same examples for every query (given, or drawn once with a seed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from iclcls.pool import Pool
from iclcls.select.base import SELECTORS, BaseSelector
from iclcls.types import Candidates, Query


@SELECTORS.register("fixed")
class FixedSelector(BaseSelector):
    """``ids``: example ids (``Example.id``) or pool positions; else ``k`` drawn once with ``seed``."""

    restrict_to_candidates = False

    def __init__(self, *, ids: Sequence[str | int] | None = None, seed: int = 0) -> None:
        self.ids = list(ids) if ids is not None else None
        self.seed = seed

    def fit(self, pool: Pool) -> FixedSelector:
        self.pool_ = pool
        if self.ids is None:
            self.chosen_ = None
            return self
        by_id = {ex.id: i for i, ex in enumerate(pool.examples) if ex.id is not None}
        chosen = []
        for x in self.ids:
            if isinstance(x, str) and x in by_id:
                chosen.append(by_id[x])
            elif isinstance(x, int) and 0 <= x < len(pool):
                chosen.append(x)
            else:
                raise KeyError(f"fixed selector: no pool example with id {x!r}")
        self.chosen_ = chosen
        return self

    def select(self, queries: Sequence[Query], candidates: Sequence[Candidates], k: int) -> list[list[int]]:
        if self.chosen_ is not None:
            ids = self.chosen_[:k] if k >= 0 else self.chosen_
        else:
            rng = np.random.default_rng(self.seed)
            ids = [int(i) for i in rng.permutation(len(self.pool_))[:k]]
        return [list(ids) for _ in queries]
