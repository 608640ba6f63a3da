"""Influence-based demonstrations (InfICL; Vinay et al. 2024): one fixed, most helpful set.

A multinomial logistic regression (softmax, weights on ``[embedding, 1]``, L2 penalty ``l2``)
is fitted on the pool's embeddings; each pool example ``z`` is scored by its influence on
the validation loss (Koh & Liang 2017):
``I(z) = -grad L_val^T H^-1 grad l(z)``, the change of the validation loss when ``z`` is
up-weighted. ``H`` is the exact Hessian of the regularised training objective; it is never
formed: ``H^-1 grad L_val`` is solved once by conjugate gradients on exact Hessian-vector
products (77 classes x 385 weights would make a 30k x 30k matrix), after which every
example's score is one small dot product. The selector keeps the examples with the most
negative ``I`` (up-weighting them lowers the validation loss most: the helpful ones),
top-R per class, and shows the same set to every query.

Validation data (``validation``): ``"holdout"`` (default) holds out a seeded, stratified
``holdout`` fraction of the pool (held-out examples are not demonstrations); examples
(loaded by the caller) are used as given; a config string (``"benchmark:NAME"``, a
labelled data file) is read by ``iclcls.data.load_split``. A solve that does not converge
warns (once per process) and is recorded in ``fit_info_["converged"]``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.sparse.linalg import LinearOperator, cg

from iclcls.pool import Pool
from iclcls.select.base import SELECTORS, BaseSelector, order_by_similarity, restore_positions, saved_ids
from iclcls.types import Candidates, Example, Query


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class SoftmaxRegression:
    """``mean CE(softmax(X W^T), y) + l2/2 ||W||^2``, with its gradient and exact Hessian-vector product."""

    def __init__(self, x: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float, weights: np.ndarray | None = None) -> None:
        self.x = np.asarray(x, dtype=np.float64)
        self.y = np.asarray(y, dtype=np.int64)
        self.c = int(n_classes)
        self.l2 = float(l2)
        self.onehot = np.eye(self.c)[self.y]
        # Per-example loss weights (1 = the plain mean); up-weighting one example by eps is
        # what an influence function predicts the effect of.
        self.weights = np.ones(len(self.x)) if weights is None else np.asarray(weights, dtype=np.float64)

    def objective(self, flat: np.ndarray) -> tuple[float, np.ndarray]:
        w = flat.reshape(self.c, -1)
        z = self.x @ w.T
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        n, sw = len(self.x), self.weights[:, None]
        loss = -(sw * logp * self.onehot).sum() / n + 0.5 * self.l2 * (w * w).sum()
        grad = (sw * (np.exp(logp) - self.onehot)).T @ self.x / n + self.l2 * w
        return float(loss), grad.ravel()

    def fit(self, *, max_iter: int = 100) -> np.ndarray:
        """Newton-CG on exact Hessian-vector products: converges to the optimum the influence
        function assumes (a first-order method stopping early would bias every score)."""
        w0 = np.zeros(self.c * self.x.shape[1])

        def hessp(flat: np.ndarray, v: np.ndarray) -> np.ndarray:
            return self._hvp(_softmax(self.x @ flat.reshape(self.c, -1).T), v)

        res = minimize(self.objective, w0, jac=True, hessp=hessp, method="Newton-CG", options={"maxiter": max_iter, "xtol": 1e-10})
        self.converged = bool(res.success)
        self.w = res.x.reshape(self.c, -1)
        self.p = _softmax(self.x @ self.w.T)
        self.grad_norm = float(np.linalg.norm(self.objective(res.x)[1]))
        return self.w

    def _hvp(self, p: np.ndarray, v: np.ndarray) -> np.ndarray:
        v = v.reshape(self.c, -1)
        a = self.x @ v.T  # [n, C]
        b = self.weights[:, None] * (p * a - p * (p * a).sum(axis=1, keepdims=True))
        return (b.T @ self.x / len(self.x) + self.l2 * v).ravel()

    def hvp(self, v: np.ndarray) -> np.ndarray:
        """Exact ``H v`` at the fitted weights: ``(1/n) sum_i [(diag p_i - p_i p_i^T) V x_i] x_i^T + l2 V``."""
        return self._hvp(self.p, v)

    def hessian(self) -> np.ndarray:
        """The explicit Hessian (small models only: the reference the CG solve is tested against)."""
        n_par = self.w.size
        return np.stack([self.hvp(e) for e in np.eye(n_par)], axis=1)

    def loss_grad(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-example gradients of the unregularised loss, [n, C, D]."""
        p = _softmax(np.asarray(x, dtype=np.float64) @ self.w.T)
        r = p - np.eye(self.c)[y]
        return r[:, :, None] * np.asarray(x, dtype=np.float64)[:, None, :]


def influence_scores(
    model: SoftmaxRegression, x_val: np.ndarray, y_val: np.ndarray, *, tol: float = 1e-10, max_iter: int = 1000
) -> tuple[np.ndarray, dict[str, Any]]:
    """``I(z) = -grad L_val^T H^-1 grad l(z)`` for every training row of ``model``."""
    g_val = model.loss_grad(x_val, y_val).mean(axis=0).ravel()
    n_par = g_val.size
    op = LinearOperator((n_par, n_par), matvec=model.hvp, dtype=np.float64)
    s, info = cg(op, g_val, rtol=tol, atol=0.0, maxiter=max_iter)
    resid = float(np.linalg.norm(model.hvp(s) - g_val) / max(float(np.linalg.norm(g_val)), 1e-300))
    s = s.reshape(model.c, -1)
    r = model.p - model.onehot  # grad l(z) = r_z x_z^T, so s . grad l(z) = r_z^T S x_z
    scores = -np.einsum("nc,nc->n", r, model.x @ s.T)
    return scores, {"cg_info": int(info), "cg_relative_residual": resid}


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """Warn the first time ``key`` comes up in this process (a study refits many times)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def stratified_holdout(labels: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """A seeded mask of held-out rows: ``fraction`` of each class, keeping >= 1 row for training."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    by: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by.setdefault(lab, []).append(i)
    for lab in sorted(by):
        rows = by[lab]
        n = min(int(round(fraction * len(rows))), len(rows) - 1)
        if n > 0:
            held[rng.choice(rows, size=n, replace=False)] = True
    return held


@SELECTORS.register("influence")
class InfluenceSelector(BaseSelector):
    """The top-R most helpful pool examples per class; one fixed set for all queries.

    For k shots the set takes examples in order of helpfulness with at most R per class,
    R = ``per_class`` or ``ceil(k / classes)`` (so it spans as many classes as k allows).
    With ``restrict_to_candidates`` the set is drawn, per query, from the candidate classes.
    """

    def __init__(
        self,
        *,
        validation: str | Sequence[Example] = "holdout",
        holdout: float = 0.2,
        validation_size: int | None = None,
        validation_label_field: str = "label",
        l2: float = 1e-3,
        per_class: int | None = None,
        order: str = "ascending",
        restrict_to_candidates: bool = False,
        seed: int = 0,
    ) -> None:
        if not 0.0 < holdout < 1.0:
            raise ValueError(f"influence holdout must be in (0, 1), got {holdout}")
        if l2 <= 0:
            raise ValueError(f"influence l2 must be > 0 (the Hessian must be invertible), got {l2}")
        if per_class is not None and per_class < 1:
            raise ValueError(f"influence per_class must be >= 1, got {per_class}")
        order_by_similarity([], [], order)
        # Examples given in memory are not part of the saved spec (it records "examples").
        self._examples = None if isinstance(validation, str) else list(validation)
        self.validation = validation if isinstance(validation, str) else "examples"
        self.holdout = holdout
        self.validation_size = validation_size
        self.validation_label_field = validation_label_field
        self.l2 = l2
        self.per_class = per_class
        self.order = order
        self.restrict_to_candidates = restrict_to_candidates
        self.seed = seed

    def fit(self, pool: Pool, *, validation: Sequence[Example] | None = None) -> InfluenceSelector:
        """Fit the regression on the pool (minus any holdout), score every example, rank them."""
        self.pool_ = pool
        labelled = np.array([i for i, ex in enumerate(pool.examples) if ex.labels], dtype=np.int64)
        labels = [pool.examples[i].labels[0] for i in labelled]
        if len(set(labels)) < 2:
            raise ValueError("influence selection needs a pool with at least two classes")
        if validation is None and self.validation == "examples":
            if self._examples is None:
                raise ValueError("influence: validation='examples' needs the examples: pass validation=[...] or fit(pool, validation=...)")
            validation = self._examples
        if validation is None and self.validation == "holdout":
            held = stratified_holdout(labels, self.holdout, self.seed)
            train_rows, val_rows = labelled[~held], labelled[held]
            x_val_emb = pool.embeddings[val_rows]
            val_labels = [pool.examples[i].labels[0] for i in val_rows]
        else:
            if validation is None:  # a config string: the data layer reads it
                from iclcls.data import load_split

                validation = load_split(self.validation, label_field=self.validation_label_field)
            examples = [ex for ex in validation if ex.labels]
            if self.validation_size is not None and len(examples) > self.validation_size:
                pick = np.random.default_rng(self.seed).choice(len(examples), self.validation_size, replace=False)
                examples = [examples[i] for i in sorted(pick)]
            train_rows = labelled
            x_val_emb = pool.embedder.encode([ex.text for ex in examples]) if examples else None
            val_labels = [ex.labels[0] for ex in examples]
        classes = sorted({pool.examples[i].labels[0] for i in train_rows})
        cidx = {c: j for j, c in enumerate(classes)}
        keep = [j for j, lab in enumerate(val_labels) if lab in cidx]
        if not keep:
            raise ValueError("influence: no validation example has a class that is in the pool")
        x_val = _with_bias(np.asarray(x_val_emb)[keep])
        y_val = np.array([cidx[val_labels[j]] for j in keep])
        x = _with_bias(pool.embeddings[train_rows])
        y = np.array([cidx[pool.examples[i].labels[0]] for i in train_rows])
        model = SoftmaxRegression(x, y, len(classes), l2=self.l2)
        model.fit()
        scores, info = influence_scores(model, x_val, y_val)
        converged = model.converged and info["cg_info"] == 0
        if not converged:
            _warn_once(
                "influence-solve",
                f"influence: the solve did not converge (Newton-CG success={model.converged}, CG info="
                f"{info['cg_info']}, residual {info['cg_relative_residual']:.2g}); scores are approximate. "
                "Raise l2 to make the problem better conditioned.",
            )
        order = np.argsort(scores, kind="stable")  # most negative first: most helpful
        self.ranked_ = [int(train_rows[t]) for t in order]
        self.scores_ = {int(train_rows[t]): float(scores[t]) for t in order}
        self.fit_info_ = {
            **info,
            "refreshed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stale_examples": 0,
            "converged": converged,
            "train": int(len(train_rows)),
            "validation": int(len(keep)),
            "classes": len(classes),
            "grad_norm": model.grad_norm,
            "train_accuracy": float((model.p.argmax(1) == y).mean()),
            "validation_accuracy": float((_softmax(x_val @ model.w.T).argmax(1) == y_val).mean()),
        }
        return self

    # Each addition does not re-solve the regression (seconds, growing with the pool): new
    # examples join the ranking last, and ``ICLClassifier.refresh_stale`` refits on a schedule.
    incremental = False

    def update(self, pool: Pool, new_ids: np.ndarray) -> None:
        """New examples (or classes) join the ranking at once, last (no influence known yet), so a
        new class can contribute demonstrations; ``fit_info_["stale_examples"]`` counts them until
        the next refresh re-solves the regression."""
        self.pool_ = pool
        for i in map(int, new_ids):
            if i not in self.scores_:
                self.ranked_.append(i)
                self.scores_[i] = 0.0
        self.fit_info_["stale_examples"] = int(self.fit_info_.get("stale_examples", 0)) + len(new_ids)

    @property
    def stale_(self) -> bool:
        return bool(getattr(self, "fit_info_", {}).get("stale_examples"))  # unfitted: not stale

    def chosen(self, k: int, allowed: set[int] | None = None) -> list[int]:
        """The first k of the ranking with at most R per class (R from k and the classes present)."""
        pool = self.pool_
        ranked = self.ranked_ if allowed is None else [i for i in self.ranked_ if i in allowed]
        n_classes = len({pool.examples[i].labels[0] for i in ranked}) or 1
        cap = self.per_class or max(1, math.ceil(k / n_classes))
        out: list[int] = []
        used: dict[str, int] = {}
        for i in ranked:
            lab = pool.examples[i].labels[0]
            if used.get(lab, 0) < cap:
                used[lab] = used.get(lab, 0) + 1
                out.append(i)
                if len(out) == k:
                    break
        return out

    def select(self, queries: Sequence[Query], candidates: Sequence[Candidates], k: int) -> list[list[int]]:
        if k <= 0:
            return [[] for _ in queries]
        if not self.restrict_to_candidates:
            ids = self.chosen(k)
            # Most helpful next to the query (helpfulness = -influence), as kNN's ascending order.
            fixed = order_by_similarity(ids, [-self.scores_[i] for i in ids], self.order)
            return [list(fixed) for _ in queries]
        out = []
        for cand in candidates:
            ids = self.chosen(k, set(self.eligible(cand).tolist()))
            out.append(order_by_similarity(ids, [-self.scores_[i] for i in ids], self.order))
        return out

    # -- persistence: the ranking as example ids (or positions) and scores ------------------
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {"fit_info": self.fit_info_, "ranked_ids": saved_ids(self.pool_, self.ranked_)}
        return meta, {
            "ranked": np.array(self.ranked_, dtype=np.int64),
            "scores": np.array([self.scores_[i] for i in self.ranked_], dtype=np.float64),
        }

    def load_state_dict(self, pool: Pool, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.pool_ = pool
        ranked = restore_positions(pool, meta.get("ranked_ids"), arrays["ranked"], "influence")
        self.ranked_ = ranked
        self.scores_ = {i: float(s) for i, s in zip(ranked, arrays["scores"])}
        self.fit_info_ = dict(meta.get("fit_info", {}))


def _with_bias(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.hstack([x, np.ones((len(x), 1))])
