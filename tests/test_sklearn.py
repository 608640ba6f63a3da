"""ICLClassifier as a scikit-learn estimator on BANKING77 (real embedder, retriever only):
cross_val_score, GridSearchCV, Pipeline, clone, predict/predict_proba/score, and the
estimator checks that apply to text input."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError as SklearnNotFitted
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils import estimator_checks as checks
from sklearn.utils.validation import check_is_fitted

from iclcls import ICLClassifier, IclclsError, NotFittedError, UntrustedStateError
from iclcls.data import load_benchmark
from iclcls.experiment import subset


@pytest.fixture(scope="module")
def banking(data_dir):
    b = load_benchmark("banking77_10shot", data_dir=data_dir)
    train = subset(b.train, 300, 0)
    test = subset(b.test, 120, 0)
    return [e.text for e in train], [e.label for e in train], [e.text for e in test], [e.label for e in test]


def test_cross_val_score_runs_on_texts_and_labels(banking, embedder):
    X, y, _, _ = banking
    scores = cross_val_score(ICLClassifier(lm=None, shortlist="knn_vote", embedder=embedder), X, y, cv=3, error_score="raise")
    assert scores.shape == (3,) and np.all(scores > 0.3)  # 77 classes: chance is 1.3%


def test_grid_search_over_shortlist_options(banking, embedder):
    X, y, Xt, yt = banking
    grid = GridSearchCV(
        ICLClassifier(embedder=embedder), {"shortlist_k": [1, 5], "shortlist": ["knn_vote", "class_mean"]},
        cv=3, error_score="raise",
    ).fit(X, y)
    assert len(grid.cv_results_["mean_test_score"]) == 4 and np.all(np.isfinite(grid.cv_results_["mean_test_score"]))
    assert grid.best_params_["shortlist"] in ("knn_vote", "class_mean")
    assert grid.score(Xt, yt) > 0.3


def test_predict_returns_labels_and_proba_is_a_distribution_over_classes(banking, embedder):
    X, y, Xt, yt = banking
    clf = ICLClassifier(embedder=embedder).fit(X, y)
    pred = clf.predict(Xt)
    assert isinstance(pred, np.ndarray) and pred.shape == (len(Xt),) and set(pred) <= set(clf.classes_)
    proba = clf.predict_proba(Xt)
    assert proba.shape == (len(Xt), len(clf.classes_)) and np.allclose(proba.sum(axis=1), 1.0)
    assert list(clf.classes_[proba.argmax(axis=1)]) == list(pred)
    assert clf.score(Xt, yt) == pytest.approx(np.mean(pred == np.array(yt, dtype=object)))
    detailed = clf.predict_detailed(Xt[:3])
    assert [p.label for p in detailed] == list(pred[:3]) and detailed[0].candidates  # the rich results stay


def test_pipeline_and_multi_label_targets(banking, embedder):
    X, y, Xt, yt = banking
    pipe = Pipeline([("lower", FunctionTransformer(lambda texts: [t.lower() for t in texts])),
                     ("clf", ICLClassifier(embedder=embedder))]).fit(X, y)
    assert pipe.score(Xt, yt) > 0.3
    multi = ICLClassifier(embedder=embedder, multi_label=True, top_k=2).fit(X, [[lab] for lab in y])
    ind = multi.predict(Xt[:5])
    assert ind.shape == (5, len(multi.classes_)) and set(ind.sum(axis=1)) == {2}
    assert 0.0 <= multi.score(Xt[:5], [[lab] for lab in yt[:5]]) <= 1.0


def test_clone_of_a_fitted_classifier_is_unfitted_with_the_same_params(banking, embedder):
    X, y, _, _ = banking
    fitted = ICLClassifier(embedder=embedder, shortlist={"name": "knn_vote", "neighbors": 20}, shots=2).fit(X, y)
    twin = clone(fitted)
    assert twin.get_params() == fitted.get_params() and twin.embedder is embedder  # the model is shared
    assert twin.shortlist is not fitted.shortlist  # plain options are copied
    check_is_fitted(fitted)
    with pytest.raises(SklearnNotFitted):
        check_is_fitted(twin)
    with pytest.raises(NotFittedError, match="not fitted"):  # also a scikit-learn NotFittedError
        twin.predict(X[:1])
    assert twin.set_params(shortlist_k=3).shortlist_k == 3 and fitted.shortlist_k == 10


@pytest.mark.parametrize("check", [
    checks.check_parameters_default_constructible, checks.check_no_attributes_set_in_init,
    checks.check_get_params_invariance, checks.check_set_params,
])
def test_estimator_checks_that_apply_to_text_input(check):
    check("ICLClassifier", ICLClassifier())


def test_one_error_hierarchy():
    assert issubclass(UntrustedStateError, IclclsError) and issubclass(UntrustedStateError, ValueError)
    assert issubclass(NotFittedError, IclclsError) and issubclass(NotFittedError, SklearnNotFitted)
