"""Experiment and classifier configs (YAML), validated with pydantic.

Every stage is named by its registry name with its options, so a config reaches every
part of the library, and a sweep is a change of one key.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from iclcls.errors import ConfigError


class DataConfig(BaseModel):
    """Where examples come from: a named benchmark, or local files."""

    model_config = ConfigDict(extra="forbid")
    benchmark: str | None = None
    data_dir: str | None = None
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    train_size: int | None = Field(default=None, ge=1, description="a seeded random subset of the train split (the pool)")
    test_size: int | None = Field(default=None, ge=1, description="a seeded random subset of the test split")
    validation_size: int | None = Field(default=200, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if not self.benchmark and not self.train:
            raise ValueError("data needs either 'benchmark' or a 'train' file")
        return self


class ClassifierConfig(BaseModel):
    """ICLClassifier options; ``program`` starts from a preset in iclcls.programs
    (``iclcls.experiment.build_classifier`` builds it)."""

    model_config = ConfigDict(extra="forbid")
    program: str | None = None
    lm: str | None = None
    embedder: str | None = None
    shortlist: str | dict[str, Any] | None = None
    shortlist_k: int | None = Field(default=None, ge=1)
    select: str | dict[str, Any] | None = None
    shots: int | None = Field(default=None, ge=0)
    rank: str | dict[str, Any] | None = None
    infer: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    multi_label: bool | None = None
    top_k: int | None = None
    threshold: float | None = None
    batch_size: int | None = Field(default=None, ge=1)
    tune: bool = True
    compiled: str | None = Field(default=None, description="program dspy_irera: the folder `iclcls compile` wrote")
    dspy: dict[str, Any] | None = Field(default=None, description="program dspy_irera: the options `iclcls compile` reads")

    @model_validator(mode="after")
    def _dspy_options(self) -> ClassifierConfig:
        if (self.compiled or self.dspy) and self.program != "dspy_irera":
            raise ValueError("'compiled' and 'dspy' are options of program dspy_irera (a compiled DSPy program)")
        return self


class FitConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    data: DataConfig
    classifier: ClassifierConfig = ClassifierConfig()


class ReferenceResult(BaseModel):
    """Published numbers to print beside ours (in percent, as papers print them)."""

    model_config = ConfigDict(extra="forbid")
    source: str
    percent: dict[str, float]


class EvalOptions(BaseModel):
    """How ``iclcls eval`` scores and reports a run."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, description="run name (default: the config file's stem)")
    split: Literal["test", "validation"] = "test"
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], description="k for P@k, R@k, RP@k, nDCG@k")
    primary: str | None = Field(default=None, description="the headline metric (default: accuracy, or micro_f1 for multi-label)")
    checkpoint_every: int | None = Field(default=None, ge=1, description="examples per checkpointed chunk (default: batch_size)")
    per_class: bool = Field(default=True, description="single-label: plot per-class accuracy with Wilson intervals")
    references: list[ReferenceResult] = Field(default_factory=list)
    notes: str | None = Field(default=None, description="free text for the report (subsets used, caveats)")

    @model_validator(mode="after")
    def _positive_ks(self) -> EvalOptions:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be a non-empty list of integers >= 1, got {self.ks}")
        self.ks = sorted(set(self.ks))
        return self


class EvalConfig(BaseModel):
    """An experiment: data, classifier, and evaluation options.

    In a classifier stage spec, ``priors: benchmark`` stands for the benchmark's label
    priors (ESCO), filled in when the run starts.
    """

    model_config = ConfigDict(extra="forbid")
    data: DataConfig
    classifier: ClassifierConfig = ClassifierConfig()
    eval: EvalOptions = EvalOptions()


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(raw).__name__}")
    return raw


def parse(model: type[BaseModel], raw: dict[str, Any], path: str | Path) -> Any:
    """Validate ``raw``; errors name the file and the field path (e.g. classifier.shots)."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        lines = [f"{path}: invalid config"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path, model: type[BaseModel] = FitConfig) -> Any:
    return parse(model, load_yaml(path), path)


# -- overrides (``--set shots=4``, sweep axes) and the hash of what decides the predictions ------

_SECTIONS: dict[str, type[BaseModel]] = {"classifier": ClassifierConfig, "data": DataConfig, "eval": EvalOptions}


def _qualify(key: str) -> str:
    """``shots`` -> ``classifier.shots``, ``shortlist.prior_a`` -> ``classifier.shortlist.prior_a``;
    keys that start with a section (``data.test_size``) pass through."""
    head = key.partition(".")[0]
    if head in _SECTIONS:
        return key
    for section, model in _SECTIONS.items():
        if head in model.model_fields:
            return f"{section}.{key}"
    known = sorted(f for m in _SECTIONS.values() for f in m.model_fields)
    raise ConfigError(f"unknown option {key!r}: use a dotted path (classifier.shots) or one of: {', '.join(known)}")


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``a.b.c``; a stage given by name becomes ``{"name": ...}``."""
    parts = _qualify(dotted).split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif isinstance(nxt, str) and i >= 1:  # e.g. classifier.select: knn -> {"name": "knn"}
            nxt = node[part] = {"name": nxt}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {dotted}: {'.'.join(parts[: i + 1])} is {nxt!r}, not a mapping")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``raw`` with dotted-key (or short-key) overrides applied."""
    out = copy.deepcopy(dict(raw))
    for key, value in overrides.items():
        set_path(out, key, value)
    return out


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def parse_assignments(items: Sequence[str], *, grid: bool = False) -> dict[str, Any]:
    """``["shots=4", "select=knn"]`` -> ``{"shots": 4, "select": "knn"}``.

    With ``grid``, values are comma-separated lists (``shots=2,4,8`` -> ``[2, 4, 8]``); each
    item is read as YAML, so numbers and booleans get their types.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"expected KEY=VALUE, got {item!r}")
        _qualify(key)
        if key in out:
            raise ConfigError(f"option {key!r} is given twice")
        out[key] = [_scalar(v.strip()) for v in value.split(",")] if grid else _scalar(value.strip())
        if grid and not all(str(v) != "" for v in out[key]):
            raise ConfigError(f"empty value in {item!r}")
    return out


def load_eval_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> EvalConfig:
    """Read and validate a config file, applying overrides first; errors name the file and field."""
    raw = load_yaml(path)
    cfg = parse(EvalConfig, apply_overrides(raw, overrides) if overrides else raw, path)
    if cfg.eval.name is None:
        cfg.eval.name = Path(path).stem
    return cfg


def config_hash(cfg: EvalConfig) -> str:
    """What decides the predictions: data, classifier, and the split scored (not report options)."""
    key = {"data": cfg.data.model_dump(mode="json"), "classifier": cfg.classifier.model_dump(mode="json"),
           "split": cfg.eval.split}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
