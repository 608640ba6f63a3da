"""Markdown reports with matplotlib plots (Agg backend) for one run and for a sweep; the
plot and table helpers here serve the study and continual-learning reports too.

Rates are shown in percent with two decimals; published reference numbers (percent, as
papers print them) sit in their own columns beside ours. Plots are PNG files next to the
report and linked from it. One module (~410 lines): every report shares these helpers.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml

from iclcls.io import atomic_path, atomic_write_text
from iclcls.metrics import curves_at_k, per_class_accuracy

NOT_RATES = {"n", "seconds_per_example", "prompt_tokens_mean", "labels_per_prediction"}
HEADLINE = ("accuracy", "micro_f1", "macro_f1", "micro_precision", "micro_recall", "subset_accuracy")


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def fmt(key: str, value: Any) -> str:
    """A metric for a table: rates in percent, counts as integers, other numbers with 2-3 digits."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if not isinstance(value, (int, float)):
        return str(value)
    if key == "n":
        return f"{int(value)}"
    if key in NOT_RATES:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return f"{100 * value:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def metrics_table(
    metrics: Mapping[str, float],
    *,
    ks: Sequence[int],
    references: Sequence[Mapping[str, Any]] = (),
    multi_label: bool = True,
) -> str:
    """Headline metrics (and every metric a reference reports) beside the references, then a
    table with one row per k: P@k, R@k, RP@k, nDCG@k."""
    refs = list(references)
    header = ["metric", "this run"] + [r["source"] for r in refs]
    keys = [k for k in HEADLINE if k in metrics and (multi_label or k in ("accuracy", "macro_f1"))]
    keys += [k for r in refs for k in r["percent"] if k not in keys]
    keys = list(dict.fromkeys(keys))
    rows = [[k, fmt(k, metrics.get(k))] + [_ref(r, k) for r in refs] for k in keys]
    out = markdown_table(header, rows)
    at_k = [[k] + [fmt(f"{m}@{k}", metrics.get(f"{m}@{k}")) for m in ("p", "r", "rp", "ndcg")] for k in ks if f"r@{k}" in metrics]
    if at_k:
        out += "\n" + markdown_table(["k", "P@k", "R@k", "RP@k", "nDCG@k"], at_k)
    out += "\nRates in percent"
    if "accuracy_ci_low" in metrics:
        out += f"; accuracy (top-1) 95% Wilson interval {fmt('a', metrics['accuracy_ci_low'])}–{fmt('a', metrics['accuracy_ci_high'])}"
    out += ".\n"
    return out


def _ref(ref: Mapping[str, Any], key: str) -> str:
    v = ref["percent"].get(key)
    return "–" if v is None else f"{v:.2f}"


# -- plots -----------------------------------------------------------------------------------------


def save_png(fig: Any, path: Path) -> Path:
    """Write a figure as PNG atomically and close it (also when writing fails)."""
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        pyplot().close(fig)
    return path


class ReportWarning(RuntimeWarning):
    """A figure or report could not be written; the run's metrics and predictions are intact."""


T = TypeVar("T")


def figure(draw: Callable[..., T | None], *args: Any, what: str, problems: list[str] | None = None, **kwargs: Any) -> T | None:
    """``draw(*args, **kwargs)``, or None with a :class:`ReportWarning` when it fails: a figure
    is a view of results that are already written, so it never fails a run. The problem is
    also appended to ``problems`` (for the report to say which figure is missing and why)."""
    try:
        return draw(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any plotting failure is only a missing figure
        why = f"{what} was not drawn ({type(e).__name__}: {str(e)[:300]})"
        warnings.warn(why + "; the metrics and predictions are written", ReportWarning, stacklevel=2)
        if problems is not None:
            problems.append(why)
        return None


def report_safely(write: Callable[..., Path], *args: Any, what: str = "report.md", **kwargs: Any) -> Path | None:
    """``write(*args, **kwargs)``, or None with a :class:`ReportWarning` when it fails (after the
    metrics and predictions were written, a report is never worth failing the run for)."""
    try:
        return write(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a failed report leaves the results intact
        warnings.warn(f"{what} was not written ({type(e).__name__}: {str(e)[:300]}); the metrics and "
                      "predictions are written", ReportWarning, stacklevel=2)
        return None


def plot_at_k(records: Sequence[Mapping[str, Any]], path: str | Path, *, max_k: int, multi_label: bool, title: str) -> Path | None:
    """P@k, R@k and RP@k (multi-label) or top-k accuracy (single-label) against k."""
    longest = max((len(r["labels"]) for r in records), default=0)
    max_k = min(max_k, longest)
    if max_k < 2:
        return None
    plt = pyplot()
    c = curves_at_k([r["gold"] for r in records], [r["labels"] for r in records], max_k)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    k = np.array(c["k"])
    if multi_label:
        ax.plot(k, 100 * np.array(c["rp"]), label="RP@k", lw=2)
        ax.plot(k, 100 * np.array(c["r"]), label="R@k", lw=1.5, ls="--")
        ax.plot(k, 100 * np.array(c["p"]), label="P@k", lw=1.5, ls=":")
        ax.legend(frameon=False)
        ax.set_ylabel("percent")
    else:
        ax.plot(k, 100 * np.array(c["r"]), marker="o", ms=3, lw=2)
        ax.set_ylabel("gold label in top k (%)")
    ax.set_xlabel("k")
    ax.set_ylim(0, 100)
    ax.set_xlim(1, max_k)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    return save_png(fig, Path(path))


def plot_per_class(records: Sequence[Mapping[str, Any]], path: str | Path, *, title: str) -> Path | None:
    """Per-class accuracy (single-label) with 95% Wilson intervals, worst class at the top."""
    gold = [r["gold"][0] for r in records]
    pred = [r["labels"][0] if r["labels"] else None for r in records]
    scores = sorted(per_class_accuracy(gold, pred), key=lambda c: (c.accuracy, c.label), reverse=True)
    if len(scores) < 2:
        return None
    plt = pyplot()
    n = len(scores)
    fig, ax = plt.subplots(figsize=(7.0, 1.2 + 0.17 * n))
    y = np.arange(n)
    acc = np.array([100 * c.accuracy for c in scores])
    # A Wilson bound can round a hair past the accuracy (a class at 100%): matplotlib refuses
    # negative error bars, so clip them at zero.
    err = np.array([[100 * (c.accuracy - c.low) for c in scores], [100 * (c.high - c.accuracy) for c in scores]])
    err = np.clip(np.nan_to_num(err, nan=0.0), 0.0, None)
    ax.errorbar(acc, y, xerr=err, fmt="o", ms=3, lw=0.8, capsize=1.5, color="tab:blue", ecolor="tab:gray")
    overall = 100 * float(np.mean([p == g for p, g in zip(pred, gold)]))
    ax.axvline(overall, color="tab:red", lw=1, ls="--", label=f"overall {overall:.1f}%")
    ax.set_yticks(y)
    ax.set_yticklabels([f"{c.label} ({c.n})" for c in scores], fontsize=6 if n > 40 else 8)
    ax.set_xlim(-2, 102)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("accuracy (%), 95% Wilson interval; (n) test examples of the class")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower left", frameon=False, fontsize=8)
    ax.set_title(title, fontsize=10)
    return save_png(fig, Path(path))


def plot_per_label_f1(records: Sequence[Mapping[str, Any]], path: str | Path, *, title: str, max_labels: int = 60) -> Path | None:
    """Multi-label: F1 per label of the decided label sets, with each label's support."""
    from sklearn.metrics import precision_recall_fscore_support
    from sklearn.preprocessing import MultiLabelBinarizer

    gold = [r["gold"] for r in records]
    pred = [r["predicted"] for r in records]
    classes = sorted(set().union(*map(set, gold)))
    if not 2 <= len(classes) <= max_labels:
        return None
    mlb = MultiLabelBinarizer(classes=classes)
    yt = mlb.fit_transform(gold)
    yp = mlb.transform([[p for p in x if p in set(classes)] for x in pred])
    _, _, f1, support = precision_recall_fscore_support(yt, yp, zero_division=0)
    order = np.argsort(f1, kind="stable")
    plt = pyplot()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(7.0, 1.2 + 0.2 * n))
    ax.barh(np.arange(n), 100 * f1[order], color="tab:blue")
    ax.set_yticks(np.arange(n))
    ax.set_yticklabels([f"{classes[i]} ({support[i]})" for i in order], fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("F1 (%); (n) gold occurrences in the scored examples")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return save_png(fig, Path(path))


def plot_sweep(rows: Sequence[Mapping[str, Any]], axes: Sequence[str], primary: str, path: str | Path) -> Path | None:
    """The primary metric against the last numeric axis, one line per setting of the other axes;
    a bar chart when no axis is numeric."""
    if not rows or primary not in rows[0]:
        return None
    plt = pyplot()
    numeric = [a for a in axes if all(isinstance(r[a], (int, float)) and not isinstance(r[a], bool) for r in rows)]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if numeric:
        x_axis = numeric[-1]
        others = [a for a in axes if a != x_axis]
        groups: dict[tuple, list[Mapping[str, Any]]] = {}
        for r in rows:
            groups.setdefault(tuple(r[a] for a in others), []).append(r)
        for key, rs in groups.items():
            rs = sorted(rs, key=lambda r: r[x_axis])
            label = ", ".join(f"{a.split('.')[-1]}={v}" for a, v in zip(others, key)) or primary
            ax.plot([r[x_axis] for r in rs], [100 * r[primary] for r in rs], marker="o", label=label)
        ax.set_xlabel(x_axis.split(".")[-1])
        xs = [float(r[x_axis]) for r in rows]
        positive = [x for x in xs if x > 0]
        if positive and min(xs) >= 0 and max(xs) / min(positive) >= 50:  # values over decades
            ax.set_xscale("symlog", linthresh=min(positive)) if min(xs) == 0 else ax.set_xscale("log")
        if len(groups) > 1 or others:
            ax.legend(frameon=False, fontsize=8)
    else:
        names = [r["run"] for r in rows]
        ax.bar(np.arange(len(rows)), [100 * r[primary] for r in rows], color="tab:blue")
        ax.set_xticks(np.arange(len(rows)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{primary} (%)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{primary} across the sweep", fontsize=10)
    return save_png(fig, Path(path))


def fusion_curve(records: Sequence[Mapping[str, Any]], *, grid: int = 21) -> dict[str, list[float]] | None:
    """Top-1 accuracy of the fused score for w in [0, 1], recomputed from the records' traces
    (what the fusion ranker mixes). For reading a run, not for choosing w: that is tuned on
    validation data."""
    from iclcls.rank.fusion import fusion_accuracy

    weights = np.linspace(0.0, 1.0, grid)
    acc = fusion_accuracy([r.get("trace", {}) for r in records], [r["gold"] for r in records], weights)
    return None if acc is None else {"weight": weights.tolist(), "accuracy": acc.tolist()}


def plot_fusion(curve: Mapping[str, list[float]], path: str | Path, *, tuned: float | None, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(curve["weight"], 100 * np.array(curve["accuracy"]), marker="o", ms=3)
    if tuned is not None:
        ax.axvline(tuned, color="tab:red", ls="--", lw=1, label=f"weight tuned on validation: {tuned:.2f}")
        ax.legend(frameon=False, fontsize=8)
    ax.set_xlabel("fusion weight w (0 = retriever alone, 1 = LM alone)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    return save_png(fig, Path(path))


# -- reports ---------------------------------------------------------------------------------------


def _errors_section(records: Sequence[Mapping[str, Any]], limit: int = 5) -> str:
    wrong = [r for r in records if not r.get("correct")][:limit]
    if not wrong:
        return ""
    rows = []
    for r in wrong:
        text = r["text"] if len(r["text"]) <= 110 else r["text"][:107] + "..."
        rows.append(
            [r["index"], text, ", ".join(r["gold"]), ", ".join(r["labels"][:3]), len(r.get("candidates", [])), len(r.get("demonstrations", []))]
        )
    return "## First errors\n\n" + markdown_table(["#", "text", "gold", "top 3", "candidates", "demos"], rows) + "\n"


def run_report(
    out_dir: str | Path,
    *,
    name: str,
    metrics: Mapping[str, float],
    records: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
    info: Mapping[str, Any],
    ks: Sequence[int],
    primary: str,
    references: Sequence[Mapping[str, Any]] = (),
    per_class: bool = True,
    command: str | None = None,
    notes: str | None = None,
) -> Path:
    """Write ``report.md`` and its plots for one run; return the report's path."""
    out = Path(out_dir)
    multi = bool(info.get("multi_label"))
    parts = [f"# {name}\n"]
    head = f"**{primary}: {fmt(primary, metrics.get(primary))}** on {int(metrics.get('n', len(records)))} "
    head += f"{info.get('split', 'test')} examples of `{info.get('benchmark', '?')}`"
    head += " (multi-label)." if multi else "."
    parts.append(head + "\n")
    if notes:
        parts.append(f"> {notes.strip()}\n")
    parts.append("## Results\n\n" + metrics_table(metrics, ks=ks, references=references, multi_label=multi))
    extra = [(k, fmt(k, metrics[k])) for k in ("labels_per_prediction", "seconds_per_example", "prompt_tokens_mean") if k in metrics]
    if extra:
        parts.append("\n" + ", ".join(f"{k}: {v}" for k, v in extra) + "\n")
    plots, missing = [], []
    p = figure(plot_at_k, records, out / "at_k.png", max_k=max(max(ks), 10), multi_label=multi,
               title=f"{name}: {'RP@k, R@k, P@k' if multi else 'top-k accuracy'}", what="at_k.png", problems=missing)
    if p:
        plots.append(("metrics against k", p.name))
    if per_class and not multi:
        p = figure(plot_per_class, records, out / "per_class.png", title=f"{name}: per-class accuracy",
                   what="per_class.png", problems=missing)
        if p:
            plots.append(("per-class accuracy with 95% Wilson intervals", p.name))
    if per_class and multi:
        p = figure(plot_per_label_f1, records, out / "per_label_f1.png", title=f"{name}: per-label F1",
                   what="per_label_f1.png", problems=missing)
        if p:
            plots.append(("per-label F1", p.name))
    curve = figure(fusion_curve, records, what="the fusion curve", problems=missing)
    if curve is not None:
        acc = curve["accuracy"]
        tuned_w = (info.get("tuned") or {}).get("fusion_weight")
        p = figure(plot_fusion, curve, out / "fusion.png", tuned=tuned_w,
                   title=f"{name}: LM and retriever fused, on the scored examples", what="fusion.png", problems=missing)
        if p:
            plots.append(("accuracy against the fusion weight", p.name))
        parts.append(
            f"\nFrom the traces, top-1 accuracy on these examples: retriever alone {fmt('a', acc[0])}, "
            f"LM alone {fmt('a', acc[-1])}, best fusion {fmt('a', max(acc))} at w = {curve['weight'][int(np.argmax(acc))]:.2f} "
            + (f"(the run used w = {tuned_w:.2f}, chosen on validation).\n" if tuned_w is not None else "(the run's w was not tuned).\n")
        )
    if plots or missing:
        parts.append("\n## Plots\n\n" + "\n\n".join(f"![{alt}]({fname})" for alt, fname in plots) + "\n")
        parts += [f"\n> {why}.\n" for why in missing]
    run_rows = [
        ["benchmark", info.get("benchmark")],
        ["scored split", f"{info.get('split')} ({info.get('scored')} examples; {info.get('dropped_unlabelled', 0)} unlabelled dropped)"],
        ["split sizes (after subsetting)", json.dumps(info.get("sizes"))],
        ["LM", info.get("lm") or "none (retriever only)"],
        ["embedder", info.get("embedder")],
        ["tuned on validation", f"{json.dumps(info.get('tuned'))} ({info.get('tuned_on', 0)} examples{', restored from tuned.json' if info.get('tuned_restored') else ''})"],
        ["fit seconds", info.get("fit_seconds")],
        ["examples resumed from a checkpoint", info.get("resumed_examples", 0)],
    ]
    parts.append("\n## Run\n\n" + markdown_table(["", ""], run_rows))
    parts.append("\n" + _errors_section(records))
    if command:
        parts.append(f"## Command\n\n```\n{command}\n```\n\n")
    parts.append("## Resolved config\n\n```yaml\n" + yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True) + "```\n")
    if info.get("classifier_params"):
        parts.append("\nEffective classifier parameters (after the program preset):\n\n```json\n"
                     + json.dumps(info["classifier_params"], indent=2, ensure_ascii=False) + "\n```\n")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(s.rstrip("\n") + "\n" for s in parts))
    return path


def sweep_report(
    out_dir: str | Path,
    *,
    name: str,
    rows: Sequence[Mapping[str, Any]],
    axes: Sequence[str],
    primary: str,
    ks: Sequence[int],
    command: str | None = None,
) -> Path:
    """One comparison table (a row per grid point) and a plot of the primary metric."""
    out = Path(out_dir)
    cols = [primary] + [k for k in ("accuracy", "micro_f1", "macro_f1") if k != primary]
    cols += [f"{m}@{k}" for k in ks if k > 1 for m in ("rp", "r") if f"{m}@{k}" not in cols]
    cols = [c for c in cols if rows and c in rows[0]]
    cols += [c for c in ("seconds_per_example",) if rows and c in rows[0]]
    best = max(rows, key=lambda r: r.get(primary, float("-inf"))) if rows else None
    table = markdown_table(
        ["run"] + [a.split(".")[-1] for a in axes] + cols,
        [[f"[{r['run']}]({r['run']}/report.md)"] + [r[a] for a in axes] + [fmt(c, r.get(c)) for c in cols] for r in rows],
    )
    parts = [f"# Sweep: {name}\n", f"{len(rows)} runs over {', '.join(axes)}. Rates in percent."]
    if best is not None:
        parts.append(f"Best {primary}: **{fmt(primary, best.get(primary))}** ({best['run']}).\n")
    parts.append("## Comparison\n\n" + table)
    p = figure(plot_sweep, rows, axes, primary, out / "sweep.png", what="sweep.png")
    if p:
        parts.append(f"\n![{primary} across the sweep]({p.name})\n")
    if command:
        parts.append(f"\n## Command\n\n```\n{command}\n```\n")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path
