"""Class-incremental learning: classes arrive task by task; evaluate on all classes seen so far.

``run_cil(config)`` splits a benchmark's classes into T tasks (a seeded shuffle from
``iclcls.data.class_incremental_tasks``), and for every method fits a classifier on the first
task's training examples, then ``add_classes`` each later task's, and after each task predicts
the test examples of every class seen so far. Nothing is retrained: the methods here keep
statistics (ECL) or examples (class mean, kNN), so the final state equals fitting once on all
the data; ``joint_accuracy`` and the prediction agreement with that joint fit show it.

Metrics (``iclcls.metrics``): accuracy after each task (on all seen classes), the matrix
``acc[t][j]`` (after task t, on task j's classes), average incremental accuracy, final
accuracy, forgetting (mean over old tasks of best earlier accuracy minus final accuracy: with
a growing label space this measures interference from new classes, not lost state) and the
shortlist's recall@k. A method that uses an LM may be evaluated on a seeded subset of each
evaluation point's test examples, or only after the final task (its entry says which).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from iclcls.errors import ConfigError
from iclcls.experiment import build_classifier, load_splits, remember_lm, subset
from iclcls.experiment.config import ClassifierConfig, DataConfig, load_yaml, parse
from iclcls.experiment.report import figure, fmt, markdown_table, pyplot, save_png
from iclcls.io import atomic_write_json, atomic_write_text
from iclcls.metrics import average_incremental_accuracy, forgetting, wilson_interval
from iclcls.types import Example


class MethodConfig(BaseModel):
    """One method of a continual-learning comparison."""

    model_config = ConfigDict(extra="forbid")
    name: str
    classifier: ClassifierConfig
    eval: Literal["all", "final"] = "all"  # evaluate after every task, or after the last only
    test_per_task: int | None = Field(default=None, ge=1, description="seeded test subset per evaluation point")
    joint: bool = True  # also fit once on all the data and compare
    label: str | None = None  # the name shown in tables and plots


class CILConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "cil"
    data: DataConfig
    tasks: int = Field(ge=1)
    task_seed: int = 0
    recall_k: int = Field(default=5, ge=1)
    primary: str = "ecl"
    methods: list[MethodConfig]

    @model_validator(mode="after")
    def _check(self) -> CILConfig:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be distinct, got {names}")
        if self.primary not in names:
            raise ValueError(f"primary method {self.primary!r} is not among the methods {names}")
        return self


def load_cil_config(path: str | Path) -> CILConfig:
    return parse(CILConfig, load_yaml(path), path)


def _evaluate(clf: Any, examples: list[Example], k: int) -> tuple[list[str | None], list[bool], list[Any]]:
    """Top-1 predictions, whether the gold label is in the first k shortlisted candidates, the predictions."""
    preds = clf.predict_detailed(examples, show_progress=False) if examples else []
    top1 = [p.label for p in preds]
    hit = [ex.label in p.candidates[:k] for ex, p in zip(examples, preds)]
    return top1, hit, preds


def fusion_curve(preds: Sequence[Any], examples: Sequence[Example], weights: Sequence[float]) -> dict[str, float] | None:
    """Accuracy of the fused score at other LM weights, from the traces (no extra LM calls).

    A diagnostic of how much the LM adds (w=0: the retriever alone, w=1: the LM alone); the
    reported accuracy stays the configured weight's.
    """
    from iclcls.rank.fusion import fusion_accuracy

    acc = fusion_accuracy([p.trace for p in preds], [ex.labels for ex in examples], weights)
    return None if acc is None else {f"{w:g}": float(a) for w, a in zip(weights, acc)}


def _ecl_stats(clf: Any) -> dict[str, Any] | None:
    st = getattr(clf.shortlister_, "stats_", None)
    if st is None:
        return None
    names = clf.pool_.labels.labels[: st.n_rows]
    live = np.flatnonzero(st.counts > 0)
    return {
        "labels": [names[i] for i in live],
        "means": st.means(live),
        "cov": st.covariance(),
    }


def _compare_ecl(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, float] | None:
    """Largest absolute differences of class means and covariance (matched by label name)."""
    if a is None or b is None or sorted(a["labels"]) != sorted(b["labels"]):
        return None
    pos = {lab: i for i, lab in enumerate(b["labels"])}
    order = [pos[lab] for lab in a["labels"]]
    return {
        "max_abs_mean_diff": float(np.abs(a["means"] - b["means"][order]).max()),
        "max_abs_cov_diff": float(np.abs(a["cov"] - b["cov"]).max()),
    }


def run_method(
    method: MethodConfig,
    tasks: Sequence[Sequence[str]],
    train: list[Example],
    test: list[Example],
    *,
    recall_k: int,
    seed: int,
    lms: dict[str, Any],
    show_progress: bool = True,
) -> dict[str, Any]:
    """One method through all tasks; returns its metrics (and its final predictions for checks)."""
    task_of = {lab: t for t, labs in enumerate(tasks) for lab in labs}
    train_by_task: list[list[Example]] = [[] for _ in tasks]
    for ex in train:
        ts = {task_of.get(lab) for lab in ex.labels}
        if None not in ts:
            train_by_task[max(ts)].append(ex)  # a multi-label example arrives with its last class
    test_task = [task_of.get(ex.label) for ex in test]
    clf = build_classifier(method.classifier, lms=lms, quiet=True)
    n_tasks = len(tasks)
    acc_rows: list[list[float]] = []
    acc_seen, recall_seen, n_eval, seconds_add, seconds_eval = [], [], [], [], []
    final: dict[str, Any] = {}
    t_start = time.time()
    bar = tqdm(range(n_tasks), desc=f"cil {method.name}", unit="task", disable=not show_progress)
    for t in bar:
        t0 = time.time()
        if t == 0:
            clf.fit(train_by_task[0])
            remember_lm(clf, lms)
        else:
            clf.add_classes(train_by_task[t])
        seconds_add.append(time.time() - t0)
        if method.eval == "final" and t < n_tasks - 1:
            continue
        seen = [ex for ex, tt in zip(test, test_task) if tt is not None and tt <= t]
        chosen = subset(seen, method.test_per_task, seed + t)
        t0 = time.time()
        top1, hit, preds = _evaluate(clf, chosen, recall_k)
        seconds_eval.append(time.time() - t0)
        correct = np.array([p is not None and p in ex.labels for p, ex in zip(top1, chosen)], dtype=bool)
        tasks_of = np.array([task_of[ex.label] for ex in chosen])
        row = [float(correct[tasks_of == j].mean()) if (tasks_of == j).any() else float("nan") for j in range(t + 1)]
        acc_rows.append(row)
        acc_seen.append(float(correct.mean()))
        recall_seen.append(float(np.mean(hit)))
        n_eval.append(len(chosen))
        if t == n_tasks - 1:
            final = {"examples": chosen, "top1": top1, "correct": correct, "preds": preds}
        bar.set_postfix(acc=f"{acc_seen[-1]:.3f}")
    bar.close()
    out: dict[str, Any] = {
        "label": method.label or method.name,
        "eval": method.eval,
        "test_per_task": method.test_per_task,
        "eval_examples": n_eval,
        "accuracy_per_task": acc_seen,
        "recall_per_task": recall_seen,
        "final_accuracy": acc_seen[-1],
        "final_accuracy_ci": list(wilson_interval(int(final["correct"].sum()), len(final["correct"]))),
        f"shortlist_recall_at_{recall_k}": recall_seen[-1],
        "seconds_add_per_task": seconds_add,
        "seconds_eval": seconds_eval,
        "seconds_total": time.time() - t_start,
        "classes_final": len(clf.classes_),
    }
    curve = fusion_curve(final["preds"], final["examples"], (0.0, 0.25, 0.5, 0.75, 1.0))
    if curve is not None:
        out["final_accuracy_by_lm_weight"] = curve
    if method.eval == "all":
        out["accuracy_matrix"] = acc_rows
        out["avg_incremental_accuracy"] = average_incremental_accuracy(acc_rows)
        out["forgetting"] = forgetting(acc_rows)
    else:
        out["avg_incremental_accuracy"] = None  # evaluated after the last task only
        out["forgetting"] = None
    if method.joint:
        t0 = time.time()
        joint = build_classifier(method.classifier, lms=lms, quiet=True)
        joint.fit(_joint_order(train, task_of))
        j_top1, _, _ = _evaluate(joint, final["examples"], recall_k)
        j_correct = np.array([p is not None and p in ex.labels for p, ex in zip(j_top1, final["examples"])])
        out["joint_accuracy"] = float(j_correct.mean())
        out["joint_prediction_agreement"] = float(np.mean([a == b for a, b in zip(j_top1, final["top1"])]))
        cmp = _compare_ecl(_ecl_stats(clf), _ecl_stats(joint))
        if cmp is not None:
            out["joint_statistics_diff"] = cmp
        out["seconds_joint"] = time.time() - t0
    return out


def _joint_order(train: list[Example], task_of: dict[str, int]) -> list[Example]:
    """All training examples of the split's classes, in the data's own order (not task order)."""
    return [ex for ex in train if all(lab in task_of for lab in ex.labels)]


def run_cil(
    cfg: CILConfig,
    out_dir: str | Path,
    *,
    only: Sequence[str] | None = None,
    show_progress: bool = True,
    config_path: str | None = None,
) -> dict[str, Any]:
    """Run every method (or those in ``only``), write ``metrics.json``, ``report.md`` and the plot."""
    from iclcls.data import class_incremental_tasks

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = load_splits(cfg.data)
    tasks = class_incremental_tasks(splits.labels, n_tasks=cfg.tasks, seed=cfg.task_seed)
    methods = [m for m in cfg.methods if only is None or m.name in only]
    if only is not None and cfg.primary not in [m.name for m in methods]:
        raise ConfigError(f"the primary method {cfg.primary!r} must be among the methods run")
    lms: dict[str, Any] = {}
    results = {}
    for m in methods:
        results[m.name] = run_method(
            m, tasks, splits.train, splits.test, recall_k=cfg.recall_k, seed=cfg.data.seed, lms=lms,
            show_progress=show_progress,
        )
    prim = results[cfg.primary]
    k = cfg.recall_k
    metrics = {
        "name": cfg.name,
        "benchmark": splits.name,
        "primary": cfg.primary,
        "final_accuracy": prim["final_accuracy"],
        "avg_incremental_accuracy": prim["avg_incremental_accuracy"],
        "forgetting": prim["forgetting"],
        "joint_accuracy": prim.get("joint_accuracy"),
        f"shortlist_recall_at_{k}": prim[f"shortlist_recall_at_{k}"],
        "n_tasks": len(tasks),
        "classes": len(splits.labels),
        "train_examples": len(splits.train),
        "test_examples": len(splits.test),
        "task_seed": cfg.task_seed,
        "tasks": tasks,
        "methods": results,
        "config": cfg.model_dump(mode="json"),
    }
    write_outputs(metrics, out_dir, config_path=config_path)
    return metrics


def write_outputs(metrics: dict[str, Any], out_dir: str | Path, *, config_path: str | None = None) -> None:
    """``metrics.json``, the accuracy-vs-task plot and ``report.md`` (re-runnable from a metrics.json)."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "metrics.json", metrics)
    plot = figure(plot_accuracy, metrics["methods"], out_dir / "accuracy_vs_task.png",
                  title=f"{metrics['name']}: accuracy on all seen classes", what="accuracy_vs_task.png")
    atomic_write_text(out_dir / "report.md", report_markdown(metrics, plot.name if plot else None, config_path))


def plot_accuracy(results: dict[str, dict[str, Any]], path: Path, *, title: str) -> Path | None:
    """Accuracy on all classes seen so far against the task index, one line per method."""
    fig, ax = pyplot().subplots(figsize=(6.4, 4.0))
    for r in results.values():
        acc = r["accuracy_per_task"]
        if r["eval"] == "all":
            ax.plot(range(1, len(acc) + 1), [100 * a for a in acc], marker="o", ms=3, label=r["label"])
        else:
            n = len(r["seconds_add_per_task"])
            sub = f"{r['eval_examples'][-1]} test ex."
            ax.plot([n], [100 * acc[-1]], marker="*", ms=10, ls="", label=f"{r['label']} (final, {sub})")
            base = (r.get("final_accuracy_by_lm_weight") or {}).get("0")
            if base is not None:
                ax.plot([n], [100 * base], marker="x", ms=8, ls="", label=f"its retriever alone (same {sub})")
    ax.set_xlabel("task (classes arrive in groups)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("accuracy on seen classes (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(fig, path)


def report_markdown(metrics: dict[str, Any], plot: str | None, config_path: str | None = None) -> str:
    """The run's report: one table of the CL metrics per method, accuracy after each task, the plot."""
    k = next(key for key in metrics if key.startswith("shortlist_recall_at_")).rsplit("_", 1)[1]
    lines = [
        f"# Class-incremental learning: {metrics['name']}",
        "",
        f"{metrics['benchmark']}: {metrics['classes']} classes in {metrics['n_tasks']} tasks (seed "
        f"{metrics['task_seed']}), {metrics['train_examples']} training / {metrics['test_examples']} test examples. "
        "After each task every method is evaluated on the test examples of all classes seen so far.",
    ]
    if config_path:
        lines += ["", f"Command: `iclcls cil {config_path} --out <dir>`"]
    rows = []
    for r in metrics["methods"].values():
        n = r["eval_examples"]
        if r["eval"] == "final":
            where = f"{n[-1]} seeded test ex., final task only"
        else:
            where = f"all {n[-1]} test ex." if r["test_per_task"] is None else f"seeded {r['test_per_task']} per task"
        agree = r.get("joint_prediction_agreement")
        rows.append([
            r["label"], fmt("a", r["final_accuracy"]), fmt("a", r["avg_incremental_accuracy"]), fmt("a", r["forgetting"]),
            fmt("a", r.get("joint_accuracy")), "–" if agree is None else f"{100 * agree:.2f}%",
            fmt("a", r[f"shortlist_recall_at_{k}"]), where, f"{r['seconds_total']:.0f}",
        ])
    header = ["method", "final acc.", "avg. incremental acc.", "forgetting", "joint acc.",
              "final = joint (same predictions)", f"shortlist recall@{k}", "evaluated on", "seconds"]
    lines += ["", markdown_table(header, rows), "Rates in percent.", "", "Accuracy (%) on all seen classes after each task:", ""]
    n_tasks = metrics["n_tasks"]
    rows = []
    for r in metrics["methods"].values():
        acc = r["accuracy_per_task"]
        cells = [fmt("a", a) for a in acc] if r["eval"] == "all" else ["–"] * (n_tasks - 1) + [fmt("a", acc[-1])]
        rows.append([r["label"], *cells])
    lines.append(markdown_table(["method", *(str(t + 1) for t in range(n_tasks))], rows))
    diffs = {r["label"]: r["joint_statistics_diff"] for r in metrics["methods"].values() if "joint_statistics_diff" in r}
    if diffs:
        lines += ["No forgetting by construction: the ECL's statistics after the last task against one joint fit "
                  "(largest absolute differences):", ""]
        for name, d in diffs.items():
            lines.append(f"- {name}: class means {d['max_abs_mean_diff']:.2e}, covariance {d['max_abs_cov_diff']:.2e}")
        lines.append("")
    lines += [
        "Forgetting = mean over old tasks of (best earlier accuracy on its classes - final accuracy on them). "
        "These methods keep every statistic, so a positive value is interference from the classes that arrived "
        "later (a larger label space), not lost state: the final predictions equal the joint fit's.",
    ]
    curves = {r["label"]: r["final_accuracy_by_lm_weight"] for r in metrics["methods"].values() if "final_accuracy_by_lm_weight" in r}
    if curves:
        ws = list(next(iter(curves.values())))
        lines += ["", "Fusion diagnostic (final task, same test examples, from the prediction traces: no extra LM calls): "
                  "accuracy (%) at other LM weights; w=0 is the retriever alone, w=1 the LM alone. The weight used "
                  "above is the configured one, not picked on test data.", ""]
        lines.append(markdown_table(["method", *(f"w={w}" for w in ws)], [[n, *(fmt("a", c[w]) for w in ws)] for n, c in curves.items()]))
    if plot:
        lines += ["", f"![accuracy against task]({plot})"]
    return "\n".join(lines) + "\n"
