"""One experiment run: fit, predict with a checkpoint, score, and write a run directory.

A run directory holds::

    config.yaml                 the validated config with every default filled in
    run.json                    the run's key, command, sizes, timings, tuned values, effective classifier params
    tuned.json                  what fit/tune learned on validation (a resumed run does not re-tune)
    checkpoint.json             the key of the predictions in progress
    predictions.partial.jsonl   finished examples, appended per chunk (flushed and fsync'd) while running
    predictions.jsonl           every example, in order, written atomically at the end
    metrics.json                flat metrics (accuracy, macro_f1, rp@10, r@50, ...)
    report.md, *.png            the report (iclcls.experiment.report)

A run directory belongs to one key (the config hash, and the query subset when one is
drawn): a different one is refused unless ``force=True``, which discards the old files.
Re-running an interrupted run resumes from its checkpoint; re-running a finished run
re-scores its predictions and rewrites the report without fitting or predicting; a run
whose predictions.jsonl was deleted predicts again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from iclcls.experiment.checkpoint import PARTIAL, PREDICTIONS, ChunkCallback, PredictionCheckpoint, ResumeError, read_predictions
from iclcls.experiment.config import EvalConfig, config_hash
from iclcls.experiment.fit import Prepared, prepare
from iclcls.experiment.splits import subset
from iclcls.io import atomic_write_json, atomic_write_text, read_json
from iclcls.metrics import compute_metrics
from iclcls.types import Example

TUNED = "tuned.json"
RUN = "run.json"
METRICS = "metrics.json"
RUN_FILES = (PARTIAL, "checkpoint.json", PREDICTIONS, TUNED, RUN, METRICS, "config.yaml", "report.md")


def run_key(cfg: EvalConfig, queries: int | None = None, query_seed: int = 0) -> str:
    """The config hash, and the seeded query subset when one is drawn from the scored split."""
    if queries is None:
        return config_hash(cfg)
    return hashlib.sha256(json.dumps([config_hash(cfg), queries, query_seed]).encode()).hexdigest()[:16]


def score_records(records: Sequence[Mapping[str, Any]], *, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Flat metrics of prediction records (gold, ranked ``labels``, decided ``predicted``)."""
    m = compute_metrics([r["gold"] for r in records], [r["labels"] for r in records], [r["predicted"] for r in records], ks=ks)
    secs = [r["seconds"] for r in records if "seconds" in r]
    if secs:
        m["seconds_per_example"] = float(sum(secs) / len(secs))
    tokens = [r.get("prompt_tokens", 0) for r in records]
    if any(tokens):
        m["prompt_tokens_mean"] = float(sum(tokens) / len(tokens))
    return m


def primary_metric(cfg: EvalConfig, multi_label: bool) -> str:
    return cfg.eval.primary or ("micro_f1" if multi_label else "accuracy")


def write_run(
    out_dir: str | Path,
    *,
    cfg: EvalConfig,
    records: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, float],
    info: Mapping[str, Any],
    command: str | None = None,
    key: str | None = None,
) -> Path | None:
    """metrics.json, config.yaml, run.json and report.md (+ plots), each written atomically; the
    report's path, or None when the report failed (a warning: the results are written first)."""
    from iclcls.experiment.report import report_safely, run_report

    out = Path(out_dir)
    resolved = cfg.model_dump(mode="json")
    atomic_write_json(out / METRICS, dict(metrics))
    atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
    atomic_write_json(out / RUN, {"config_hash": key or config_hash(cfg), "command": command, **info})
    return report_safely(  # the results above are written; a failed report is only a warning
        run_report,
        out,
        name=cfg.eval.name or out.name,
        metrics=metrics,
        records=records,
        config=resolved,
        info=info,
        ks=cfg.eval.ks,
        primary=primary_metric(cfg, bool(info.get("multi_label"))),
        references=[r.model_dump() for r in cfg.eval.references],
        per_class=cfg.eval.per_class,
        command=command,
        notes=cfg.eval.notes,
    )


@dataclass
class RunResult:
    out_dir: Path
    metrics: dict[str, float]
    records: list[dict[str, Any]]
    info: dict[str, Any]
    computed: int  # examples predicted by this call (the rest came from the checkpoint or a finished run)


def _clear(out: Path) -> None:
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for png in out.glob("*.png"):
        png.unlink()


def run_experiment(
    cfg: EvalConfig,
    out_dir: str | Path,
    *,
    queries: int | None = None,
    query_seed: int = 0,
    force: bool = False,
    command: str | None = None,
    on_chunk: ChunkCallback | None = None,
    on_prepared: Callable[[Prepared, list[Example]], Mapping[str, Any] | None] | None = None,
    lm_cache: dict[str, Any] | None = None,
    show_progress: bool = True,
    what: str = "config",
) -> RunResult:
    """Run one experiment into ``out_dir`` (resuming or re-scoring what is already there).

    ``queries``: score a seeded subset of that many examples of the split (``query_seed``).
    ``on_prepared(prepared, examples)`` runs after fitting, before predicting; what it returns
    is added to run.json. ``what`` names the config in the error that refuses a foreign run.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = run_key(cfg, queries, query_seed)
    previous = read_json(out / RUN) if (out / RUN).is_file() else None
    if force:
        _clear(out)
        previous = None
    elif previous is not None and previous.get("config_hash") != key:
        raise ResumeError(
            f"{out} holds a run of a different {what} (hash {previous.get('config_hash')}, now {key}): "
            "re-run with --force to replace it, or choose another output directory"
        )
    if previous is not None and (out / PREDICTIONS).is_file() and not (out / PARTIAL).exists():
        records = read_predictions(out / PREDICTIONS)
        info = {k: v for k, v in previous.items() if k not in ("config_hash", "command")} | {"rescored_only": True}
        metrics = score_records(records, ks=cfg.eval.ks)
        write_run(out, cfg=cfg, records=records, metrics=metrics, info=info, command=command or previous.get("command"), key=key)
        return RunResult(out, metrics, records, info, computed=0)
    checkpoint = PredictionCheckpoint(out, key, force=force)  # refuses a foreign checkpoint before fitting
    prep = prepare(cfg, tuned_path=out / TUNED, config_key=key, lm_cache=lm_cache, show_progress=None if show_progress else False)
    examples = subset(prep.examples, queries, query_seed)
    extra = on_prepared(prep, examples) if on_prepared is not None else None
    t0 = time.time()
    records, computed = checkpoint.predict(
        prep.classifier, examples, chunk_size=cfg.eval.checkpoint_every, on_chunk=on_chunk, show_progress=show_progress
    )
    info = {**prep.info, "predict_seconds_this_call": round(time.time() - t0, 2), "resumed_examples": len(records) - computed}
    info.update(extra or {})
    metrics = score_records(records, ks=cfg.eval.ks)
    write_run(out, cfg=cfg, records=records, metrics=metrics, info=info, command=command, key=key)
    return RunResult(out, metrics, records, info, computed)
