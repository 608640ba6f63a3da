"""What ``fit`` learns beyond the retriever's statistics: the ranker's tuned options (the
fusion weight), the multi-label threshold and the conformal calibration, from validation
predictions or from cross-validation predictions of the pool (a mixin of ICLClassifier)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from iclcls.classifier.base import ClassifierBase
from iclcls.classifier.specs import spec_of
from iclcls.errors import ConfigError, DataError
from iclcls.types import Example, Prediction


class NotCalibrated(ConfigError, RuntimeError):
    """Conformal sets were asked of a classifier fitted without tuning data."""


class Tuning(ClassifierBase):
    """Tuning and calibration; the classifier's ``fit`` calls ``tune`` or ``tune_cv``."""

    def tune(self, validation: Sequence[Example]) -> Any:
        """Tune the ranker (e.g. the fusion weight) and the multi-label threshold on validation data."""
        validation = [ex for ex in validation if ex.labels]
        if not validation:
            raise DataError("tune: the validation examples carry no labels")
        return self._tune_on(validation, lambda: self.predict_detailed(validation), tuned_on=f"validation ({len(validation)})")

    def tune_cv(self, examples: Sequence[Example], *, size: int = 200, folds: int = 5, seed: int = 0) -> Any:
        """Tune and calibrate on cross-validation predictions of (a seeded subset of) the pool."""
        held, predict = self._cv_plan(list(examples), size=size, folds=folds, seed=seed)
        if not held:
            return self
        return self._tune_on(held, predict, tuned_on=f"cv ({len(held)} pool examples, {folds} folds, seed {seed})")

    def cross_val_predict(
        self, examples: Sequence[Example], *, size: int = 200, folds: int = 5, seed: int = 0
    ) -> tuple[list[Example], list[Prediction]]:
        """Predictions for a seeded subset of ``examples``, each from a classifier fitted without its fold."""
        held, predict = self._cv_plan(list(examples), size=size, folds=folds, seed=seed)
        return (held, predict()) if held else ([], [])

    def _cv_plan(self, examples: list[Example], *, size: int, folds: int, seed: int):
        """Held-out examples and a function predicting each with a classifier fitted without its fold."""
        labelled = [i for i, ex in enumerate(examples) if ex.labels]
        folds = max(2, int(folds))
        if len(labelled) < 2 * folds:
            return [], None
        rng = np.random.default_rng(seed)
        pick = sorted(rng.choice(labelled, size=min(size, len(labelled)), replace=False).tolist())
        fold_of = {i: f for f, part in enumerate(np.array_split(rng.permutation(pick), folds)) for i in part.tolist()}
        held = [examples[i] for i in pick]
        # Pool examples carry their Infer tags already: folds reuse them instead of re-inferring.
        pool_examples = self.pool_.examples if len(self.pool_.examples) == len(examples) else examples

        # Each fold builds fresh stages from their specs, sharing only the LM and the embedder.
        fold_params = {
            **self.get_params(deep=False),
            "lm": self.lm_,
            "embedder": self.embedder_,
            "show_progress": False,
            "shortlist": spec_of(self.shortlist, self.shortlister_),
            "select": spec_of(self.select, self.selector_),
            "rank": spec_of(self.rank_spec(), self.ranker_),
        }

        def predict() -> list[Prediction]:
            out: dict[int, Prediction] = {}
            with tqdm(total=len(pick), desc="cross-validate", unit="ex", disable=self.show_progress is False) as bar:
                for f in range(folds):
                    test_ids = [i for i in pick if fold_of[i] == f]
                    keep = [ex for i, ex in enumerate(pool_examples) if fold_of.get(i) != f]
                    sub = type(self)(**fold_params)
                    sub.fit(keep, labels=self.pool_.labels, tune="none")
                    for i, p in zip(test_ids, sub.predict_detailed([examples[i] for i in test_ids], show_progress=False)):
                        out[i] = p
                    bar.update(len(test_ids))
            return [out[i] for i in pick]

        return held, predict

    def _tune_on(self, examples: Sequence[Example], predict, *, tuned_on: str) -> Any:
        preds = predict()
        gold = [ex.labels for ex in examples]
        tuned = dict(self.ranker_.tune([p.trace for p in preds], gold))
        if tuned:  # the ranker changed: so did its scores
            preds = self._rescored(preds, predict)
        if self.multi_label and self.top_k is None:
            tuned["threshold"] = _best_threshold(preds, gold)
        tuned["tuned_on"] = tuned_on
        tuned["conformal"] = self._calibration(preds, gold)
        self.tuned_ = tuned
        self.tuning_predictions_ = preds  # in memory only (not saved): reports and model selection read them
        return self

    def _rescored(self, preds: list[Prediction], predict) -> list[Prediction]:
        """Predictions under the tuned ranker: re-scored from their traces when it can, else re-run."""
        out = []
        for p in preds:
            r = self.ranker_.rescore(p.trace)
            if r is None:
                return predict()
            out.append(replace(p, labels=tuple(r.labels), scores=tuple(float(x) for x in r.scores), trace={**p.trace, **r.trace}))
        return out

    def _calibration(self, preds: Sequence[Prediction], gold: Sequence[Sequence[str]]) -> dict[str, Any]:
        """What conformal sets need later: single-label nonconformity scores, or the multi-label predictions."""
        from iclcls.rank.conformal import nonconformity

        if self.multi_label:
            return {
                "kind": "multi",
                "n": len(preds),
                "preds": [[list(p.labels[:50]), [round(float(x), 6) for x in p.scores[:50]], list(g)] for p, g in zip(preds, gold)],
            }
        return {"kind": "single", "n": len(preds), "scores": [round(nonconformity(p.labels, p.scores, g), 6) for p, g in zip(preds, gold)]}

    def predict_set(self, inputs: Iterable[str | Example], *, alpha: float = 0.1) -> list[tuple[str, ...]]:
        """Conformal label sets: each holds the gold label with probability >= 1 - alpha (single-label),
        or misses at most an alpha share of gold labels in expectation (multi-label, risk control).

        Calibrated on the tuning predictions ``fit`` made (cross-validation or validation)."""
        self._calibration_data("predict_set")
        return self.conformal_sets(self.predict_detailed(inputs), alpha=alpha)

    def _calibration_data(self, what: str) -> dict[str, Any]:
        self._check_fitted(what)
        cal = self.tuned_.get("conformal") or {}
        if not cal.get("n"):
            raise NotCalibrated(f"{what} needs conformal calibration: fit with tune='cv' or validation=")
        return cal

    def conformal_sets(self, preds: Sequence[Prediction], *, alpha: float = 0.1) -> list[tuple[str, ...]]:
        """``predict_set`` for predictions already made (no second LM pass)."""
        from iclcls.rank import conformal as cp

        cal = self._calibration_data("conformal_sets")
        if cal["kind"] == "multi":
            lam = cp.crc_lambda([(labs, sc) for labs, sc, _ in cal["preds"]], [g for _, _, g in cal["preds"]], alpha)
            return [cp.multi_label_set(p.labels, p.scores, lam) or p.labels[:1] for p in preds]
        qhat = cp.conformal_quantile(cal["scores"], alpha)
        return [cp.single_label_set(p.labels, p.scores, qhat) for p in preds]


def _best_threshold(preds: Sequence[Prediction], gold: Sequence[Sequence[str]]) -> float:
    """The score threshold with the best micro-F1 on validation (top-1 always kept)."""
    cand = np.unique(np.concatenate([np.asarray(p.scores[:20]) for p in preds if p.scores] or [np.zeros(1)]))
    best, best_f1 = float(cand.max()), -1.0
    for thr in cand[:: max(1, len(cand) // 200)]:
        tp = fp = fn = 0
        for p, g in zip(preds, map(set, gold)):
            chosen = {lab for lab, s in zip(p.labels, p.scores) if s >= thr} or {p.labels[0]}
            tp += len(chosen & g)
            fp += len(chosen - g)
            fn += len(g - chosen)
        f1 = 2 * tp / max(2 * tp + fp + fn, 1)
        if f1 > best_f1:
            best, best_f1 = float(thr), f1
    return best
