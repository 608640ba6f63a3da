"""Continual addition: new examples and new classes update the pool, the index and each
stage's statistics in place; nothing is retrained or forgotten. Stages that cannot take an
addition exactly (``incremental = False``) are marked stale and refit by ``refresh_stale``
off the service's lock (a mixin of ICLClassifier)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np

from iclcls.classifier.base import ClassifierBase
from iclcls.errors import DataError
from iclcls.infer.summaries import summarize_classes
from iclcls.pool import Pool
from iclcls.types import Example


class Additions(ClassifierBase):
    """``add_examples``, ``add_classes``, ``prepare_additions``, ``refresh_stale``."""

    def add_examples(self, examples: Sequence[Example], *, embeddings: np.ndarray | None = None, generate: bool = True) -> Any:
        """Add examples (of known or new classes) in place: pool, index, stage statistics.

        ``embeddings`` are the examples' pool embeddings when already computed (the service
        embeds before it takes its write lock). ``generate=False`` never calls the LM: tags
        and summaries must already be there (replaying a logged addition must be deterministic),
        else ValueError before anything changes.
        """
        examples = list(examples)
        for i, ex in enumerate(examples):
            if not ex.labels:
                raise DataError(f"add_examples: example {i} has no label")
        if not examples:
            return self
        if not generate:
            self._check_nothing_to_generate(examples)
        new_ids = self.pool_.extend(self._with_tags(examples), embeddings)
        self.shortlister_.update(self.pool_, new_ids)
        if self.selector_ is not None:
            self.selector_.update(self.pool_, new_ids)
        self._summarize_missing()
        return self

    def add_classes(
        self,
        examples: Sequence[Example],
        *,
        descriptions: Mapping[str, str] | None = None,
        summaries: Mapping[str, str] | None = None,
        embeddings: np.ndarray | None = None,
        generate: bool = True,
    ) -> Any:
        """Add new classes by their examples: statistics update, nothing retrained or forgotten.

        ``summaries`` gives class summaries for the prompt; missing ones are written by the LM
        when the prompt shows summaries (unless ``generate=False``). ``embeddings`` and
        ``generate`` as in ``add_examples``.
        """
        if not generate:
            self._check_nothing_to_generate(examples, summaries=summaries)
        for lab, desc in (descriptions or {}).items():
            self.pool_.labels.add(lab, desc)
        self.summaries_.update(summaries or {})
        return self.add_examples(examples, embeddings=embeddings, generate=generate)

    def refresh_stale(self, *, swap: Any = None) -> list[str]:
        """Refit the stages that additions leave stale (``incremental = False`` and ``stale_``:
        the influence selector's regression, a trained CEIL adapter); return their names.

        The refit runs on a frozen view of the pool, outside any lock, so predictions and
        additions go on meanwhile; ``swap`` (a context-manager factory: the service's write
        lock) guards only the short swap, which also hands the fresh stage the additions made
        during the refit. Each stage records when it was refreshed (its ``refreshed_at``).
        """
        stage = self.selector_
        if stage is None or stage.incremental or not stage.stale_:
            return []
        n = len(self.pool_)
        fresh = copy.copy(stage)
        fresh.fit(self.pool_.frozen())
        with swap() if swap is not None else nullcontext():
            fresh.pool_ = self.pool_  # type: ignore[attr-defined]  # fitted stages keep it (not in the Protocol: isinstance would ask it of unfitted ones)
            if len(self.pool_) > n:
                fresh.update(self.pool_, np.arange(n, len(self.pool_), dtype=np.int64))
            self.selector_ = fresh
        return [type(stage).__name__]

    def prepare_additions(self, examples: Sequence[Example]) -> tuple[list[Example], dict[str, str]]:
        """What the LM would write while adding ``examples``, computed without changing any state:
        the examples with their tags (for a tags-input shortlister) and summaries of their classes
        that have none (when the prompt shows summaries). Pass both to ``add_classes`` to add them
        without LM calls, and log them so that replay is deterministic."""
        examples = self._with_tags(examples)
        if not self.builder_.class_summaries or self.lm_ is None:
            return examples, {}
        missing = sorted({ex.labels[0] for ex in examples if ex.labels} - set(self.summaries_))
        if not missing:
            return examples, {}
        scratch = Pool(self.pool_.embedder)  # only these classes' new examples, as the real pool will hold them
        scratch.extend([ex for ex in examples if ex.labels and ex.labels[0] in missing])
        summaries = summarize_classes(self.lm_, scratch, missing, show_progress=False, **dict(self.builder_.summary_options))
        return examples, summaries

    def _check_nothing_to_generate(self, examples: Sequence[Example], *, summaries: Mapping[str, str] | None = None) -> None:
        if self.shortlister_.input == "tags":
            untagged = [i for i, ex in enumerate(examples) if "tags" not in ex.metadata]
            if untagged:
                raise DataError(f"generate=False: examples {untagged[:5]} have no tags and the shortlister needs them")
        if self.builder_.class_summaries and self.lm_ is not None:
            have = set(self.summaries_) | set(summaries or {})
            missing = sorted({lab for ex in examples for lab in ex.labels} - have)
            if missing:
                raise DataError(f"generate=False: no summary for classes {missing[:5]} and the prompt shows summaries")
