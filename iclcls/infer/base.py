"""Infer: the LM writes free-text guesses of the labels (IReRa) or tags (InCA) for each input.

The retriever then matches labels against the guesses, which bridges the gap between how
inputs are phrased and how labels are named.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from iclcls.lm.base import LM
from iclcls.registry import Registry
from iclcls.types import Example


@runtime_checkable
class Inferrer(Protocol):
    def infer(self, lm: LM, texts: Sequence[str], demonstrations: Sequence[Sequence[Example]] | None = None) -> list[list[str]]: ...


INFERRERS: Registry[Inferrer] = Registry("inferrer")
