"""Conformal label sets and cross-validation tuning: the guarantee holds, tuning needs no validation split."""

from __future__ import annotations

import numpy as np
import pytest

from iclcls.rank import conformal as cp
from iclcls.types import Example


def _synthetic(n: int, k: int, rng: np.random.Generator):
    """Exchangeable (labels, scores, gold) triples: the gold label's score is noisily highest."""
    labels = [f"c{i}" for i in range(k)]
    out = []
    for _ in range(n):
        gold = labels[rng.integers(k)]
        scores = rng.normal(size=k)
        scores[labels.index(gold)] += 1.5
        order = np.argsort(-scores)
        out.append(([labels[i] for i in order], scores[order], (gold,)))
    return out


def test_split_conformal_covers_at_the_promised_rate():
    rng = np.random.default_rng(0)
    data = _synthetic(4000, 10, rng)
    cal, test = data[:1000], data[1000:]
    for alpha in (0.05, 0.1, 0.2):
        q = cp.conformal_quantile([cp.nonconformity(labs, s, g) for labs, s, g in cal], alpha)
        sets = [cp.single_label_set(labs, s, q) for labs, s, _ in test]
        coverage = np.mean([g[0] in st for st, (_, _, g) in zip(sets, test)])
        assert abs(coverage - (1 - alpha)) < 0.025, (alpha, coverage)
        assert 1 <= np.mean([len(st) for st in sets]) < 10  # informative: not every label


def test_conformal_quantile_edges():
    assert cp.conformal_quantile([0.1, 0.2], 0.1) == np.inf  # too few points for 90%: the whole list
    assert cp.conformal_quantile([0.3] * 99, 0.1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="alpha"):
        cp.conformal_quantile([0.1], 1.5)
    with pytest.raises(ValueError, match="at least one"):
        cp.conformal_quantile([], 0.1)
    assert cp.nonconformity(["a", "b"], [1.0, 0.0], ("z",)) == np.inf  # the shortlist missed gold
    assert cp.single_label_set([], [], 0.5) == ()


def test_risk_control_bounds_the_false_negative_rate():
    rng = np.random.default_rng(1)
    labels = [f"s{i}" for i in range(20)]
    data = []
    for _ in range(2000):
        gold = tuple(rng.choice(labels, size=rng.integers(1, 4), replace=False).tolist())
        scores = rng.normal(size=20)
        for g in gold:
            scores[labels.index(g)] += 2.0
        data.append((labels, scores, gold))
    cal, test = data[:600], data[600:]
    for alpha in (0.1, 0.2):
        lam = cp.crc_lambda([(labs, s) for labs, s, _ in cal], [g for *_, g in cal], alpha)
        fnr = np.mean([cp.fnr(labs, s, g, lam) for labs, s, g in test])
        assert fnr <= alpha + 0.02, (alpha, fnr)
        assert fnr >= alpha - 0.06  # and not trivially conservative
        assert np.mean([len(cp.multi_label_set(labs, s, lam)) for labs, s, _ in test]) < 20


@pytest.fixture(scope="module")
def banking(data_dir):
    from iclcls.data import load_benchmark

    return load_benchmark("banking77_10shot", data_dir=data_dir)


def test_fit_cross_validates_by_default_and_predict_set_covers(banking, embedder):
    from iclcls.programs import retriever_only

    clf = retriever_only(embedder=embedder).fit(banking.train, tune_size=300)
    assert clf.tuned_["tuned_on"].startswith("cv (300 pool examples")
    assert clf.tuned_["conformal"]["n"] == 300
    test = banking.test[:400]
    sets = clf.predict_set(test, alpha=0.1)
    coverage = np.mean([ex.label in s for ex, s in zip(test, sets)])
    assert 0.85 <= coverage <= 0.97, coverage
    assert np.mean([len(s) for s in sets]) < clf.shortlist_k  # smaller than the whole shortlist
    # A looser alpha gives smaller sets; the calibration survives save/load.
    loose = clf.predict_set(test, alpha=0.3)
    assert sum(map(len, loose)) < sum(map(len, sets))


def test_cv_holds_each_example_out_of_its_own_fold(embedder):
    """A class with one example cannot be voted for once that example is held out: its
    calibration score must be inf (it would be finite if the example saw itself)."""
    from iclcls.programs import retriever_only

    train = [Example(f"alpha text {i}", ("a",)) for i in range(6)] + [Example(f"beta words {i}", ("b",)) for i in range(6)]
    train.insert(4, Example("gamma solo sentence", ("solo",)))
    clf = retriever_only(embedder=embedder, shortlist="knn_vote").fit(train, tune="cv", tune_size=len(train), folds=3)
    scores = clf.tuned_["conformal"]["scores"]
    assert len(scores) == len(train) and scores[4] == float("inf")
    assert all(s < float("inf") for i, s in enumerate(scores) if i != 4)
    assert len(clf.pool_) == len(train)  # folds never touch the fitted pool
    with pytest.raises(ValueError, match="tune must be"):
        retriever_only(embedder=embedder).fit(train, tune="test")
    plain = retriever_only(embedder=embedder).fit(train, tune="none")
    assert "conformal" not in plain.tuned_
    with pytest.raises(RuntimeError, match="conformal calibration"):
        plain.predict_set(["x"])


def test_label_alpha_writes_conformal_sets(banking, embedder, tmp_path):
    """`iclcls label --alpha` adds each row's conformal set; a state without calibration is refused."""
    import json

    from typer.testing import CliRunner

    from iclcls.cli import app
    from iclcls.programs import retriever_only

    clf = retriever_only(embedder=embedder).fit(banking.train, tune_size=100)
    clf.save(tmp_path / "state")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": ex.text}) + "\n" for ex in banking.test[:20]))
    res = CliRunner().invoke(app, ["label", str(src), "--state", str(tmp_path / "state"), "--out", str(tmp_path / "o.jsonl"),
                                   "--alpha", "0.1", "--quiet"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(r["set"] and set(r["set"]) <= set(r["labels"]) for r in rows)
    assert rows[0]["set"][0] == rows[0]["labels"][0]  # the set is a prefix-ranked subset, best first
    retriever_only(embedder=embedder).fit(banking.train, tune="none").save(tmp_path / "plain")
    res = CliRunner().invoke(app, ["label", str(src), "--state", str(tmp_path / "plain"), "--out", str(tmp_path / "p.jsonl"),
                                   "--alpha", "0.1", "--quiet"])
    assert res.exit_code != 0 and "conformal calibration" in res.output
