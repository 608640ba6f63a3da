"""Class-incremental task splits for continual-learning experiments.

Classes arrive in tasks (groups of new classes); each task trains on its own classes
and is tested on all classes seen so far. The grouping is a seeded shuffle, so a seed
names a class order exactly.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from iclcls.errors import ConfigError, DataError
from iclcls.types import Example, LabelSpace


def class_incremental_tasks(labels: LabelSpace | Sequence[str], *, n_tasks: int, seed: int = 0) -> list[list[str]]:
    """Shuffle the classes with ``seed`` and cut them into ``n_tasks`` groups of nearly equal size.

    Group sizes differ by at most one (the first groups take the remainder). The same
    labels and seed always give the same tasks.
    """
    names = list(labels.labels if isinstance(labels, LabelSpace) else labels)
    if len(set(names)) != len(names):
        raise DataError("labels must be distinct")
    if not isinstance(n_tasks, int) or n_tasks < 1:
        raise ConfigError(f"n_tasks must be a positive integer, got {n_tasks!r}")
    if n_tasks > len(names):
        raise ConfigError(f"n_tasks={n_tasks} is more than the {len(names)} classes")
    random.Random(seed).shuffle(names)
    size, extra = divmod(len(names), n_tasks)
    tasks, start = [], 0
    for t in range(n_tasks):
        end = start + size + (1 if t < extra else 0)
        tasks.append(names[start:end])
        start = end
    return tasks


def filter_by_labels(examples: Iterable[Example], labels: Iterable[str]) -> list[Example]:
    """The examples whose gold labels all lie in ``labels`` (order kept).

    "All" keeps a multi-label example out of a task until every one of its classes has
    arrived, so no task trains on a class it has not introduced.
    """
    allowed = set(labels.labels) if isinstance(labels, LabelSpace) else set(labels)
    return [ex for ex in examples if ex.labels and all(lab in allowed for lab in ex.labels)]
