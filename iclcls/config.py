"""Experiment and classifier configs (YAML), validated with pydantic.

Every stage is named by its registry name with its options, so a config reaches every
part of the library, and a sweep is a change of one key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


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
    """ICLClassifier options; ``program`` starts from a preset in iclcls.programs."""

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

    def build(self):
        from iclcls.classifier import ICLClassifier
        from iclcls.programs import PROGRAMS

        opts = self.model_dump(exclude={"program", "tune"}, exclude_unset=True)
        if "lm" in self.model_fields_set:
            opts["lm"] = self.lm
        if self.program:
            if self.program not in PROGRAMS:
                raise ValueError(f"unknown program {self.program!r}; known: {', '.join(PROGRAMS)}")
            base = PROGRAMS[self.program]()
            params = base.get_params(deep=False)
            params.update(opts)
            return ICLClassifier(**params)
        return ICLClassifier(**opts)


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
        raise ValueError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config must be a mapping, got {type(raw).__name__}")
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
        raise ValueError("\n".join(lines)) from None


def load_config(path: str | Path, model: type[BaseModel] = FitConfig) -> Any:
    return parse(model, load_yaml(path), path)
