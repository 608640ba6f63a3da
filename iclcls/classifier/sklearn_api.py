"""What scikit-learn expects of a classifier, on top of ``predict_detailed`` (rich predictions)
and ``decide`` (the label set a prediction stands for): ``predict`` returns labels,
``predict_proba`` a distribution over ``classes_``, ``score`` accuracy; texts come as a list
or a 1-d array, labels as ``y``. So ``cross_val_score``, ``GridSearchCV``, ``Pipeline`` and
``clone`` work. ICLClassifier and the DSPy program share it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin, clone
from sklearn.preprocessing import MultiLabelBinarizer

from iclcls.errors import DataError, NotFittedError
from iclcls.types import Example, Prediction, check_text
from iclcls.util import softmax


class SklearnClassifier(ClassifierMixin):
    """``predict``/``predict_proba``/``score`` from ``predict_detailed``, ``decide`` and ``classes_``."""

    multi_label: bool = False
    _fitted_attr = "pool_"
    _shared_params: tuple[str, ...] = ("lm", "embedder")  # loaded models: shared by clones, not copied

    def __sklearn_clone__(self) -> Any:
        """The same options, unfitted; an LM or embedder given as a loaded object is shared."""
        params = self.get_params(deep=False)
        return type(self)(**{k: v if k in self._shared_params else clone(v, safe=False) for k, v in params.items()})

    def predict_detailed(self, inputs: Iterable[str | Example], *, show_progress: bool | None = None) -> list[Prediction]:
        raise NotImplementedError

    def decide(self, pred: Prediction) -> tuple[str, ...]:
        raise NotImplementedError

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, self._fitted_attr)

    def _check_fitted(self, what: str) -> None:
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit(...) before {what}")

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.target_tags.multi_output = bool(self.multi_label)
        tags.non_deterministic = True  # an LM may sample; the retriever alone is deterministic
        return tags

    def predict(self, X: Iterable[str | Example], *, show_progress: bool | None = None) -> np.ndarray:
        """The predicted label of each input: an array of class names, or (multi-label) a binary
        indicator matrix over ``classes_`` (``decide``'s label sets). ``predict_detailed`` gives
        the ranking, scores, candidates, demonstrations and prompt of each."""
        return self.labels_of(self.predict_detailed(X, show_progress=show_progress))

    def labels_of(self, preds: Sequence[Prediction]) -> np.ndarray:
        """``predict``'s output for predictions already made."""
        if self.multi_label:
            return self._binarizer().transform([self.decide(p) for p in preds])
        return np.array([p.label for p in preds], dtype=object)

    def predict_proba(self, X: Iterable[str | Example]) -> np.ndarray:
        """A distribution over ``classes_`` per input: the softmax of its ranked scores, 0 for
        classes outside its shortlist. Calibrated only as far as the ranker's scores are
        (log-probabilities are; retriever similarities are not): ``predict_set`` gives sets
        with a coverage guarantee."""
        return self.proba_of(self.predict_detailed(X))

    def proba_of(self, preds: Sequence[Prediction]) -> np.ndarray:
        col = {c: j for j, c in enumerate(self.classes_)}
        out = np.zeros((len(preds), len(col)))
        for i, p in enumerate(preds):
            for lab, v in zip(p.labels, softmax(p.scores)):
                out[i, col[lab]] += v
        return out

    def score(self, X: Iterable[str | Example], y: Any, sample_weight: Any = None) -> float:
        """Accuracy (multi-label: exact-set accuracy); ``y`` as in ``fit``."""
        if self.multi_label and not (isinstance(y, np.ndarray) and y.ndim == 2):
            y = self._binarizer().transform([labels_tuple(v, i) for i, v in enumerate(y)])
        return super().score(X, y, sample_weight)

    def _binarizer(self) -> MultiLabelBinarizer:
        return MultiLabelBinarizer(classes=list(self.classes_)).fit([])


def labels_tuple(value: Any, i: int) -> tuple[str, ...]:
    """One ``y`` entry as a label tuple: a class name, or a list of them (multi-label)."""
    if isinstance(value, str):
        return (str(value),)
    if isinstance(value, (list, tuple, np.ndarray)) and all(isinstance(v, str) for v in value):
        return tuple(str(v) for v in value)
    raise DataError(f"y[{i}] must be a class name or a list of class names, got {type(value).__name__}")


def training_examples(X: Iterable[Any], y: Any = None) -> list[Example]:
    """``fit``'s inputs as Examples: Examples with labels, or texts (or Examples) with ``y``."""
    X = list(X)
    if y is None:
        for i, ex in enumerate(X):
            if not isinstance(ex, Example):
                raise TypeError(f"fit: example {i} must be an Example, got {type(ex).__name__} (or pass the labels as y)")
        return X
    y = list(y)
    if len(y) != len(X):
        raise DataError(f"fit: {len(X)} inputs but {len(y)} labels")
    out = []
    for i, (x, v) in enumerate(zip(X, y)):
        if isinstance(x, Example):
            out.append(replace(x, labels=labels_tuple(v, i)))
        elif isinstance(x, str):
            out.append(Example(text=check_text(str(x), f"fit: input {i}"), labels=labels_tuple(v, i)))
        else:
            raise TypeError(f"fit: input {i} must be a str or Example, got {type(x).__name__}")
    return out
