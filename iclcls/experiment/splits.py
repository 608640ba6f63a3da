"""Turn a DataConfig into train/validation/test examples and a label space."""

from __future__ import annotations

import numpy as np

from iclcls.data.benchmark import Benchmark
from iclcls.experiment.config import DataConfig
from iclcls.types import Example, LabelSpace

Splits = Benchmark  # an experiment's splits are a benchmark, subsetted as configured


def subset(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A fixed, seeded random subset (the whole list when n is None or larger)."""
    if n is None or n >= len(examples):
        return list(examples)
    idx = np.random.default_rng(seed).choice(len(examples), size=n, replace=False)
    return [examples[i] for i in sorted(idx)]


def load_splits(cfg: DataConfig) -> Splits:
    if cfg.benchmark:
        from iclcls.data import load_benchmark

        b = load_benchmark(cfg.benchmark, data_dir=cfg.data_dir)
        train, val, test, labels = list(b.train), list(b.validation), list(b.test), b.labels
        name, multi, priors = b.name, b.multi_label, getattr(b, "priors", None)
    else:
        from iclcls.data import load_examples

        def read(path):
            return load_examples(path, text_field=cfg.text_field, label_field=cfg.label_field) if path else []

        train, val, test = read(cfg.train), read(cfg.validation), read(cfg.test)
        labels = LabelSpace.from_examples(train + val + test)
        name, multi, priors = cfg.train, any(len(e.labels) > 1 for e in train), None
    return Splits(
        name=name,
        train=subset(train, cfg.train_size, cfg.seed),
        validation=subset(val, cfg.validation_size, cfg.seed),
        test=subset(test, cfg.test_size, cfg.seed),
        labels=labels,
        multi_label=multi,
        priors=priors,
    )
