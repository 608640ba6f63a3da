"""Rankers: order a query's candidate labels, with or without the LM.

Protocol: ``rank(ctx) -> list[Ranking]``; ``needs_lm`` says whether prompts must be built.
Rankers that learn from validation data (fusion weight, multi-label threshold) implement
``tune(rankings, gold)`` over rankings already computed, so tuning costs no extra LM calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from iclcls.lm.base import LM
from iclcls.pool import Pool
from iclcls.prompt import PromptBuilder, RenderedPrompt
from iclcls.registry import Registry
from iclcls.types import Candidates, Query


@dataclass
class RankContext:
    lm: LM | None
    queries: Sequence[Query]
    candidates: Sequence[Candidates]
    prompts: Sequence[RenderedPrompt]
    builder: PromptBuilder
    pool: Pool


@dataclass
class Ranking:
    labels: list[str]
    scores: np.ndarray
    trace: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Ranker(Protocol):
    needs_lm: bool

    @property
    def needs_prompts(self) -> bool: ...  # the classifier builds prompts (with demonstrations) for it

    reads_images: bool  # False: queries with images go to the chat ranker instead

    def rank(self, ctx: RankContext) -> list[Ranking]: ...

    def tune(self, traces: Sequence[dict[str, Any]], gold: Sequence[Sequence[str]]) -> dict[str, Any]: ...

    def rescore(self, trace: Mapping[str, Any]) -> Ranking | None: ...

    def tuned_state(self) -> dict[str, Any]: ...

    def load_tuned_state(self, state: dict[str, Any]) -> None: ...


class BaseRanker:
    needs_lm = True
    reads_images = False

    @property
    def needs_prompts(self) -> bool:
        return self.needs_lm

    def rank(self, ctx: RankContext) -> list[Ranking]:
        raise NotImplementedError

    def rescore(self, trace: Mapping[str, Any]) -> Ranking | None:
        """The ranking again from a trace, after ``tune`` (None: only re-running ranks again)."""
        return None

    def tune(self, traces: Sequence[dict[str, Any]], gold: Sequence[Sequence[str]]) -> dict[str, Any]:
        """Fit options from validation traces; return what was tuned (empty: nothing to tune)."""
        return {}

    def tuned_state(self) -> dict[str, Any]:
        return {}

    def load_tuned_state(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def sort_ranking(labels: Sequence[str], scores: np.ndarray, trace: dict | None = None) -> Ranking:
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return Ranking([labels[i] for i in order], np.asarray(scores, dtype=np.float64)[order], trace or {})


def log_softmax(x: np.ndarray | Sequence[float]) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if not len(x):
        return x
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return np.zeros_like(x)
    sd = x.std()
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


RANKERS: Registry[Ranker] = Registry("ranker")
