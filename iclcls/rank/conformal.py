"""Conformal label sets: confidence with a guarantee instead of a raw score.

Single-label (split conformal, LAC score): a prediction's scores over its candidates become
probabilities ``softmax(zscore(scores))``; the nonconformity of the gold label is
``1 - p(gold)`` (``inf`` when the shortlist missed it). With ``n`` calibration scores the
set ``{y : 1 - p(y) <= q}``, ``q`` the ``ceil((n + 1)(1 - alpha)) / n`` empirical quantile,
holds the gold label with probability >= 1 - alpha for exchangeable data.

Multi-label (conformal risk control, Angelopoulos et al. 2022): the set is every label whose
probability is at least ``1 - lam``; ``lam`` is the smallest value whose calibration
false-negative rate ``R(lam)`` satisfies ``(n R(lam) + 1) / (n + 1) <= alpha``, so the
expected share of gold labels missed is at most alpha.

Calibration data are the cross-validation (or validation) predictions that ``fit`` already
computes, so a calibrated classifier costs no extra LM calls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from iclcls.rank.base import zscore


def label_probs(scores: Sequence[float]) -> np.ndarray:
    """Per-candidate probabilities: softmax of the z-scored ranking scores (scale-free)."""
    z = zscore(np.asarray(scores, dtype=np.float64))
    if not len(z):
        return z
    e = np.exp(z - z.max())
    return e / e.sum()


def nonconformity(labels: Sequence[str], scores: Sequence[float], gold: Sequence[str]) -> float:
    """``1 - p(gold)`` for single-label calibration; ``inf`` when no gold label was ranked."""
    p = dict(zip(labels, label_probs(scores)))
    present = [p[g] for g in gold if g in p]
    return 1.0 - max(present) if present else math.inf


def conformal_quantile(cal_scores: Sequence[float], alpha: float) -> float:
    """The finite-sample-corrected (1 - alpha) quantile of the calibration nonconformity scores."""
    _check_alpha(alpha)
    s = np.sort(np.asarray(cal_scores, dtype=np.float64))
    n = len(s)
    if n == 0:
        raise ValueError("conformal calibration needs at least one calibration prediction")
    k = math.ceil((n + 1) * (1.0 - alpha))
    return math.inf if k > n else float(s[k - 1])


def single_label_set(labels: Sequence[str], scores: Sequence[float], qhat: float) -> tuple[str, ...]:
    """Every ranked label whose nonconformity is within ``qhat`` (best first); never empty."""
    if not len(labels):
        return ()
    p = label_probs(scores)
    chosen = tuple(lab for lab, pi in zip(labels, p) if 1.0 - pi <= qhat)
    return chosen or (labels[int(np.argmax(p))],)


def fnr(labels: Sequence[str], scores: Sequence[float], gold: Sequence[str], lam: float) -> float:
    """False-negative rate of the set ``{y : p(y) >= 1 - lam}`` against ``gold``."""
    if not gold:
        return 0.0
    kept = set(multi_label_set(labels, scores, lam))
    return sum(g not in kept for g in gold) / len(gold)


def multi_label_set(labels: Sequence[str], scores: Sequence[float], lam: float) -> tuple[str, ...]:
    p = label_probs(scores)
    return tuple(lab for lab, pi in zip(labels, p) if pi >= 1.0 - lam)


def crc_lambda(preds: Sequence[tuple[Sequence[str], Sequence[float]]], gold: Sequence[Sequence[str]], alpha: float) -> float:
    """Conformal risk control: the smallest ``lam`` in [0, 1] with ``(n R(lam) + 1) / (n + 1) <= alpha``."""
    _check_alpha(alpha)
    n = len(preds)
    if n == 0:
        raise ValueError("conformal calibration needs at least one calibration prediction")
    budget = (alpha * (n + 1.0) - 1.0) / n  # the largest calibration risk allowed
    # A gold label is missed when p(gold) < 1 - lam (unranked gold: p = -1, always missed).
    p_gold, weight = [], []
    for (labs, s), g in zip(preds, gold):
        p = dict(zip(labs, label_probs(s)))
        for lab in g:
            p_gold.append(p.get(lab, -1.0))
            weight.append(1.0 / (len(g) * n))
    if not p_gold:
        return 0.0
    order = np.argsort(p_gold)
    ps, missed = np.asarray(p_gold)[order], np.cumsum(np.asarray(weight)[order])
    # threshold t = 1 - lam: risk(t) = weight of gold with p < t; take the largest t within budget.
    for t in np.unique(np.concatenate([ps[ps >= 0], [1.0]]))[::-1]:
        risk = float(missed[np.searchsorted(ps, t, side="left") - 1]) if np.searchsorted(ps, t, side="left") else 0.0
        if risk <= budget + 1e-12:
            return float(min(1.0, max(0.0, 1.0 - t)))
    return 1.0


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
