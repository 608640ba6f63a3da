"""Demonstration selectors: which pool examples go into each query's prompt, in what order.

Protocol: ``fit(pool)``, ``update(pool, new_ids)``, and ``select(queries, candidates, k)``
returning pool positions per query in prompt order (the last one sits next to the query).
Selectors see the shortlist, so demonstrations can be restricted to candidate classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from iclcls.pool import Pool
from iclcls.types import Candidates, Query
from iclcls.registry import Registry


@runtime_checkable
class Selector(Protocol):
    def fit(self, pool: Pool) -> Selector: ...

    def update(self, pool: Pool, new_ids: np.ndarray) -> None: ...

    def select(self, queries: Sequence[Query], candidates: Sequence[Candidates], k: int) -> list[list[int]]: ...


class BaseSelector:
    """Shared options: restrict demonstrations to candidate classes; refit on update."""

    restrict_to_candidates: bool = True

    def fit(self, pool: Pool) -> BaseSelector:
        self.pool_ = pool
        return self

    def update(self, pool: Pool, new_ids: np.ndarray) -> None:
        self.fit(pool)

    def select(self, queries: Sequence[Query], candidates: Sequence[Candidates], k: int) -> list[list[int]]:
        raise NotImplementedError

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {}

    def load_state_dict(self, pool: Pool, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.fit(pool)

    def eligible(self, candidates: Candidates | None) -> np.ndarray:
        """Pool positions a query may draw from (candidate classes only, if restricted)."""
        pool = self.pool_
        if not self.restrict_to_candidates or candidates is None or not candidates.labels:
            return np.arange(len(pool))
        ids = sorted({i for lab in candidates.labels for i in pool.indices_of(lab)})
        return np.array(ids if ids else range(len(pool)), dtype=np.int64)


def order_by_similarity(ids: Sequence[int], sims: Sequence[float], order: str) -> list[int]:
    """``ascending``: least to most similar (most similar next to the query, the published best)."""
    if order not in ("ascending", "descending"):
        raise ValueError(f"order must be 'ascending' or 'descending', got {order!r}")
    pairs = sorted(zip(sims, ids), key=lambda t: t[0], reverse=(order == "descending"))
    return [int(i) for _, i in pairs]


SELECTORS: Registry[Selector] = Registry("selector")
