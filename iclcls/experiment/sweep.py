"""``iclcls eval``: one experiment config into a run directory, or a sweep over a grid of overrides.

One run is :func:`iclcls.experiment.run_experiment` (the run directory, checkpoint/resume and
re-scoring are described there); :func:`run_sweep` runs a grid of overrides and writes one
comparison report.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from iclcls.errors import ConfigError
from iclcls.experiment import RunResult, primary_metric, run_experiment
from iclcls.experiment.config import EvalConfig, apply_overrides, parse
from iclcls.io import atomic_write_json


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")[:40] or "x"


def grid_points(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cross product of the axes, in order (the last axis varies fastest)."""
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def run_name(point: Mapping[str, Any]) -> str:
    return "_".join(f"{k.split('.')[-1]}-{_slug(v)}" for k, v in point.items())


def run_sweep(
    raw: Mapping[str, Any],
    axes: Mapping[str, Sequence[Any]],
    out_dir: str | Path,
    *,
    source: str | Path = "<config>",
    force: bool = False,
    command: str | None = None,
    show_progress: bool = True,
    on_run: Callable[[dict[str, Any], RunResult], None] | None = None,
) -> list[tuple[dict[str, Any], RunResult]]:
    """Run every point of the grid (``raw`` is the config mapping, before validation) into
    ``out_dir/<axis-value_...>`` and write ``out_dir/sweep.json`` and ``out_dir/report.md``.

    Every point is validated before any runs, so a bad value fails fast. Finished points are
    re-scored, not re-run, so an interrupted sweep resumes where it stopped.
    """
    from iclcls.experiment.report import report_safely, sweep_report

    if not axes:
        raise ConfigError("a sweep needs at least one axis, e.g. shots=2,4,8")
    out = Path(out_dir)
    base_name = raw.get("eval", {}).get("name") or Path(source).stem
    points = grid_points(axes)
    cfgs: list[EvalConfig] = []
    for point in points:
        cfg = parse(EvalConfig, apply_overrides(raw, point), f"{source} [{run_name(point)}]")
        cfg.eval.name = f"{base_name}/{run_name(point)}"
        cfgs.append(cfg)
    lm_cache: dict[str, Any] = {}
    results = []
    for point, cfg in zip(points, cfgs):
        res = run_experiment(cfg, out / run_name(point), force=force, command=command, lm_cache=lm_cache, show_progress=show_progress)
        results.append((point, res))
        if on_run is not None:
            on_run(point, res)
    rows = [{"run": run_name(p), **p, **r.metrics} for p, r in results]
    primary = primary_metric(cfgs[0], any(r.info.get("multi_label") for _, r in results))
    atomic_write_json(out / "sweep.json", {"axes": {k: list(v) for k, v in axes.items()}, "primary": primary, "rows": rows})
    report_safely(sweep_report, out, name=base_name, rows=rows, axes=list(axes), primary=primary, ks=cfgs[0].eval.ks, command=command)
    return results
