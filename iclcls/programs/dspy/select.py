"""Compiling IReRa so that it is never worse than what it started from, up to noise.

DSPy's random search keeps whichever candidate scores highest on a handful of validation
examples; on ESCO TECH that picked a bootstrapped program at 61.1 vs 44.4 on 6 sentences,
6.9 points below the zero-shot one at n = 100. Here every choice is made on all the compile
examples (the benchmark's validation split, or the training examples when there is none)
and by the one-standard-error rule (:func:`iclcls.metrics.one_se_choice`): candidates are
ordered simplest first, and a richer one is kept only when it beats every simpler one by
more than the standard error of their paired per-example difference.

Three choices, in this order, for each candidate program (zero-shot, then 1, 2, ...
bootstrapped demonstrations per LM step):

1. Infer's fusion weight (0 = the sentence's own candidates only): RP@k of the fused
   candidate list; a weight is eligible only if its R@``recall_k`` is not below weight 0's
   by more than its SE, so the guesses can add candidates but not lose them;
2. Rank's fusion weight (0 = retrieval order) on the candidates of the chosen Infer weight;
3. the program: each candidate's per-example RP@k at its chosen weights.

Demonstrations come from cross-fitting: the compile examples are cut into ``folds``; a
fold's sentences are scored by a program whose demonstrations were bootstrapped from the
other folds, so no sentence is scored by a program that saw it. The shipped program holds
the first fold's demonstrations. The whole decision (candidates, scores, intervals, the
weights' curves, the pick and why) is returned for the saved program's ``config.json``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from iclcls.metrics import bootstrap_interval, hits_at_k, one_se_choice, paired_se
from iclcls.rank.fusion import fuse_rankings

RULE = "one standard error: the simplest candidate within one SE (of the paired difference) of the best"


def per_example_rp(gold: Sequence[Sequence[str]], ranked: Sequence[Sequence[str]], k: int) -> np.ndarray:
    """Rank-precision at k of each example (D'Oosterlinck et al. 2024)."""
    return np.array([hits_at_k(frozenset(g), r, k) / min(k, len(g)) for g, r in zip(gold, ranked)], dtype=np.float64)


def per_example_recall(gold: Sequence[Sequence[str]], ranked: Sequence[Sequence[str]], k: int) -> np.ndarray:
    return np.array([hits_at_k(frozenset(g), r, k) / len(g) for g, r in zip(gold, ranked)], dtype=np.float64)


def summarise(values: np.ndarray) -> dict[str, Any]:
    """Mean, standard error and 95% bootstrap interval of per-example values, in percent."""
    lo, hi = bootstrap_interval(values) if len(values) else (0.0, 0.0)
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return {"mean": round(100 * float(values.mean()), 2), "se": round(100 * se, 2), "ci95": [round(100 * lo, 2), round(100 * hi, 2)]}


def choose_weight(
    gold: Sequence[Sequence[str]],
    rank_at: Callable[[float], list[list[str]]],
    grid: Sequence[float],
    *,
    k: int,
    recall_k: int | None = None,
) -> tuple[float, dict[str, Any]]:
    """A fusion weight by the one-SE rule over ``grid`` (ascending: 0, the retriever, is simplest).

    ``rank_at(w)`` gives each example's ranking at weight w. With ``recall_k`` a weight whose
    R@recall_k falls below weight 0's by more than the paired SE is not eligible.
    """
    grid = sorted(float(w) for w in grid)
    if not grid or grid[0] != 0.0:
        raise ValueError(f"the weight grid must start at 0 (the retriever alone), got {grid}")
    rankings = [rank_at(w) for w in grid]
    scores = [per_example_rp(gold, r, k) for r in rankings]
    eligible = [True] * len(grid)
    recalls: list[np.ndarray] = []
    if recall_k:
        recalls = [per_example_recall(gold, r, recall_k) for r in rankings]
        eligible = [bool(rec.mean() >= recalls[0].mean() - paired_se(rec, recalls[0]) - 1e-12) for rec in recalls]
    pick, rows = one_se_choice(scores, eligible=eligible)
    table: dict[str, Any] = {
        "grid": grid,
        f"rp@{k}": [round(100 * r["mean"], 2) for r in rows],
        "se": [round(100 * r["se_of_gap"], 2) for r in rows],
        "eligible": eligible,
        "pick": grid[pick],
    }
    if recalls:
        table[f"r@{recall_k}"] = [round(100 * float(r.mean()), 2) for r in recalls]
    return grid[pick], table


@dataclass
class CandidateRun:
    """One candidate program's outputs on the compile examples (in example order)."""

    name: str
    demos: int
    infer_weight: float = 0.0
    rank_weight: float = 0.0
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    recall: np.ndarray = field(default_factory=lambda: np.zeros(0))
    weights: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    unparsed: int = 0


def folds_of(n: int, folds: int, seed: int) -> list[list[int]]:
    """Seeded disjoint folds of ``range(n)`` (one fold, all examples, when ``folds`` < 2)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = max(1, min(folds, n))
    return [sorted(order[f::k]) for f in range(k)]


def bootstrap_demos(program: Any, pool: Sequence[Any], max_demos: int, *, metric: Any, seed: int) -> Any:
    """A copy of ``program`` with up to ``max_demos`` bootstrapped demonstrations per LM step.

    The teacher is the program with both LM steps on (a step at weight 0 would leave no trace
    to learn from); only a few pool examples are tried (3 per demonstration, plus 2), so a
    model that rarely succeeds costs a bounded number of calls.
    """
    from dspy.teleprompt import BootstrapFewShot

    from iclcls.programs.dspy.modules import as_dspy_examples

    student = program.deepcopy()
    teacher = program.deepcopy()
    teacher.set_weights(infer=teacher.infer_weight or 0.5, rank=teacher.rank_weight or 0.5)
    tried = list(pool)
    random.Random(seed).shuffle(tried)
    tried = tried[: 3 * max_demos + 2]
    tp = BootstrapFewShot(metric=metric, max_bootstrapped_demos=max_demos, max_labeled_demos=0, max_rounds=1)
    compiled = tp.compile(student, teacher=teacher, trainset=as_dspy_examples(tried))
    compiled.set_weights(infer=program.infer_weight, rank=program.rank_weight)
    return compiled


def with_demos(program: Any, demos: int) -> Any:
    """A copy of ``program`` keeping each step's first ``demos`` demonstrations (0: zero-shot)."""
    copy = program.deepcopy()
    for _, predictor in copy.named_predictors():
        predictor.demos = list(predictor.demos[:demos])
    return copy


class HonestCompiler:
    """Runs the candidates on the compile examples and picks by the one-SE rule (see the module)."""

    def __init__(
        self,
        program: Any,
        examples: Sequence[Any],
        *,
        demo_counts: Sequence[int] = (0, 1, 2),
        folds: int = 3,
        weight_grid: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        metric_k: int = 10,
        recall_k: int | None = None,
        threads: int = 8,
        seed: int = 0,
        log: Callable[[str], None] = lambda m: None,
    ) -> None:
        self.program = program
        self.examples = [ex for ex in examples if ex.labels]
        if len(self.examples) < 2:
            raise ValueError(f"compiling needs at least 2 labelled examples, got {len(self.examples)}")
        self.gold = [list(ex.labels) for ex in self.examples]
        self.demo_counts = sorted(set(int(d) for d in demo_counts)) or [0]
        self.folds = folds_of(len(self.examples), folds if max(self.demo_counts) > 0 else 1, seed)
        self.grid = sorted(set(float(w) for w in weight_grid) | {0.0})
        self.metric_k = metric_k
        self.recall_k = recall_k or program.retrieve.k
        self.threads = threads
        self.seed = seed
        self.log = log
        self._from_text: list[list[str]] | None = None

    # -- the parts ---------------------------------------------------------------------------

    def from_text(self) -> list[list[str]]:
        """The sentence's own candidates (no LM), computed once for all candidates."""
        if self._from_text is None:
            self._from_text = [self.program.retrieve.lists(ex.text)[0] for ex in self.examples]
        return self._from_text

    def fold_programs(self, max_demos: int) -> list[Any]:
        """Per fold, the program with ``max_demos`` demonstrations bootstrapped from the other folds."""
        from iclcls.programs.dspy.modules import rp_at_k_metric

        if max_demos == 0:
            return [self.program] * len(self.folds)
        out = []
        for f, held_out in enumerate(self.folds):
            pool = [ex for i, ex in enumerate(self.examples) if i not in set(held_out)] or list(self.examples)
            out.append(bootstrap_demos(self.program, pool, max_demos, metric=rp_at_k_metric(self.metric_k), seed=self.seed + f))
        return out

    def _per_fold(self, programs: Sequence[Any], step: Callable[[Any, int], Any]) -> list[Any]:
        """``step(program, i)`` for every example, with its fold's program, threads within a fold."""
        from iclcls.programs.dspy.modules import map_threads

        out: list[Any] = [None] * len(self.examples)
        for program, idx in zip(programs, self.folds):
            for i, value in zip(idx, map_threads(lambda i, p=program: step(p, i), idx, threads=self.threads)):
                out[i] = value
        return out

    def run_candidate(self, demos: int, programs: Sequence[Any]) -> CandidateRun:
        """Infer, choose its weight, Rank, choose its weight; the per-example scores at both."""
        t0 = time.time()
        run = CandidateRun(name="zero-shot" if demos == 0 else f"{demos} demos", demos=demos)
        texts = [ex.text for ex in self.examples]
        from_text = self.from_text()
        before = self.program.stats.counts["rank"]["unparsed"] + self.program.stats.counts["infer"]["unparsed"]
        candidates = from_text
        if self.program.infer is not None:
            guesses = self._per_fold(programs, lambda p, i: p.infer(text=texts[i]).guesses)
            from_guesses = [self.program.retrieve.lists(t, g)[1] if g else [] for t, g in zip(texts, guesses)]
            fused = lambda w: [fuse_rankings(a, b, w) if b and w > 0 else a for a, b in zip(from_text, from_guesses)]  # noqa: E731
            run.infer_weight, run.weights["infer"] = choose_weight(self.gold, fused, self.grid, k=self.metric_k, recall_k=self.recall_k)
            candidates = fused(run.infer_weight)
        if self.program.rank is not None:
            picks = self._per_fold(programs, lambda p, i: list(p.rank(text=texts[i], candidates=candidates[i]).lm_labels))
            ranked = lambda w: [fuse_rankings(c, p, w) if p and w > 0 else c for c, p in zip(candidates, picks)]  # noqa: E731
            run.rank_weight, run.weights["rank"] = choose_weight(self.gold, ranked, self.grid, k=self.metric_k)
            final = ranked(run.rank_weight)
        else:
            final = candidates
        run.scores = per_example_rp(self.gold, final, self.metric_k)
        run.recall = per_example_recall(self.gold, final, self.recall_k)
        run.unparsed = self.program.stats.counts["rank"]["unparsed"] + self.program.stats.counts["infer"]["unparsed"] - before
        run.seconds = round(time.time() - t0, 1)
        return run

    # -- the whole choice ---------------------------------------------------------------------

    def compile(self) -> tuple[Any, dict[str, Any]]:
        """(the chosen program with its weights set, the decision record)."""
        t0 = time.time()
        fold_programs = self.fold_programs(max(self.demo_counts))
        runs = []
        for d in self.demo_counts:
            programs = [with_demos(p, d) for p in fold_programs] if d else [self.program] * len(self.folds)
            run = self.run_candidate(d, programs)
            self.log(f"  candidate {run.name}: RP@{self.metric_k} {100 * run.scores.mean():.2f}, weights infer {run.infer_weight} rank {run.rank_weight} ({run.seconds} s)")
            runs.append(run)
        pick, rows = one_se_choice([r.scores for r in runs])
        chosen = runs[pick]
        program = with_demos(fold_programs[0], chosen.demos) if chosen.demos else self.program.deepcopy()
        program.set_weights(infer=chosen.infer_weight, rank=chosen.rank_weight)
        decision = {
            "rule": RULE,
            "metric": f"rp@{self.metric_k}",
            "n": len(self.examples),
            "folds": len(self.folds),
            "candidates": [self._row(r, row) for r, row in zip(runs, rows)],
            "pick": chosen.name,
            "why": self._why(runs, rows, pick),
            "weights": {"infer": chosen.infer_weight, "rank": chosen.rank_weight},
            "seconds": round(time.time() - t0, 1),
        }
        return program, decision

    def _row(self, run: CandidateRun, row: dict[str, float]) -> dict[str, Any]:
        return {
            "name": run.name,
            "demos": run.demos,
            "weights": {"infer": run.infer_weight, "rank": run.rank_weight},
            f"rp@{self.metric_k}": summarise(run.scores),
            f"r@{self.recall_k}": summarise(run.recall),
            "gap_to_best": round(100 * row["gap_to_best"], 2),
            "se_of_gap": round(100 * row["se_of_gap"], 2),
            "weight_curves": run.weights,
            "unparsed": run.unparsed,
            "seconds": run.seconds,
        }

    def _why(self, runs: Sequence[CandidateRun], rows: Sequence[dict[str, float]], pick: int) -> str:
        best = max(range(len(runs)), key=lambda i: (rows[i]["mean"], -i))
        k = self.metric_k

        def pts(x: float) -> str:
            return f"{100 * x:.2f}"

        if best == pick:
            head = f"{runs[pick].name} has the best validation RP@{k} ({pts(rows[pick]['mean'])})"
            if pick > 0:
                gaps = [f"{runs[i].name}: gap {pts(rows[i]['gap_to_best'])} > SE {pts(rows[i]['se_of_gap'])}" for i in range(pick)]
                head += ", beyond one SE of every simpler candidate (" + ", ".join(gaps) + ")"
        else:
            head = (
                f"{runs[best].name} scores {pts(rows[best]['mean'])} but is within one SE of the simpler "
                f"{runs[pick].name} ({pts(rows[pick]['mean'])}: gap {pts(rows[pick]['gap_to_best'])} <= SE {pts(rows[pick]['se_of_gap'])})"
            )
        w = runs[pick]
        tail = []
        if self.program.infer is not None:
            tail.append("Infer off (weight 0: its guesses did not beat the sentence's own candidates beyond noise)" if w.infer_weight == 0 else f"Infer fused at weight {w.infer_weight}")
        if self.program.rank is not None:
            tail.append("Rank off (weight 0: retrieval order)" if w.rank_weight == 0 else f"Rank fused at weight {w.rank_weight}")
        return head + ("; " + "; ".join(tail) if tail else "")
