"""A classifier built from its config, fitted on an experiment's splits and tuned on validation."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iclcls.errors import ConfigError, DataError
from iclcls.experiment.config import ClassifierConfig, EvalConfig
from iclcls.experiment.splits import Splits, load_splits
from iclcls.io import atomic_write_json, read_json
from iclcls.types import Example

# Programs that are not ICLClassifier presets but classifiers of their own with the same
# fit/predict/decide interface, built ``from_spec(classifier section)``; imported only when a
# config asks for one (DSPy is a heavy import).
OTHER_CLASSIFIERS = ("dspy_irera",)


def build_classifier(cfg: ClassifierConfig, *, lms: dict[str, Any] | None = None, quiet: bool = False) -> Any:
    """An unfitted ICLClassifier: the ``program`` preset's parameters, then the options set
    (or, for a program in ``OTHER_CLASSIFIERS``, that classifier built from the section).

    ``lms`` (spec -> loaded LM) shares LMs across runs: a spec loaded before is reused, and
    ``remember_lm`` adds the one a fit loads.
    """
    from iclcls.classifier import ICLClassifier
    from iclcls.programs import PROGRAMS

    if cfg.program in OTHER_CLASSIFIERS:
        from iclcls.programs.dspy.classifier import DSPyIReRaClassifier

        clf = DSPyIReRaClassifier.from_spec(cfg.model_dump(exclude={"tune"}, exclude_unset=True))
        return clf.set_params(show_progress=False) if quiet else clf
    opts = cfg.model_dump(exclude={"program", "tune"}, exclude_unset=True)
    if cfg.program:
        if cfg.program not in PROGRAMS:
            raise ConfigError(f"unknown program {cfg.program!r}; known: {', '.join([*PROGRAMS, *OTHER_CLASSIFIERS])}")
        opts = {**PROGRAMS[cfg.program]().get_params(deep=False), **opts}
    clf = ICLClassifier(**opts)
    if quiet:
        clf.set_params(show_progress=False)
    if lms is not None and isinstance(clf.lm, str) and clf.lm in lms:
        clf.set_params(lm=lms[clf.lm])
    return clf


def remember_lm(clf: Any, lms: dict[str, Any] | None) -> None:
    """After a fit: keep the LM it loaded from a spec, for the next classifier that names it."""
    if lms is not None and isinstance(clf.lm, str) and getattr(clf, "lm_", None) is not None:
        lms.setdefault(clf.lm, clf.lm_)


@dataclass
class Prepared:
    """A fitted classifier, the examples to score, and what fitting did."""

    classifier: Any
    examples: list[Example]
    splits: Splits
    info: dict[str, Any] = field(default_factory=dict)


def _resolve_priors(clf: Any, priors: Mapping[str, float] | None, benchmark: str) -> None:
    for key in ("shortlist", "select", "rank", "infer"):
        spec = getattr(clf, key)
        if isinstance(spec, Mapping) and spec.get("priors") == "benchmark":
            if not priors:
                raise ConfigError(f"classifier.{key}.priors is 'benchmark' but {benchmark} ships no label priors")
            clf.set_params(**{key: {**spec, "priors": dict(priors)}})


def _params_for_report(clf: Any) -> dict[str, Any]:
    def show(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: (f"<{len(x)} label priors>" if k == "priors" and isinstance(x, Mapping) else show(x)) for k, x in v.items()}
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if isinstance(v, (list, tuple)):
            return [show(x) for x in v]
        return getattr(v, "name", type(v).__name__)

    return {k: show(v) for k, v in clf.get_params(deep=False).items()}


def prepare(
    cfg: EvalConfig,
    *,
    tuned_path: str | Path | None = None,
    config_key: str | None = None,
    lm_cache: dict[str, Any] | None = None,
    show_progress: bool | None = None,
) -> Prepared:
    """Load the splits, build and fit the classifier, tune it on validation.

    With ``tuned_path`` the tuned state is saved there after tuning and, when that file
    already holds the state for ``config_key``, restored instead of tuning again.
    ``lm_cache`` (spec -> LM) shares loaded LMs across runs.
    """
    splits = load_splits(cfg.data)
    examples = splits.validation if cfg.eval.split == "validation" else splits.test
    dropped = sum(1 for ex in examples if not ex.labels)
    examples = [ex for ex in examples if ex.labels]
    if not examples:
        raise DataError(f"{splits.name}: the {cfg.eval.split} split has no labelled examples to score")
    clf = build_classifier(cfg.classifier, lms=lm_cache, quiet=show_progress is False)
    _resolve_priors(clf, splits.priors, splits.name)
    if "multi_label" not in cfg.classifier.model_fields_set and splits.multi_label:
        clf.set_params(multi_label=True)
    validation = splits.validation if cfg.classifier.tune and cfg.eval.split == "test" else []
    saved = read_json(tuned_path) if tuned_path is not None and Path(tuned_path).is_file() else {}
    saved = saved if saved.get("config_hash") == config_key else {}
    t0 = time.time()
    # A restored tuning is not redone; else validation when there is one, else cross-validation
    # on the pool (fit's default), unless tuning is off.
    mode = "none" if saved or not cfg.classifier.tune else ("validation" if validation else "auto")
    clf.fit(splits.train, labels=splits.labels, validation=validation or None, tune=mode)
    if saved:
        clf.tuned_ = dict(saved.get("tuned", {}))
        if clf.ranker_ is not None:  # None: a program that owns its stages (DSPy)
            clf.ranker_.load_tuned_state(saved.get("ranker_state", {}))
    elif tuned_path is not None:
        ranker_state = clf.ranker_.tuned_state() if clf.ranker_ is not None else {}
        atomic_write_json(tuned_path, {"config_hash": config_key, "tuned": clf.tuned_, "ranker_state": ranker_state})
    fit_seconds = time.time() - t0
    remember_lm(clf, lm_cache)
    info = {
        "benchmark": splits.name,
        "split": cfg.eval.split,
        "sizes": {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test), "labels": len(splits.labels)},
        "scored": len(examples),
        "dropped_unlabelled": dropped,
        "multi_label": bool(clf.multi_label),
        "tuned": dict(clf.tuned_),
        "tuned_on": 0 if saved else len(validation),
        "tuned_restored": bool(saved),
        "fit_seconds": round(fit_seconds, 2),
        "lm": getattr(getattr(clf, "lm_", None), "name", None),
        "embedder": getattr(clf.embedder_, "name", None),
        "classifier_params": _params_for_report(clf),
    }
    return Prepared(clf, examples, splits, info)
