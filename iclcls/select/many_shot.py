"""Many-shot demonstrations (Agarwal et al. 2024; Baek et al. 2024): one long, fixed prefix.

The pool is put in ONE fixed order at ``fit`` (``random``, or ``class_balanced``: round-robin
over the classes, so the first k span min(k, classes) classes evenly) and every query gets the
same first k examples, in that order. With a prompt template that puts instructions and
demonstrations first and the query last (``classify_demos_first``), every prompt then starts
with the same text, so the LM can reuse its KV cache across queries: the likelihood ranker
passes that prefix to ``score_batch(..., shared_prefix=...)`` (transformers backend); vLLM's
prefix caching does the same by itself.

"Fill the token budget": ask for many shots (``shots`` large); the selector keeps as many as
fit ``budget_tokens`` (default: the bound LM's context window minus ``reserve_tokens`` for the
instructions, candidates, query and answer), so the prompt builder never has to drop
demonstrations query by query, which would break the shared prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from iclcls.pool import Pool
from iclcls.select.base import SELECTORS, BaseSelector, restore_positions, saved_ids
from iclcls.types import Candidates, Query

ORDERS = ("random", "class_balanced")


def class_round_robin(pool: Pool, rng: np.random.Generator) -> list[int]:
    """Seeded round-robin over classes (classes in a random order, examples shuffled within each)."""
    by: dict[str, list[int]] = {}
    for i, ex in enumerate(pool.examples):
        if ex.labels:
            by.setdefault(ex.labels[0], []).append(i)
    classes = sorted(by)
    classes = [classes[j] for j in rng.permutation(len(classes))]
    queues = [[by[c][j] for j in rng.permutation(len(by[c]))] for c in classes]
    out: list[int] = []
    depth = max((len(q) for q in queues), default=0)
    for r in range(depth):
        out.extend(q[r] for q in queues if r < len(q))
    return out


@SELECTORS.register("many_shot")
class ManyShotSelector(BaseSelector):
    """The same first k pool examples of one fixed order for every query (a shared prompt prefix)."""

    restrict_to_candidates = False

    def __init__(
        self,
        *,
        order: str = "random",
        seed: int = 0,
        budget_tokens: int | None = None,
        reserve_tokens: int = 256,
        demo_format: str = "Input: {text}\nLabel: {label}\n",
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"many_shot order must be one of {', '.join(ORDERS)}, got {order!r}")
        if budget_tokens is not None and budget_tokens < 1:
            raise ValueError(f"many_shot budget_tokens must be >= 1, got {budget_tokens}")
        self.order = order
        self.seed = seed
        self.budget_tokens = budget_tokens
        self.reserve_tokens = reserve_tokens
        self.demo_format = demo_format
        self.lm_: Any = None

    def bind_lm(self, lm: Any) -> None:
        """The LM whose tokenizer and context window size the budget (bound by the classifier)."""
        self.lm_ = lm
        self._lengths: dict[int, int] = {}

    def fit(self, pool: Pool) -> ManyShotSelector:
        self.pool_ = pool
        rng = np.random.default_rng(self.seed)
        if self.order == "random":
            labelled = [i for i, ex in enumerate(pool.examples) if ex.labels]
            self.order_ = [labelled[j] for j in rng.permutation(len(labelled))]
        else:
            self.order_ = class_round_robin(pool, rng)
        self._lengths = {}
        return self

    def _budget(self) -> int | None:
        if self.budget_tokens is not None:
            return self.budget_tokens
        if self.lm_ is not None:
            return max(0, int(self.lm_.context_window) - self.reserve_tokens)
        return None

    def _tokens(self, i: int) -> int:
        n = self._lengths.get(i)
        if n is None:
            ex = self.pool_.examples[i]
            text = self.demo_format.format(text=ex.text, label=", ".join(ex.labels))
            n = self.lm_.count_tokens(text) if self.lm_ is not None else len(text) // 3 + 1
            self._lengths[i] = n
        return n

    def demonstrations(self, k: int) -> list[int]:
        """The fixed prefix: the first k of the order that fit the token budget together."""
        ids = self.order_[: max(k, 0)]
        budget = self._budget()
        if budget is None:
            return list(ids)
        out, used = [], 0
        for i in ids:
            used += self._tokens(i)
            if used > budget:
                break
            out.append(i)
        return out

    def select(self, queries: Sequence[Query], candidates: Sequence[Candidates], k: int) -> list[list[int]]:
        ids = self.demonstrations(k)
        return [list(ids) for _ in queries]

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"order_ids": saved_ids(self.pool_, self.order_)}, {"order": np.array(self.order_, dtype=np.int64)}

    def load_state_dict(self, pool: Pool, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.pool_ = pool
        self._lengths = {}
        self.order_ = restore_positions(pool, meta.get("order_ids"), arrays["order"], "many_shot")
