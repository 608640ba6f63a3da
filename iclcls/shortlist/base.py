"""Class shortlisters: from a label space of any size to the few candidates the LM ranks.

Protocol: ``fit(pool)`` builds state from the pool, ``update(pool, new_ids)`` takes new
examples (and classes) in place, ``shortlist(queries, k)`` returns ``Candidates`` per query,
best first, with retriever scores (higher is better) that the fusion ranker can mix in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from iclcls.pool import Pool
from iclcls.registry import Registry
from iclcls.types import Candidates, Query


@runtime_checkable
class Shortlister(Protocol):
    input: str  # "text": queries and pool by embedding; "tags": by the Infer stage's tags (InCA)

    def fit(self, pool: Pool) -> Shortlister: ...

    def update(self, pool: Pool, new_ids: np.ndarray) -> None: ...

    def shortlist(self, queries: Sequence[Query], k: int) -> list[Candidates]: ...

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]: ...

    def load_state_dict(self, pool: Pool, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None: ...


class BaseShortlister:
    """Default behaviour: state derives from the pool, so ``update`` refits and loading refits."""

    input = "text"

    def fit(self, pool: Pool) -> BaseShortlister:
        self.pool_ = pool
        return self

    def update(self, pool: Pool, new_ids: np.ndarray) -> None:
        self.fit(pool)

    def shortlist(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        raise NotImplementedError

    # Persistence: JSON-able metadata and named arrays; empty means "refit from the pool".
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {}

    def load_state_dict(self, pool: Pool, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.fit(pool)


def top_candidates(labels: Sequence[str], scores: np.ndarray, k: int) -> Candidates:
    """The k best labels by score (stable for ties: earlier label first)."""
    scores = np.asarray(scores, dtype=np.float64)
    k = min(k, len(labels))
    if k <= 0:
        return Candidates([], np.zeros(0))
    order = np.argsort(-scores, kind="stable")[:k]
    return Candidates([labels[i] for i in order], scores[order])


SHORTLISTERS: Registry[Shortlister] = Registry("shortlister")
