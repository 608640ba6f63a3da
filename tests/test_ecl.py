"""The Gaussian external continual learner: exact statistics, whitening, order invariance,
save/load, class addition on real data (CLINC150 subset), tags input and class summaries."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from iclcls.classifier import ICLClassifier
from iclcls.shortlist import SHORTLISTERS
from iclcls.shortlist.ecl import GaussianECL, GaussianStats, inverse_sqrt, oas_coefficient, shrink
from iclcls.types import Example

# ---------------------------------------------------------------- arrays only (fast)


def _blobs(n_classes=12, per_class=30, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = 3 * rng.standard_normal((n_classes, dim))
    mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    y = np.repeat(np.arange(n_classes), per_class)
    x = centres[y] + rng.standard_normal((len(y), dim)) @ mix
    return x, y


def test_stats_equal_direct_computation():
    x, y = _blobs()
    st = GaussianStats(x.shape[1])
    for part in np.array_split(np.random.default_rng(1).permutation(len(x)), 5):  # shuffled arrival
        st.add(x[part], y[part])
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    centred = x - means[y]
    cov = centred.T @ centred / (len(x) - len(classes))
    assert st.n_classes == len(classes) and st.n_total == len(x)
    np.testing.assert_allclose(st.counts, np.bincount(y))
    np.testing.assert_allclose(st.means(), means, atol=1e-12)
    np.testing.assert_allclose(st.covariance(), cov, atol=1e-10)


def test_whitened_search_is_mahalanobis():
    x, y = _blobs()
    ecl = GaussianECL(shrinkage="ledoit_wolf", alpha=0.2).fit_vectors(x, y)
    st = ecl.stats_
    sigma = shrink(st.covariance(), method="ledoit_wolf", alpha=0.2)
    prec = np.linalg.inv(sigma)
    q = x[::37] + 0.1
    scores, ids = ecl.search_vectors(q, 4)
    diff = q[:, None, :] - st.means()[None, :, :]
    d2 = np.einsum("qcd,de,qce->qc", diff, prec, diff)
    want = np.argsort(d2, axis=1)[:, :4]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(-scores, np.take_along_axis(d2, want, 1), rtol=1e-3)
    w = inverse_sqrt(sigma)
    np.testing.assert_allclose(w @ sigma @ w, np.eye(len(w)), atol=1e-8)


def test_shrinkage_options_and_errors():
    cov = np.diag([4.0, 1.0, 1.0])
    np.testing.assert_allclose(shrink(cov, method="ridge", alpha=0.5), np.diag([5.0, 2.0, 2.0]))
    np.testing.assert_allclose(shrink(cov, method="ledoit_wolf", alpha=0.5), np.diag([3.0, 1.5, 1.5]))
    np.testing.assert_allclose(shrink(np.zeros((3, 3)), method="ridge", alpha=0.1), np.eye(3))
    # alpha="oas": the coefficient scikit-learn's OAS estimator picks for the same covariance and n.
    from sklearn.covariance import oas

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 10)) @ rng.standard_normal((10, 10))
    emp = x.T @ x / len(x)
    want, rho = oas(x, assume_centered=True)
    assert oas_coefficient(emp, len(x)) == pytest.approx(rho)
    np.testing.assert_allclose(shrink(emp, method="ledoit_wolf", alpha="oas", n=len(x)), want, atol=1e-10)
    for bad in ({"input": "image"}, {"shrinkage": "oas"}, {"alpha": -1}, {"rewhiten": "never"},
                {"shrinkage": "ledoit_wolf", "alpha": 1.5}, {"shrinkage": "ridge", "alpha": "oas"}, {"alpha": "auto"}):
        with pytest.raises((ValueError, TypeError)):
            SHORTLISTERS.get("ecl", **bad)
    with pytest.raises(ValueError, match="shape"):
        GaussianStats(4).add(np.zeros((2, 3)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="NaN"):
        GaussianStats(2).add(np.array([[np.nan, 0.0]]), np.array([0]))


def test_one_example_per_class_falls_back_to_euclidean():
    x = np.eye(3) * 2.0
    ecl = GaussianECL().fit_vectors(x, np.arange(3))  # N == C: no within-class spread
    _, ids = ecl.search_vectors(x + 0.01, 1)
    np.testing.assert_array_equal(ids[:, 0], [0, 1, 2])


def test_deferred_whitening_then_rewhiten_equals_eager():
    x, y = _blobs(n_classes=20, per_class=25)
    first, later = y < 14, y >= 14
    eager = GaussianECL(rewhiten="eager").fit_vectors(x[first], y[first])
    lazy = GaussianECL(rewhiten="deferred", drift_tol=10.0).fit_vectors(x[first], y[first])
    for c in range(14, 20):
        m = y == c
        eager.add_vectors(x[m], y[m])
        lazy.add_vectors(x[m], y[m])
    assert lazy.stale_ and lazy.rewhitens_ == 1  # new classes whitened with the old W only
    _, ids = lazy.search_vectors(x[later], 1)
    assert np.mean(ids[:, 0] == y[later]) > 0.9  # the new classes are reachable before re-whitening
    # Adding to an existing class replaces its entry (fresh index id), keeping one entry per class.
    lazy.add_vectors(x[y == 3][:2], np.array([3, 3]))
    eager.add_vectors(x[y == 3][:2], np.array([3, 3]))
    assert len(lazy.index_) == 20
    lazy.rewhiten_all()
    assert not lazy.stale_
    s1, i1 = eager.search_vectors(x, 5)
    s2, i2 = lazy.search_vectors(x, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-5)
    # A drift above the tolerance triggers the full re-whitening by itself.
    auto = GaussianECL(rewhiten="deferred", drift_tol=0.0).fit_vectors(x[first], y[first])
    auto.add_vectors(x[later], y[later])
    assert auto.rewhitens_ == 2 and not auto.stale_


# ---------------------------------------------------------------- real data: a CLINC150 subset


@pytest.fixture(scope="module")
def clinc_subset(data_dir):
    """20 CLINC150 intents (every 7th), 40 training and 15 test examples each."""
    from iclcls.data import load_benchmark

    b = load_benchmark("clinc150", data_dir=data_dir)
    labels = list(b.labels.labels)[::7][:20]

    def take(examples, n):
        out, seen = [], {lab: 0 for lab in labels}
        for ex in examples:
            if ex.label in seen and seen[ex.label] < n:
                out.append(ex)
                seen[ex.label] += 1
        return out

    return labels, take(b.train, 40), take(b.test, 15)


def _ecl_clf(embedder, **ecl):
    return ICLClassifier(embedder=embedder, shortlist={"name": "ecl", **ecl}, shortlist_k=5, select=None, rank="retriever")


def _stats_by_label(clf):
    st = clf.shortlister_.stats_
    names = clf.pool_.labels.labels
    live = np.flatnonzero(st.counts > 0)
    return {names[i]: st.means([i])[0] for i in live}, st.covariance()


def test_adding_classes_in_any_order_equals_fitting_at_once(clinc_subset, embedder):
    labels, train, test = clinc_subset
    joint = _ecl_clf(embedder).fit(train)
    j_means, j_cov = _stats_by_label(joint)
    j_short = joint.shortlist_candidates(test)
    groups = [labels[0:7], labels[7:14], labels[14:20]]
    for seed in (1, 2, 3):
        order = list(groups)
        random.Random(seed).shuffle(order)
        by_group = [[ex for ex in train if ex.label in set(g)] for g in order]
        for i, g in enumerate(by_group):
            random.Random(seed * 10 + i).shuffle(g)  # examples within a task arrive in any order too
        clf = _ecl_clf(embedder).fit(by_group[0])
        for g in by_group[1:]:
            clf.add_classes(g)
        means, cov = _stats_by_label(clf)
        assert sorted(means) == sorted(j_means)
        for lab in labels:
            np.testing.assert_allclose(means[lab], j_means[lab], atol=1e-6)
        np.testing.assert_allclose(cov, j_cov, atol=1e-6)
        short = clf.shortlist_candidates(test)
        assert [c.labels for c in short] == [c.labels for c in j_short]
        np.testing.assert_allclose([c.scores for c in short], [c.scores for c in j_short], rtol=1e-4)


def test_recall_and_accuracy_on_real_subset(clinc_subset, embedder):
    labels, train, test = clinc_subset
    ecl = _ecl_clf(embedder).fit(train)
    mean = ICLClassifier(embedder=embedder, shortlist="class_mean", shortlist_k=5, select=None, rank="retriever").fit(train)
    gold = [ex.label for ex in test]
    ecl_preds, mean_preds = ecl.predict_detailed(test), mean.predict_detailed(test)
    recall = np.mean([g in p.candidates[:5] for g, p in zip(gold, ecl_preds)])
    acc_ecl = np.mean([g == p.label for g, p in zip(gold, ecl_preds)])
    acc_mean = np.mean([g == p.label for g, p in zip(gold, mean_preds)])
    assert recall >= 0.95, recall
    assert acc_ecl >= 0.85, acc_ecl
    assert acc_ecl >= acc_mean - 0.02, (acc_ecl, acc_mean)
    # Scores are negative squared Mahalanobis distances, best first.
    s = np.asarray(ecl_preds[0].scores)
    assert (s <= 0).all() and (np.diff(s) <= 0).all()


def test_add_classes_reaches_new_classes_and_keeps_old_predictions(clinc_subset, embedder):
    labels, train, test = clinc_subset
    new = set(labels[-3:])
    old_train = [ex for ex in train if ex.label not in new]
    new_train = [ex for ex in train if ex.label in new]
    old_test = [ex for ex in test if ex.label not in new]
    new_test = [ex for ex in test if ex.label in new]
    clf = _ecl_clf(embedder, rewhiten="deferred", drift_tol=1.0).fit(old_train)
    before = [p.label for p in clf.predict_detailed(old_test)]
    st = clf.shortlister_.stats_
    counts, sums, pool_size = st.counts.copy(), st.sums.copy(), len(clf.pool_)
    assert not any(p.label in new for p in clf.predict_detailed(new_test))  # unknown before
    clf.add_classes(new_train, descriptions={labels[-1]: "a newly added intent"})
    assert len(clf.pool_) == pool_size + len(new_train)  # the demonstration pool grew in place
    assert set(new) <= set(clf.classes_)
    assert clf.pool_.labels.descriptions[labels[-1]] == "a newly added intent"
    st = clf.shortlister_.stats_
    np.testing.assert_array_equal(st.counts[: len(counts)], counts)  # old classes' statistics untouched
    np.testing.assert_array_equal(st.sums[: len(counts)], sums)
    preds_new = clf.predict_detailed(new_test)
    assert np.mean([ex.label in p.candidates[:5] for ex, p in zip(new_test, preds_new)]) >= 0.9
    assert np.mean([ex.label == p.label for ex, p in zip(new_test, preds_new)]) >= 0.8
    after = [p.label for p in clf.predict_detailed(old_test)]
    changed = [(b, a) for b, a in zip(before, after) if a != b]
    # Deferred whitening: an old-class prediction changes only when a new class wins it.
    assert all(a in new for _, a in changed), changed
    assert len(changed) <= 0.05 * len(old_test)
    # Eager re-whitening moves the shared covariance a little: old-class accuracy barely changes.
    eager = _ecl_clf(embedder, rewhiten="eager").fit(old_train)
    acc_before = np.mean([ex.label == p.label for ex, p in zip(old_test, eager.predict_detailed(old_test))])
    eager.add_classes(new_train)
    acc_after = np.mean([ex.label == p.label for ex, p in zip(old_test, eager.predict_detailed(old_test))])
    assert abs(acc_after - acc_before) <= 0.03


def test_save_load_restores_statistics_without_refitting(clinc_subset, embedder, tmp_path, monkeypatch):
    labels, train, test = clinc_subset
    clf = _ecl_clf(embedder, rewhiten="deferred", drift_tol=1.0).fit([ex for ex in train if ex.label != labels[0]])
    clf.add_classes([ex for ex in train if ex.label == labels[0]])
    assert clf.shortlister_.stale_
    clf.save(tmp_path / "state")  # re-whitens before saving
    assert not clf.shortlister_.stale_
    want = clf.shortlist_candidates(test)
    cfg = json.loads((tmp_path / "state" / "config.json").read_text())
    assert cfg["stages"]["shortlist"]["meta"]["format"] == "iclcls.GaussianECL"
    assert sorted(cfg["stages"]["shortlist"]["arrays"]) == ["counts", "outer", "sums"]

    def no_refit(self, pool):
        raise AssertionError("load must restore the ECL statistics, not refit them")

    monkeypatch.setattr(GaussianECL, "fit", no_refit)
    loaded = ICLClassifier.load(tmp_path / "state", embedder=embedder)
    a, b = clf.shortlister_.stats_, loaded.shortlister_.stats_
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.sums, b.sums)
    np.testing.assert_array_equal(a.outer, b.outer)
    np.testing.assert_allclose(a.between, b.between, atol=1e-9)
    got = loaded.shortlist_candidates(test)
    assert [c.labels for c in got] == [c.labels for c in want]
    # The loaded learner keeps learning in place.
    loaded.add_examples([Example("what is my credit score", labels=(labels[1],))])
    assert loaded.shortlister_.stats_.n_total == a.n_total + 1
    # A damaged state is refused with a clear message.
    np.save(tmp_path / "state" / "stages" / "shortlist.sums.npy", np.zeros((3, 5)))
    with pytest.raises(ValueError, match="shapes"):
        ICLClassifier.load(tmp_path / "state", embedder=embedder)


# ---------------------------------------------------------------- with the real SmolLM2 (slow)

TINY = [
    Example("my card was stolen yesterday", labels=("card_lost",)),
    Example("I lost my debit card", labels=("card_lost",)),
    Example("where is my package", labels=("track_order",)),
    Example("my order has not arrived yet", labels=("track_order",)),
    Example("I forgot my password", labels=("reset_password",)),
    Example("how do I reset my login password", labels=("reset_password",)),
]


@pytest.mark.slow
def test_tags_input_with_real_lm(smollm, embedder, tmp_path):
    clf = ICLClassifier(lm=smollm, embedder=embedder, infer={"name": "tags", "max_tokens": 10},
                        shortlist={"name": "ecl", "input": "tags"},
                        shortlist_k=3, select=None, rank="retriever", batch_size=6)
    clf.fit(TINY[:4])
    tags = [ex.metadata.get("tags") for ex in clf.pool_.examples]
    assert all(isinstance(t, list) for t in tags) and sum(bool(t) for t in tags) >= 3, tags
    clf.add_classes(TINY[4:])  # tags are written for the added examples too
    assert all("tags" in ex.metadata for ex in clf.pool_.examples)
    assert clf.shortlister_.stats_.n_total == 6 and clf.shortlister_.stats_.n_classes == 3
    # The ECL's statistics are those of the averaged tag embeddings, not of the texts.
    ex0 = clf.pool_.examples[0]
    if ex0.metadata["tags"]:
        v = embedder.encode(ex0.metadata["tags"]).mean(0)
        assert not np.allclose(v, clf.pool_.embeddings[0], atol=1e-3)
    preds = clf.predict_detailed(["someone took my credit card"])
    assert preds[0].trace["infer"] and len(preds[0].candidates) == 3
    clf.save(tmp_path / "s")
    loaded = ICLClassifier.load(tmp_path / "s", lm=smollm, embedder=embedder)
    assert [ex.metadata["tags"] for ex in loaded.pool_.examples] == [ex.metadata["tags"] for ex in clf.pool_.examples]
    np.testing.assert_array_equal(loaded.shortlister_.stats_.sums, clf.shortlister_.stats_.sums)
    with pytest.raises(ValueError, match="infer='tags'"):
        ICLClassifier(embedder=embedder, shortlist={"name": "ecl", "input": "tags"}, select=None, rank="retriever").fit(TINY)


@pytest.mark.slow
def test_class_summaries_in_the_prompt(smollm, embedder, tmp_path):
    clf = ICLClassifier(lm=smollm, embedder=embedder, shortlist="ecl", shortlist_k=2, select=None, shots=0,
                        rank="likelihood",
                        prompt={"class_summaries": True, "summary_options": {"max_tokens": 12, "examples_per_class": 2}})
    clf.fit(TINY[:4])
    assert set(clf.summaries_) == {"card_lost", "track_order"}
    assert all(isinstance(s, str) for s in clf.summaries_.values())
    assert sum(s.startswith("They are all about ") for s in clf.summaries_.values()) >= 1, clf.summaries_
    clf.add_classes(TINY[4:], summaries={"reset_password": "The user cannot log in and wants a new password."})
    assert clf.summaries_["reset_password"] == "The user cannot log in and wants a new password."
    pred = clf.predict_detailed(["I can't remember my password"])[0]
    prompt = pred.trace["prompt"]
    shown = [c for c in pred.candidates if clf.summaries_.get(c)]
    assert shown and "What the labels mean:" in prompt
    for c in shown:
        assert f"- {c.replace('_', ' ')}: {clf.summaries_[c]}" in prompt
    clf.save(tmp_path / "s")
    loaded = ICLClassifier.load(tmp_path / "s", lm=smollm, embedder=embedder)
    assert loaded.summaries_ == clf.summaries_ and loaded.builder_.summaries == clf.summaries_
