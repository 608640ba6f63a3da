"""Class means kept up to date by additions: shared by the class-mean and kNN-vote shortlisters."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from iclcls.pool import Pool
from iclcls.util import GrowingArray


class ClassMeans:
    """Unit-norm mean embedding of every class with examples, in label-space order.

    ``update`` costs O(new examples + their classes): touched means come from the pool's
    running sums, new classes are appended. It equals a rebuild, except when a class that
    gains its first examples sits before an older one in the label space (a class named
    earlier without examples): then it rebuilds, and says so by returning False.
    """

    def __init__(self, pool: Pool) -> None:
        self._rebuild(pool)

    def _rebuild(self, pool: Pool) -> None:
        labels, means = pool.class_means()
        self.labels: list[str] = labels
        self.index = {lab: i for i, lab in enumerate(labels)}
        self._means = GrowingArray(pool.dim)
        self._means.append(means)

    @property
    def means(self) -> np.ndarray:
        return self._means.view

    def update(self, pool: Pool, new_ids: Sequence[int] | np.ndarray) -> bool:
        touched = list(dict.fromkeys(lab for i in new_ids for lab in pool.examples[i].labels))
        new = [lab for lab in touched if lab not in self.index]
        last = pool.labels.index(self.labels[-1]) if self.labels else -1
        if any(pool.labels.index(lab) < last for lab in new):
            self._rebuild(pool)
            return False
        new.sort(key=pool.labels.index)
        old = [lab for lab in touched if lab in self.index]
        if old:
            self._means.set(np.array([self.index[lab] for lab in old]), pool.means_of(old))
        if new:
            for lab in new:
                self.index[lab] = len(self.labels)
                self.labels.append(lab)
            self._means.append(pool.means_of(new))
        return True
