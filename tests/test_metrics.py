"""Metrics against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from iclcls import metrics as M

# Two examples: gold {a, b} ranked [a, x, b, y]; gold {c} ranked [x, y, z, c].
GOLD = [("a", "b"), ("c",)]
RANKED = [["a", "x", "b", "y"], ["x", "y", "z", "c"]]


@pytest.mark.parametrize(
    "fn, k, expected",
    [
        (M.precision_at_k, 1, (1 + 0) / 2),
        (M.precision_at_k, 2, (1 / 2 + 0) / 2),
        (M.precision_at_k, 4, (2 / 4 + 1 / 4) / 2),
        (M.recall_at_k, 1, (1 / 2 + 0) / 2),
        (M.recall_at_k, 3, (2 / 2 + 0) / 2),
        (M.recall_at_k, 4, 1.0),
        (M.rp_at_k, 1, (1 / 1 + 0) / 2),
        (M.rp_at_k, 2, (1 / 2 + 0) / 2),
        (M.rp_at_k, 3, (2 / 2 + 0 / 1) / 2),
        (M.rp_at_k, 4, (2 / 2 + 1 / 1) / 2),
    ],
)
def test_ranked_metrics_by_hand(fn, k, expected):
    assert fn(GOLD, RANKED, k) == pytest.approx(expected)


def test_ndcg_by_hand():
    idcg2 = 1 + 1 / math.log2(3)
    assert M.ndcg_at_k(GOLD, RANKED, 2) == pytest.approx((1 / idcg2 + 0) / 2)
    ex1 = (1 + 1 / math.log2(4)) / idcg2  # hits at ranks 1 and 3
    ex2 = (1 / math.log2(5)) / 1.0  # hit at rank 4, one gold label
    assert M.ndcg_at_k(GOLD, RANKED, 4) == pytest.approx((ex1 + ex2) / 2)
    assert M.ndcg_at_k([("a",)], [["a", "b"]], 5) == pytest.approx(1.0)


def test_rp_differs_from_precision_and_recall_when_gold_exceeds_k():
    gold = [("a", "b", "c", "d")]
    ranked = [["a", "b", "z"]]
    assert M.rp_at_k(gold, ranked, 2) == pytest.approx(1.0)  # 2 hits / min(2, 4)
    assert M.recall_at_k(gold, ranked, 2) == pytest.approx(0.5)
    assert M.precision_at_k(gold, ranked, 3) == pytest.approx(2 / 3)


def test_repeated_labels_count_once_and_short_rankings_are_not_padded():
    assert M.precision_at_k([("a", "b")], [["a", "a", "b"]], 2) == pytest.approx(1.0)
    assert M.precision_at_k([("a",)], [["a"]], 5) == pytest.approx(1 / 5)
    assert M.recall_at_k([("a", "b")], [[]], 5) == 0.0


def test_string_gold_means_one_label():
    assert M.rp_at_k(["a", "b"], [["a"], ["c", "b"]], 1) == pytest.approx(0.5)


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="example 1 has no gold"):
        M.recall_at_k([("a",), ()], [["a"], ["b"]], 1)
    with pytest.raises(ValueError, match="2 gold label sets but 1"):
        M.precision_at_k([("a",), ("b",)], [["a"]], 1)
    with pytest.raises(ValueError, match="k must be"):
        M.precision_at_k([("a",)], [["a"]], 0)


def test_accuracy_and_single_label_f1_by_hand():
    gold = ["a", "a", "b", "c"]
    pred = ["a", "b", "b", "c"]
    assert M.accuracy(gold, pred) == pytest.approx(0.75)
    f = M.f1_scores(gold, pred)
    # per class F1: a 2/3 (P 1, R 1/2), b 2/3 (P 1/2, R 1), c 1
    assert f["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert f["micro_f1"] == pytest.approx(0.75)


def test_multi_label_f1_by_hand():
    gold = [("a", "b"), ("c",)]
    pred = [("a",), ("c", "d")]
    f = M.f1_scores(gold, pred)
    # tp: a, c; fp: d; fn: b
    assert f["micro_precision"] == pytest.approx(2 / 3)
    assert f["micro_recall"] == pytest.approx(2 / 3)
    assert f["micro_f1"] == pytest.approx(2 / 3)
    assert f["macro_f1"] == pytest.approx((1 + 0 + 1 + 0) / 4)  # classes a, b, c, d
    assert M.subset_accuracy(gold, pred) == 0.0
    assert M.subset_accuracy(gold, [("b", "a"), ("c",)]) == 1.0


def test_compute_metrics_flat_keys():
    m = M.compute_metrics(GOLD, RANKED, [("a", "x"), ("x",)], ks=(1, 4))
    assert m["n"] == 2
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["rp@4"] == pytest.approx(1.0)
    assert m["r@1"] == pytest.approx(0.25)
    assert m["labels_per_prediction"] == pytest.approx(1.5)
    assert 0 <= m["accuracy_ci_low"] < 0.5 < m["accuracy_ci_high"] <= 1
    assert all(isinstance(v, float) for v in m.values())


def test_curves_match_pointwise_metrics():
    c = M.curves_at_k(GOLD, RANKED, 4)
    assert c["k"] == [1, 2, 3, 4]
    for k in c["k"]:
        assert c["p"][k - 1] == pytest.approx(M.precision_at_k(GOLD, RANKED, k))
        assert c["r"][k - 1] == pytest.approx(M.recall_at_k(GOLD, RANKED, k))
        assert c["rp"][k - 1] == pytest.approx(M.rp_at_k(GOLD, RANKED, k))


def test_wilson_interval_known_values():
    lo, hi = M.wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = M.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert M.wilson_interval(0, 0) == (0.0, 1.0)


def test_bootstrap_interval_brackets_the_mean():
    vals = [1.0] * 70 + [0.0] * 30
    lo, hi = M.bootstrap_interval(vals, seed=1)
    assert lo < 0.7 < hi and hi - lo < 0.25
    assert M.bootstrap_interval([1.0, 1.0]) == (1.0, 1.0)


def test_per_class_accuracy():
    scores = {c.label: c for c in M.per_class_accuracy(["a", "a", "b", "a"], ["a", "b", "b", "a"])}
    assert scores["a"].n == 3 and scores["a"].correct == 2 and scores["a"].accuracy == pytest.approx(2 / 3)
    assert scores["b"].accuracy == 1.0 and scores["b"].low < 1.0 == scores["b"].high


def test_continual_learning_metrics_by_hand():
    acc = [[0.9], [0.8, 0.95], [0.7, 0.85, 0.9]]
    assert M.average_accuracy(acc) == pytest.approx((0.7 + 0.85 + 0.9) / 3)
    assert M.average_incremental_accuracy(acc) == pytest.approx((0.9 + 0.875 + (0.7 + 0.85 + 0.9) / 3) / 3)
    assert M.forgetting(acc) == pytest.approx(((0.9 - 0.7) + (0.95 - 0.85)) / 2)
    assert M.backward_transfer(acc) == pytest.approx(((0.7 - 0.9) + (0.85 - 0.95)) / 2)
    assert M.forgetting([[0.5]]) == 0.0
    with pytest.raises(ValueError, match="row 1 needs 2"):
        M.average_accuracy([[0.9], [0.8]])
