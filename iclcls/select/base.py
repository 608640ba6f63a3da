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
from iclcls.registry import Registry
from iclcls.types import Candidates, Query


@runtime_checkable
class Selector(Protocol):
    @property
    def needs_lm(self) -> bool: ...  # trains with the LM (bind_lm); a saved state does not retrain

    incremental: bool  # False: additions leave it stale until refreshed (``stale_``, ``refresh_stale``)

    def fit(self, pool: Pool) -> Selector: ...

    def update(self, pool: Pool, new_ids: np.ndarray) -> None: ...

    def select(self, queries: Sequence[Query], candidates: Sequence[Candidates], k: int) -> list[list[int]]: ...

    def bind_lm(self, lm: Any) -> None: ...

    @property
    def stale_(self) -> bool: ...

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]: ...

    def load_state_dict(self, pool: Pool, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None: ...


class BaseSelector:
    """Shared options: restrict demonstrations to candidate classes; refit on update."""

    restrict_to_candidates: bool = True
    incremental = True

    @property
    def needs_lm(self) -> bool:
        return False

    @property
    def stale_(self) -> bool:
        return False

    def bind_lm(self, lm: Any) -> None:
        """Selectors that size or train with the LM keep it (many-shot, CEIL)."""

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


def saved_ids(pool: Pool, positions: Sequence[int]) -> list[str] | None:
    """Example ids of pool positions (a state that survives a reordered pool); None if any has no id."""
    ids = [x for x in (pool.examples[i].id for i in positions) if x is not None]
    return ids if len(ids) == len(positions) else None


def restore_positions(pool: Pool, ids: Sequence[str] | None, positions: Sequence[int] | np.ndarray, what: str) -> list[int]:
    """Pool positions from a saved state: by example id when the state has ids, else the positions, checked."""
    if ids is not None:
        by_id = {ex.id: i for i, ex in enumerate(pool.examples) if ex.id is not None}
        missing = [x for x in ids if x not in by_id]
        if missing:
            raise ValueError(f"{what} state names {len(missing)} example ids not in the pool, e.g. {missing[0]!r}")
        return [by_id[x] for x in ids]
    positions = [int(i) for i in positions]
    if any(i >= len(pool) for i in positions):
        raise ValueError(f"{what} state refers to pool positions beyond the pool's size")
    return positions


SELECTORS: Registry[Selector] = Registry("selector")
