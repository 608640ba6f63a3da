"""A demonstration-selection study: selectors x shots x seeds on one dataset, all else fixed.

A study config is an experiment config (``data:``, ``classifier:``, ``eval:``) plus a
``study:`` section::

    study:
      selectors: {random: random, knn: knn, dpp: {name: dpp, lam: 0.05}}
      shots: [4, 16]
      seeds: [0, 1, 2]
      queries: 150          # optional: a seeded subset of the scored split
      deterministic: [dpp]  # optional: run once, reuse for every seed (std 0)

Every grid point is one run of the experiment core (``iclcls.experiment``: checkpointed
predictions, metrics, a per-run report) in ``OUT/runs/<point>``; the selector's ``seed`` is
set to the point's seed when the selector takes one. Selectors without a ``seed`` option
(kNN, class-balanced, DPP) give the same prompts for every seed, so they run once and
their result is reported for every seed with standard deviation 0. The LM is wrapped in a
counter, so the report shows LM requests, prompt tokens and the tokens actually prefilled
(after shared-prefix reuse) per query. Outputs: ``OUT/metrics.json`` (one row per
selector, shots and seed), ``OUT/summary.json``, ``OUT/report.md`` and
``OUT/accuracy_vs_shots.png``. Re-running resumes: finished points are re-scored only.
The config, the grid, the runner and the report stay together (~420 lines): one command.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from iclcls.errors import ConfigError
from iclcls.experiment import PARTIAL, Prepared, run_experiment
from iclcls.experiment.config import EvalConfig, apply_overrides, load_yaml, parse
from iclcls.experiment.report import figure, markdown_table, pyplot, save_png
from iclcls.io import atomic_write_json, atomic_write_text, read_json
from iclcls.lm.counting import CountingLM
from iclcls.types import Example

USAGE = "study_point.json"


class StudyOptions(BaseModel):
    """The grid: named selector specs, shot counts and seeds."""

    model_config = ConfigDict(extra="forbid")
    selectors: dict[str, str | dict[str, Any]] = Field(description="display name -> selector spec")
    shots: list[int]
    seeds: list[int] = Field(default_factory=lambda: [0])
    deterministic: list[str] | None = Field(
        default=None, description="selectors run once and reused for every seed (default: those without a seed option)"
    )
    queries: int | None = Field(default=None, ge=1, description="a seeded subset of the scored split")
    query_seed: int = 0
    retriever_reference: bool = Field(default=True, description="also score the retriever alone (no LM) once")

    @model_validator(mode="after")
    def _check(self) -> StudyOptions:
        if not self.selectors:
            raise ValueError("study.selectors is empty")
        if not self.shots or any(k < 0 for k in self.shots):
            raise ValueError(f"study.shots must be a non-empty list of integers >= 0, got {self.shots}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study.seeds must be a non-empty list of distinct integers, got {self.seeds}")
        unknown = set(self.deterministic or ()) - set(self.selectors)
        if unknown:
            raise ValueError(f"study.deterministic names selectors not in study.selectors: {sorted(unknown)}")
        return self


class StudyConfig(EvalConfig):
    """An experiment config plus the grid."""

    study: StudyOptions


def load_study_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> tuple[StudyConfig, dict[str, Any]]:
    """The validated study config and its raw mapping (overrides applied; errors name file and field)."""
    raw = load_yaml(path)
    if overrides:
        raw = apply_overrides({k: v for k, v in raw.items() if k != "study"}, overrides) | (
            {"study": raw["study"]} if "study" in raw else {}
        )
    cfg = parse(StudyConfig, raw, path)
    from iclcls.select import SELECTORS

    for name, spec in cfg.study.selectors.items():
        sel = spec if isinstance(spec, str) else spec.get("name")
        if sel not in SELECTORS:
            raise ConfigError(f"{path}: study.selectors.{name}: unknown selector {sel!r}; known: {', '.join(SELECTORS.names())}")
    return cfg, raw


# -- the grid ---------------------------------------------------------------------------------------


def takes_seed(spec: str | Mapping[str, Any]) -> bool:
    """Whether a selector spec's implementation has a ``seed`` option (so results vary by seed)."""
    from iclcls.select import SELECTORS

    name = spec if isinstance(spec, str) else spec["name"]
    factory = SELECTORS._items[name]
    return "seed" in inspect.signature(factory).parameters


@dataclass(frozen=True)
class StudyPoint:
    select: str  # display name
    shots: int
    seed: int
    spec: Any  # the selector spec with the seed applied (when it takes one)
    run_seed: int  # the seed whose run gives this point's result (= seed unless deterministic)

    @property
    def run(self) -> str:
        return f"{self.select}_shots-{self.shots}_seed-{self.run_seed}"


def study_points(opts: StudyOptions) -> list[StudyPoint]:
    """Every (selector, shots, seed); deterministic selectors point at their first seed's run."""
    out = []
    for name, spec in opts.selectors.items():
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        seeded = takes_seed(spec)
        fixed = name in opts.deterministic if opts.deterministic is not None else not seeded
        for k in opts.shots:
            for s in opts.seeds:
                run_seed = opts.seeds[0] if fixed else s
                out.append(StudyPoint(name, k, s, {**spec, "seed": run_seed} if seeded else spec, run_seed))
    return out


# -- counting what the LM is asked ------------------------------------------------------------------


# -- running --------------------------------------------------------------------------------------------


USAGE_KEYS = ("calls", "requests", "prompt_tokens", "prefill_tokens", "examples")


def run_point(
    cfg: EvalConfig,
    out_dir: Path,
    *,
    opts: StudyOptions,
    lm_cache: dict[str, Any],
    force: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """One run of the experiment core on the study's query subset; returns its metrics plus LM usage
    per query (kept in ``study_point.json``, chunk by chunk, so a resumed run counts on)."""
    usage_path = out_dir / USAGE
    if force:
        usage_path.unlink(missing_ok=True)
    saved = read_json(usage_path) if usage_path.is_file() else {}
    resuming = (out_dir / PARTIAL).exists()
    base = {k: int(saved.get(k, 0)) if resuming else 0 for k in USAGE_KEYS}
    state = {"finished": False, **base}
    counter: CountingLM | None = None

    def prepared(prep: Prepared, examples: list[Example]) -> dict[str, Any]:
        nonlocal counter
        lm = getattr(prep.classifier, "lm_", None)
        counter = lm if isinstance(lm, CountingLM) else None
        if counter is not None:
            counter.reset()  # what fitting asked the LM is not the queries' cost
        return {"study_queries": len(examples), "selector_info": _selector_info(prep.classifier)}

    def on_chunk(idx: list[int]) -> None:
        state["examples"] += len(idx)
        if counter is not None:
            for k, v in counter.usage().items():
                state[k] = base[k] + v
        atomic_write_json(usage_path, state)

    res = run_experiment(cfg, out_dir, queries=opts.queries, query_seed=opts.query_seed, force=force, on_chunk=on_chunk,
                         on_prepared=prepared, lm_cache=lm_cache, show_progress=show_progress, what="study config")
    if res.info.get("rescored_only"):
        state = saved
    else:
        state["finished"] = True
        atomic_write_json(usage_path, state)
    return {**res.metrics, **_per_query(state), **_demos(res.records)}


def _demos(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Demonstrations actually in the prompts (DPP may stop early; budgets may trim)."""
    return {"demos_per_query": float(np.mean([len(r.get("demonstrations") or []) for r in records])) if records else 0.0}


def _selector_info(clf: Any) -> dict[str, Any]:
    sel = getattr(clf, "selector_", None)
    info = {}
    for attr in ("fit_info_", "train_stats_"):
        if sel is not None and getattr(sel, attr, None):
            info.update(getattr(sel, attr))
    return info


def _per_query(state: Mapping[str, Any]) -> dict[str, float]:
    n = max(int(state.get("examples", 0)), 1)
    if not state.get("requests"):
        return {"lm_calls_per_query": 0.0, "prompt_tokens_per_query": 0.0, "prefill_tokens_per_query": 0.0}
    return {
        "lm_calls_per_query": state["requests"] / n,
        "prompt_tokens_per_query": state["prompt_tokens"] / n,
        "prefill_tokens_per_query": state["prefill_tokens"] / n,
    }


@dataclass
class StudyResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    reference: dict[str, Any] | None


def _point_config(raw: Mapping[str, Any], overrides: Mapping[str, Any], source: str) -> EvalConfig:
    base = {k: v for k, v in raw.items() if k != "study"}
    return parse(EvalConfig, apply_overrides(base, overrides), source)


def run_study(
    config: str | Path,
    out_dir: str | Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    force: bool = False,
    show_progress: bool = True,
    command: str | None = None,
    lm: Any = None,
) -> StudyResult:
    """Run (or resume) every grid point of a study config and write its report.

    ``lm``: an LM object to use for ``classifier.lm`` instead of loading it (one model for all runs).
    """
    from iclcls.lm import get_lm

    cfg, raw = load_study_config(config, overrides=overrides)
    opts = cfg.study
    out = Path(out_dir)
    name = cfg.eval.name or Path(config).stem
    points = study_points(opts)
    runs: dict[str, StudyPoint] = {}
    # The first seed's full grid first, so an interrupted study already compares every selector.
    order = {name: i for i, name in enumerate(opts.selectors)}
    for p in sorted(points, key=lambda p: (opts.seeds.index(p.run_seed), p.shots, order[p.select])):
        runs.setdefault(p.run, p)
    cfgs = {
        run: _point_config(raw, {"classifier.select": p.spec, "classifier.shots": p.shots}, f"{config} [{run}]")
        for run, p in runs.items()
    }
    lm_cache: dict[str, Any] = {}
    spec = cfg.classifier.lm
    if isinstance(spec, str):
        lm_cache[spec] = CountingLM(lm if lm is not None else get_lm(spec))
    results: dict[str, dict[str, Any]] = {}
    for i, run in enumerate(runs, 1):
        if show_progress:
            print(f"[study {i}/{len(runs)}] {run}", flush=True)
        results[run] = run_point(cfgs[run], out / "runs" / run, opts=opts, lm_cache=lm_cache, force=force,
                                 show_progress=show_progress)
    reference = None
    if opts.retriever_reference:
        ref_cfg = _point_config(raw, {"classifier.rank": "retriever", "classifier.select": None, "classifier.shots": 0},
                                f"{config} [retriever]")
        reference = run_point(ref_cfg, out / "runs" / "retriever_only", opts=opts, lm_cache=lm_cache, force=force,
                              show_progress=False)
    rows = []
    for p in points:
        m = results[p.run]
        rows.append({
            "select": p.select, "shots": p.shots, "seed": p.seed, "accuracy": m["accuracy"], "n": int(m.get("n", 0)),
            "deterministic": _is_fixed(p, opts),
            "run": p.run,
            **{k: m[k] for k in ("lm_calls_per_query", "prompt_tokens_per_query", "prefill_tokens_per_query",
                                 "seconds_per_example", "demos_per_query", "macro_f1") if k in m},
        })
    summary = summarise(rows)
    atomic_write_json(out / "metrics.json", rows)
    atomic_write_json(out / "summary.json", {"name": name, "summary": summary, "retriever_reference": reference,
                                             "queries": rows[0]["n"] if rows else 0})
    study_report(out, name=name, cfg=cfg, rows=rows, summary=summary, reference=reference, command=command)
    return StudyResult(out, rows, summary, reference)


def _is_fixed(p: StudyPoint, opts: StudyOptions) -> bool:
    if opts.deterministic is not None:
        return p.select in opts.deterministic
    return not takes_seed(p.spec)


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and (population) standard deviation over seeds per selector and shots, with costs."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["select"], r["shots"]), []).append(r)
    out = []
    for (sel, k), rs in groups.items():
        acc = np.array([r["accuracy"] for r in rs], dtype=np.float64)
        runs = {r["run"]: r for r in rs}
        distinct = list(runs.values())

        def mean(key: str, distinct: list[dict[str, Any]] = distinct) -> float | None:
            vals = [r[key] for r in distinct if key in r]
            return float(np.mean(vals)) if vals else None

        out.append({
            "select": sel, "shots": k, "seeds": len(rs), "runs": len(distinct),
            "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
            "deterministic": all(r["deterministic"] for r in rs),
            "lm_calls_per_query": mean("lm_calls_per_query"),
            "prompt_tokens_per_query": mean("prompt_tokens_per_query"),
            "prefill_tokens_per_query": mean("prefill_tokens_per_query"),
            "seconds_per_query": mean("seconds_per_example"),
            "demos_per_query": mean("demos_per_query"),
        })
    return out


# -- the report ------------------------------------------------------------------------------------------


def plot_study(summary: Sequence[Mapping[str, Any]], path: Path, *, reference: float | None = None) -> Path | None:
    """Accuracy (mean +- std over seeds) against shots, one line per selector."""
    if not summary:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    selectors = list(dict.fromkeys(s["select"] for s in summary))
    for sel in selectors:
        pts = sorted((s for s in summary if s["select"] == sel), key=lambda s: s["shots"])
        ax.errorbar([s["shots"] for s in pts], [100 * s["accuracy_mean"] for s in pts],
                    yerr=[100 * s["accuracy_std"] for s in pts], marker="o", capsize=3, label=sel)
    if reference is not None:
        ax.axhline(100 * reference, color="grey", linestyle="--", linewidth=1, label="retriever alone")
    shots = sorted({s["shots"] for s in summary})
    ax.set_xticks(shots)
    ax.set_xlabel("demonstrations (shots)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("accuracy against shots (mean ± std over seeds)", fontsize=10)
    return save_png(fig, path)


def _pct(mean: float, std: float, fixed: bool) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" + (" †" if fixed else "")


def _num(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def study_report(
    out_dir: Path,
    *,
    name: str,
    cfg: StudyConfig,
    rows: Sequence[Mapping[str, Any]],
    summary: Sequence[Mapping[str, Any]],
    reference: Mapping[str, Any] | None,
    command: str | None = None,
) -> Path:
    opts = cfg.study
    shots = sorted({s["shots"] for s in summary})
    selectors = list(dict.fromkeys(s["select"] for s in summary))
    by = {(s["select"], s["shots"]): s for s in summary}
    n = rows[0]["n"] if rows else 0
    c = cfg.classifier
    parts = [f"# Demonstration selection study: {name}\n"]
    parts.append(
        f"Data: `{cfg.data.benchmark or cfg.data.train}`, {cfg.eval.split} split"
        + (f" (a seeded subset of {cfg.data.test_size})" if cfg.data.test_size else "")
        + (f", {opts.queries} queries drawn from it with seed {opts.query_seed}" if opts.queries else "")
        + f"; n = {n} per run. Fixed: LM `{c.lm}`, shortlist `{c.shortlist}` k={c.shortlist_k}, "
        f"rank `{c.rank}`, prompt `{c.prompt}`. Varied: selector × shots × seed "
        f"(seeds {opts.seeds}).\n"
    )
    header = ["selector"] + [f"{k} shots" for k in shots]
    table = [[sel] + [_pct(by[(sel, k)]["accuracy_mean"], by[(sel, k)]["accuracy_std"], by[(sel, k)]["deterministic"])
                      if (sel, k) in by else "–" for k in shots] for sel in selectors]
    if reference is not None:
        table.append(["retriever alone (no LM)"] + [f"{100 * reference['accuracy']:.2f}"] * len(shots))
    parts.append("## Accuracy (%), mean ± std over seeds\n\n" + markdown_table(header, table))
    fixed = [sel for sel in selectors if all(by[(sel, k)]["deterministic"] for k in shots if (sel, k) in by)]
    if fixed:
        parts.append(
            f"† deterministic: {', '.join(fixed)} select the same demonstrations for every seed, so they ran once "
            "and their std over seeds is 0 by construction (not a measured spread).\n"
        )
    p = figure(plot_study, summary, out_dir / "accuracy_vs_shots.png",
               reference=reference["accuracy"] if reference else None, what="accuracy_vs_shots.png")
    if p:
        parts.append(f"![accuracy against shots]({p.name})\n")
    cost = [[s["select"], s["shots"], _num(s["demos_per_query"]), _num(s["lm_calls_per_query"], 2),
             _num(s["prompt_tokens_per_query"]), _num(s["prefill_tokens_per_query"]), _num(s["seconds_per_query"], 2)]
            for s in summary]
    parts.append(
        "## Cost per query\n\n"
        + markdown_table(["selector", "shots", "demos in prompt", "LM requests", "prompt tokens", "prefilled tokens",
                          "seconds"], cost)
        + "\nPrefilled tokens count a shared demonstrations prefix once per run (the LM keeps its KV cache); "
        "seconds are wall-clock on this machine (shared with other work).\n"
    )
    if cfg.eval.notes:
        parts.append(f"## Notes\n\n{cfg.eval.notes.strip()}\n")
    links = sorted({r["run"] for r in rows})
    parts.append("## Runs\n\n" + "\n".join(f"- [{r}](runs/{r}/report.md)" for r in links) + "\n")
    if command:
        parts.append(f"## Command\n\n```\n{command}\n```\n")
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path
