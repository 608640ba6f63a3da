"""Classification metrics on ranked label lists, plus intervals and continual-learning metrics.

Every ranked metric takes, per example, the gold label set and the ranked predicted
labels (best first) and averages over examples:

- ``P@k``  = hits in the top k / k
- ``R@k``  = hits in the top k / |gold|
- ``RP@k`` = hits in the top k / min(k, |gold|)   (Infer-Retrieve-Rank's rank-precision)
- ``nDCG@k`` with binary relevance: sum_i rel_i / log2(i + 2), divided by the ideal DCG

A label repeated in a ranking counts once (the first time). Examples without gold labels
cannot be scored, so they are an error rather than a silent zero. F1 goes through
scikit-learn over the labels that occur in the gold or predicted sets (its default for
multi-class data), so classes absent from a test subset do not count as zeros.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

GoldLike = Sequence[str] | str


def _gold_sets(gold: Sequence[GoldLike]) -> list[frozenset[str]]:
    out = []
    for i, g in enumerate(gold):
        s = frozenset((g,) if isinstance(g, str) else g)
        if not s:
            raise ValueError(f"example {i} has no gold labels: it cannot be scored")
        out.append(s)
    return out


def _dedupe(ranked: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for lab in ranked:
        if lab not in seen:
            seen.add(lab)
            out.append(lab)
    return out


def _check(gold: Sequence, ranked: Sequence, k: int | None = None) -> None:
    if len(gold) != len(ranked):
        raise ValueError(f"{len(gold)} gold label sets but {len(ranked)} predictions")
    if not len(gold):
        raise ValueError("no examples to score")
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def hits_at_k(gold: frozenset[str], ranked: Sequence[str], k: int) -> int:
    """How many of the first k distinct ranked labels are gold."""
    return sum(lab in gold for lab in _dedupe(ranked)[:k])


def precision_at_k(gold: Sequence[GoldLike], ranked: Sequence[Sequence[str]], k: int) -> float:
    _check(gold, ranked, k)
    return float(np.mean([hits_at_k(g, r, k) / k for g, r in zip(_gold_sets(gold), ranked)]))


def recall_at_k(gold: Sequence[GoldLike], ranked: Sequence[Sequence[str]], k: int) -> float:
    _check(gold, ranked, k)
    return float(np.mean([hits_at_k(g, r, k) / len(g) for g, r in zip(_gold_sets(gold), ranked)]))


def rp_at_k(gold: Sequence[GoldLike], ranked: Sequence[Sequence[str]], k: int) -> float:
    """Rank-precision: recall that does not punish k < |gold| (D'Oosterlinck et al. 2024)."""
    _check(gold, ranked, k)
    return float(np.mean([hits_at_k(g, r, k) / min(k, len(g)) for g, r in zip(_gold_sets(gold), ranked)]))


def ndcg_at_k(gold: Sequence[GoldLike], ranked: Sequence[Sequence[str]], k: int) -> float:
    _check(gold, ranked, k)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    vals = []
    for g, r in zip(_gold_sets(gold), ranked):
        rel = np.array([lab in g for lab in _dedupe(r)[:k]], dtype=np.float64)
        dcg = float((rel * discounts[: len(rel)]).sum())
        idcg = float(discounts[: min(k, len(g))].sum())
        vals.append(dcg / idcg)
    return float(np.mean(vals))


def accuracy(gold: Sequence[GoldLike], predicted: Sequence[str | None]) -> float:
    """Share of examples whose predicted (top-1) label is gold (any gold label, for multi-label)."""
    _check(gold, predicted)
    return float(np.mean([p is not None and p in g for g, p in zip(_gold_sets(gold), predicted)]))


def subset_accuracy(gold: Sequence[GoldLike], predicted: Sequence[Sequence[str]]) -> float:
    """Exact match of the predicted label set with the gold set."""
    _check(gold, predicted)
    return float(np.mean([set(p) == g for g, p in zip(_gold_sets(gold), predicted)]))


def f1_scores(gold: Sequence[GoldLike], predicted: Sequence[Sequence[str] | str | None]) -> dict[str, float]:
    """Micro and macro F1 (and micro precision/recall) of predicted label sets, via scikit-learn."""
    from sklearn.metrics import f1_score, precision_score, recall_score
    from sklearn.preprocessing import MultiLabelBinarizer

    _check(gold, predicted)
    g = _gold_sets(gold)
    p = [frozenset(() if x is None else (x,) if isinstance(x, str) else x) for x in predicted]
    classes = sorted(set().union(*g, *p))
    mlb = MultiLabelBinarizer(classes=classes)
    yt, yp = mlb.fit_transform(g), mlb.transform(p)
    kw = {"zero_division": 0}
    return {
        "micro_f1": float(f1_score(yt, yp, average="micro", **kw)),
        "macro_f1": float(f1_score(yt, yp, average="macro", **kw)),
        "micro_precision": float(precision_score(yt, yp, average="micro", **kw)),
        "micro_recall": float(recall_score(yt, yp, average="micro", **kw)),
    }


def ranking_metrics(gold: Sequence[GoldLike], ranked: Sequence[Sequence[str]], ks: Iterable[int]) -> dict[str, float]:
    """``p@k``, ``r@k``, ``rp@k`` and ``ndcg@k`` for every k, as flat keys."""
    out: dict[str, float] = {}
    for k in sorted(set(ks)):
        out[f"p@{k}"] = precision_at_k(gold, ranked, k)
        out[f"r@{k}"] = recall_at_k(gold, ranked, k)
        out[f"rp@{k}"] = rp_at_k(gold, ranked, k)
        out[f"ndcg@{k}"] = ndcg_at_k(gold, ranked, k)
    return out


def curves_at_k(gold: Sequence[GoldLike], ranked: Sequence[Sequence[str]], max_k: int) -> dict[str, list[float]]:
    """P@k, R@k and RP@k for k = 1..max_k (for plots), computed in one pass."""
    _check(gold, ranked, max_k)
    g = _gold_sets(gold)
    hits = np.zeros((len(g), max_k))
    for i, (gs, r) in enumerate(zip(g, ranked)):
        rel = [lab in gs for lab in _dedupe(r)[:max_k]]
        hits[i, : len(rel)] = rel
    cum = hits.cumsum(axis=1)
    ks = np.arange(1, max_k + 1)
    sizes = np.array([len(x) for x in g], dtype=np.float64)[:, None]
    return {
        "k": ks.tolist(),
        "p": (cum / ks).mean(axis=0).tolist(),
        "r": (cum / sizes).mean(axis=0).tolist(),
        "rp": (cum / np.minimum(ks[None, :], sizes)).mean(axis=0).tolist(),
    }


def compute_metrics(
    gold: Sequence[GoldLike],
    ranked: Sequence[Sequence[str]],
    predicted: Sequence[Sequence[str]] | None = None,
    *,
    ks: Iterable[int] = (1, 5, 10),
) -> dict[str, float]:
    """Everything for one run as flat keys: accuracy (top-1), F1 of the decided label sets
    (``predicted``; the top-1 label when omitted), subset accuracy, and ranked metrics at ``ks``."""
    _check(gold, ranked)
    decided = predicted if predicted is not None else [list(r[:1]) for r in ranked]
    _check(gold, decided)
    out: dict[str, float] = {"n": float(len(gold))}
    top1 = [r[0] if len(r) else None for r in ranked]
    out["accuracy"] = accuracy(gold, top1)
    correct = sum(p is not None and p in g for g, p in zip(_gold_sets(gold), top1))
    lo, hi = wilson_interval(correct, len(gold))
    out["accuracy_ci_low"], out["accuracy_ci_high"] = lo, hi
    out.update(f1_scores(gold, decided))
    out["subset_accuracy"] = subset_accuracy(gold, decided)
    out["labels_per_prediction"] = float(np.mean([len(set(p)) for p in decided]))
    out.update(ranking_metrics(gold, ranked, ks))
    return out


# -- intervals ------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, *, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (sensible at 0, 1 and small n)."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(values: Sequence[float], *, n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-example values."""
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_resamples, len(v)))].mean(axis=1)
    return (float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2)))


@dataclass(frozen=True)
class ClassScore:
    label: str
    n: int
    correct: int
    accuracy: float
    low: float
    high: float


def per_class_accuracy(gold: Sequence[str], predicted: Sequence[str | None], *, z: float = 1.96) -> list[ClassScore]:
    """Accuracy (recall) per gold class with Wilson intervals, in order of first appearance."""
    _check(gold, predicted)
    counts: dict[str, list[int]] = {}
    for g, p in zip(gold, predicted):
        c = counts.setdefault(g, [0, 0])
        c[0] += 1
        c[1] += int(p == g)
    out = []
    for lab, (n, ok) in counts.items():
        lo, hi = wilson_interval(ok, n, z=z)
        out.append(ClassScore(lab, n, ok, ok / n, lo, hi))
    return out


# -- continual learning --------------------------------------------------------------------


def _acc_matrix(acc: Sequence[Sequence[float]]) -> np.ndarray:
    """``acc[i][j]``: accuracy on task j after learning tasks 0..i (only j <= i is read)."""
    a = np.full((len(acc), len(acc)), np.nan)
    for i, row in enumerate(acc):
        if len(row) < i + 1:
            raise ValueError(f"accuracy matrix row {i} needs {i + 1} entries (tasks 0..{i}), got {len(row)}")
        a[i, : i + 1] = row[: i + 1]
    return a


def average_accuracy(acc: Sequence[Sequence[float]]) -> float:
    """Mean accuracy over all tasks after the last one was learned."""
    a = _acc_matrix(acc)
    return float(np.mean(a[-1]))


def average_incremental_accuracy(acc: Sequence[Sequence[float]]) -> float:
    """Mean over steps i of the mean accuracy over tasks 0..i (Rebuffi et al. 2017)."""
    a = _acc_matrix(acc)
    return float(np.mean([np.mean(a[i, : i + 1]) for i in range(len(a))]))


def forgetting(acc: Sequence[Sequence[float]]) -> float:
    """Mean over old tasks of (best earlier accuracy - final accuracy); 0 with one task."""
    a = _acc_matrix(acc)
    t = len(a)
    if t < 2:
        return 0.0
    return float(np.mean([np.nanmax(a[j : t - 1, j]) - a[t - 1, j] for j in range(t - 1)]))


def backward_transfer(acc: Sequence[Sequence[float]]) -> float:
    """Mean over old tasks of (final accuracy - accuracy right after learning it)."""
    a = _acc_matrix(acc)
    t = len(a)
    if t < 2:
        return 0.0
    return float(np.mean([a[t - 1, j] - a[j, j] for j in range(t - 1)]))


def paired_se(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of the mean per-example difference a - b (0 with fewer than 2 examples)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0


def one_se_choice(scores: Sequence[Sequence[float]], *, eligible: Sequence[bool] | None = None) -> tuple[int, list[dict[str, float]]]:
    """The one-standard-error rule over candidates ordered simplest first.

    ``scores[i]`` holds candidate i's per-example scores (the same examples for all). The
    best is the eligible candidate with the highest mean; the pick is the simplest eligible
    candidate whose mean is within one SE of the best's, the SE of their paired per-example
    difference. So a richer candidate wins only when it beats every simpler one beyond noise,
    which is what keeps a choice made on a few dozen examples from shipping noise.
    Returns (pick, per-candidate rows: mean, se, gap to the best, se of that gap, eligible).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or not s.shape[0] or not s.shape[1]:
        raise ValueError("one_se_choice needs at least one candidate with at least one score")
    ok = [True] * len(s) if eligible is None else [bool(e) for e in eligible]
    if len(ok) != len(s) or not any(ok):
        raise ValueError("eligible must flag each candidate, at least one of them True")
    means = s.mean(axis=1)
    best = max((i for i in range(len(s)) if ok[i]), key=lambda i: (means[i], -i))  # ties: the simpler
    rows, pick = [], None
    for i in range(len(s)):
        gap, se_gap = float(means[best] - means[i]), paired_se(s[best], s[i])
        own_se = float(s[i].std(ddof=1) / math.sqrt(s.shape[1])) if s.shape[1] > 1 else 0.0
        rows.append({"mean": float(means[i]), "se": own_se, "gap_to_best": gap, "se_of_gap": se_gap, "eligible": ok[i]})
        if pick is None and ok[i] and gap <= se_gap + 1e-12:
            pick = i
    return int(best if pick is None else pick), rows
