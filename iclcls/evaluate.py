"""Run an experiment config: fit, predict with checkpoints, score, write a run directory.

A run directory holds::

    config.yaml                 the validated config with every default filled in
    run.json                    config hash, command, sizes, timings, tuned values, effective classifier params
    tuned.json                  what fit/tune learned on validation (a resumed run does not re-tune)
    checkpoint.json             the config hash of the predictions in progress
    predictions.partial.jsonl   finished examples, appended per chunk (flushed and fsync'd) while running
    predictions.jsonl           every example, in order, written atomically at the end
    metrics.json                flat metrics (accuracy, macro_f1, rp@10, r@50, ...)
    report.md, *.png            the report (iclcls.report)

A crash or Ctrl-C loses at most the chunk in flight: re-running the same config resumes
from the partial file. A run directory belongs to one config (its hash): a different config
is refused unless ``force=True``, which discards the old files. Re-running a finished run
re-scores its predictions and rewrites the report without fitting or predicting.

Reusable pieces: :func:`prepare` (splits + fitted classifier), :func:`predict_with_checkpoint`,
:func:`prediction_record`, :func:`score_records`, :func:`write_run` and :func:`run_eval`;
:func:`run_sweep` runs a grid of overrides and writes one comparison report.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from iclcls.config import ClassifierConfig, DataConfig, EvalConfig, EvalOptions, load_yaml, parse
from iclcls.io import atomic_write_json, atomic_write_text, read_json
from iclcls.metrics import compute_metrics
from iclcls.types import Example, Prediction

PARTIAL = "predictions.partial.jsonl"
CHECKPOINT = "checkpoint.json"
PREDICTIONS = "predictions.jsonl"
TUNED = "tuned.json"
RUN = "run.json"
METRICS = "metrics.json"
RUN_FILES = (PARTIAL, CHECKPOINT, PREDICTIONS, TUNED, RUN, METRICS, "config.yaml", "report.md")

ChunkCallback = Callable[[list[int]], None]


class ResumeError(RuntimeError):
    """The run directory holds state that does not belong to this config (or is damaged)."""


# -- configs: overrides, sweeps, hashing ------------------------------------------------------

_SECTIONS: dict[str, type] = {"classifier": ClassifierConfig, "data": DataConfig, "eval": EvalOptions}


def _qualify(key: str) -> str:
    """``shots`` -> ``classifier.shots``, ``shortlist.prior_a`` -> ``classifier.shortlist.prior_a``;
    keys that start with a section (``data.test_size``) pass through."""
    head, dot, rest = key.partition(".")
    if head in _SECTIONS:
        return key
    for section, model in _SECTIONS.items():
        if head in model.model_fields:
            return f"{section}.{key}"
    known = sorted(f for m in _SECTIONS.values() for f in m.model_fields)
    raise ValueError(f"unknown option {key!r}: use a dotted path (classifier.shots) or one of: {', '.join(known)}")


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``a.b.c``; a stage given by name becomes ``{"name": ...}``."""
    parts = _qualify(dotted).split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif isinstance(nxt, str) and i >= 1:  # e.g. classifier.select: knn -> {"name": "knn"}
            nxt = node[part] = {"name": nxt}
        elif not isinstance(nxt, dict):
            raise ValueError(f"cannot set {dotted}: {'.'.join(parts[: i + 1])} is {nxt!r}, not a mapping")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``raw`` with dotted-key (or short-key) overrides applied."""
    out = copy.deepcopy(dict(raw))
    for key, value in overrides.items():
        set_path(out, key, value)
    return out


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def parse_assignments(items: Sequence[str], *, grid: bool = False) -> dict[str, Any]:
    """``["shots=4", "select=knn"]`` -> ``{"shots": 4, "select": "knn"}``.

    With ``grid``, values are comma-separated lists (``shots=2,4,8`` -> ``[2, 4, 8]``); each
    item is read as YAML, so numbers and booleans get their types.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        _qualify(key)
        if key in out:
            raise ValueError(f"option {key!r} is given twice")
        out[key] = [_scalar(v.strip()) for v in value.split(",")] if grid else _scalar(value.strip())
        if grid and not all(str(v) != "" for v in out[key]):
            raise ValueError(f"empty value in {item!r}")
    return out


def load_eval_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> EvalConfig:
    """Read and validate a config file, applying overrides first; errors name the file and field."""
    raw = load_yaml(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    cfg = parse(EvalConfig, raw, path)
    if cfg.eval.name is None:
        cfg.eval.name = Path(path).stem
    return cfg


def config_hash(cfg: EvalConfig) -> str:
    """What decides the predictions: data, classifier, and the split scored (not report options)."""
    key = {
        "data": cfg.data.model_dump(mode="json"),
        "classifier": cfg.classifier.model_dump(mode="json"),
        "split": cfg.eval.split,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# -- fitting ------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A fitted classifier, the examples to score, and what fitting did."""

    classifier: Any
    examples: list[Example]
    splits: Any
    info: dict[str, Any] = field(default_factory=dict)


def _resolve_priors(clf: Any, priors: Mapping[str, float] | None, benchmark: str) -> None:
    for key in ("shortlist", "select", "rank", "infer"):
        spec = getattr(clf, key)
        if isinstance(spec, Mapping) and spec.get("priors") == "benchmark":
            if not priors:
                raise ValueError(f"classifier.{key}.priors is 'benchmark' but {benchmark} ships no label priors")
            clf.set_params(**{key: {**spec, "priors": dict(priors)}})


def _params_for_report(clf: Any) -> dict[str, Any]:
    def show(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: (f"<{len(x)} label priors>" if k == "priors" and isinstance(x, Mapping) else show(x)) for k, x in v.items()}
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if isinstance(v, (list, tuple)):
            return [show(x) for x in v]
        return getattr(v, "name", type(v).__name__)

    return {k: show(v) for k, v in clf.get_params(deep=False).items()}


def prepare(
    cfg: EvalConfig,
    *,
    tuned_path: str | Path | None = None,
    config_key: str | None = None,
    lm_cache: dict[str, Any] | None = None,
    show_progress: bool | None = None,
) -> Prepared:
    """Load the splits, build and fit the classifier, tune it on validation.

    With ``tuned_path`` the tuned state is saved there after tuning and, when that file
    already holds the state for ``config_key``, restored instead of tuning again.
    ``lm_cache`` (spec -> LM) shares loaded LMs across the runs of a sweep.
    """
    from iclcls.experiment import load_splits

    splits = load_splits(cfg.data)
    examples = splits.validation if cfg.eval.split == "validation" else splits.test
    dropped = sum(1 for ex in examples if not ex.labels)
    examples = [ex for ex in examples if ex.labels]
    if not examples:
        raise ValueError(f"{splits.name}: the {cfg.eval.split} split has no labelled examples to score")
    clf = cfg.classifier.build()
    if show_progress is False:
        clf.set_params(show_progress=False)
    _resolve_priors(clf, splits.priors, splits.name)
    if "multi_label" not in cfg.classifier.model_fields_set and splits.multi_label:
        clf.set_params(multi_label=True)
    spec = clf.lm
    if lm_cache is not None and isinstance(spec, str) and spec in lm_cache:
        clf.set_params(lm=lm_cache[spec])
    validation = splits.validation if cfg.classifier.tune and cfg.eval.split == "test" else []
    saved = None
    if tuned_path is not None and Path(tuned_path).is_file():
        saved = read_json(tuned_path)
        if saved.get("config_hash") != config_key:
            saved = None
    t0 = time.time()
    clf.fit(splits.train, labels=splits.labels, validation=None if saved else (validation or None))
    if saved:
        clf.tuned_ = dict(saved.get("tuned", {}))
        if hasattr(clf.ranker_, "load_tuned_state"):
            clf.ranker_.load_tuned_state(saved.get("ranker_state", {}))
    elif tuned_path is not None:
        atomic_write_json(
            tuned_path,
            {
                "config_hash": config_key,
                "tuned": clf.tuned_,
                "ranker_state": clf.ranker_.tuned_state() if hasattr(clf.ranker_, "tuned_state") else {},
            },
        )
    fit_seconds = time.time() - t0
    if lm_cache is not None and isinstance(spec, str) and getattr(clf, "lm_", None) is not None:
        lm_cache[spec] = clf.lm_
    info = {
        "benchmark": splits.name,
        "split": cfg.eval.split,
        "sizes": {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test), "labels": len(splits.labels)},
        "scored": len(examples),
        "dropped_unlabelled": dropped,
        "multi_label": bool(clf.multi_label),
        "tuned": dict(clf.tuned_),
        "tuned_on": 0 if saved else len(validation),
        "tuned_restored": bool(saved),
        "fit_seconds": round(fit_seconds, 2),
        "lm": getattr(getattr(clf, "lm_", None), "name", None),
        "embedder": getattr(clf.embedder_, "name", None),
        "classifier_params": _params_for_report(clf),
    }
    return Prepared(clf, examples, splits, info)


# -- predicting with a checkpoint ----------------------------------------------------------------


def prediction_record(index: int, example: Example, pred: Prediction, decided: Sequence[str]) -> dict[str, Any]:
    """One line of predictions.jsonl: the example, its gold labels, the decision, and the prediction
    (ranked labels, scores, candidates, demonstrations, trace)."""
    rec: dict[str, Any] = {"index": index, "id": example.id, "text": example.text, "gold": list(example.labels)}
    rec["predicted"] = list(decided)
    rec["correct"] = bool(pred.labels) and pred.labels[0] in set(example.labels)
    rec.update(pred.to_dict())
    return rec


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class PredictionCheckpoint:
    """Finished examples of one run, appended to ``predictions.partial.jsonl`` as they come."""

    def __init__(self, out_dir: str | Path, config_key: str, *, n_examples: int, force: bool = False) -> None:
        self.dir = Path(out_dir)
        self.partial = self.dir / PARTIAL
        self.meta = self.dir / CHECKPOINT
        self.key = config_key
        self.done: dict[int, dict[str, Any]] = {}
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            meta = read_json(self.meta) if self.meta.is_file() else {}
            if meta.get("config_hash") != config_key or meta.get("n_examples") != n_examples:
                if not force:
                    raise ResumeError(
                        f"{self.partial} holds predictions of a different config "
                        f"(hash {meta.get('config_hash')}, now {config_key}): re-run with --force to discard "
                        "them, or choose another output directory"
                    )
                self.partial.unlink()
            else:
                self.done = self._read()
        atomic_write_json(self.meta, {"config_hash": config_key, "n_examples": n_examples})

    def _read(self) -> dict[int, dict[str, Any]]:
        data = self.partial.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line torn by a hard kill: drop it so appends start on a fresh line
            with open(self.partial, "r+b") as f:
                f.truncate(end)
        done = {}
        for lineno, line in enumerate(data[:end].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                done[int(rec["index"])] = rec
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ResumeError(f"{self.partial}, line {lineno}: not a prediction record; delete the file or use --force") from None
        return done

    def check(self, examples: Sequence[Example]) -> None:
        for i, rec in self.done.items():
            if i >= len(examples) or rec.get("text") != examples[i].text:
                raise ResumeError(f"{self.partial}: example {i} differs from the data now loaded; use --force to start over")

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.partial, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.done[int(r["index"])] = r

    def finish(self, n_examples: int) -> list[dict[str, Any]]:
        """Write predictions.jsonl atomically (in index order) and remove the checkpoint files."""
        missing = [i for i in range(n_examples) if i not in self.done]
        if missing:
            raise ResumeError(f"cannot finish: {len(missing)} examples have no prediction (first: {missing[0]})")
        records = [self.done[i] for i in range(n_examples)]
        atomic_write_text(self.dir / PREDICTIONS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        _fsync_dir(self.dir)
        self.partial.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)
        return records


def predict_with_checkpoint(
    classifier: Any,
    examples: Sequence[Example],
    *,
    out_dir: str | Path,
    config_key: str,
    chunk_size: int | None = None,
    force: bool = False,
    on_chunk: ChunkCallback | None = None,
    show_progress: bool = True,
) -> tuple[list[dict[str, Any]], int]:
    """Predict every example, skipping those already in the partial file; return (records, computed now).

    Each chunk's records are appended and fsync'd before ``on_chunk(indices)`` is called, so
    whatever happens after (an exception, Ctrl-C, a kill) the chunk is kept.
    """
    ckpt = PredictionCheckpoint(out_dir, config_key, n_examples=len(examples), force=force)
    ckpt.check(examples)
    todo = [i for i in range(len(examples)) if i not in ckpt.done]
    step = chunk_size or getattr(classifier, "batch_size", 16) or 16
    computed = 0
    with tqdm(total=len(examples), initial=len(examples) - len(todo), desc="eval", unit="ex", disable=not show_progress) as bar:
        for s in range(0, len(todo), step):
            idx = todo[s : s + step]
            t0 = time.time()
            preds = classifier.predict([examples[i] for i in idx], show_progress=False)
            per = (time.time() - t0) / len(idx)
            recs = []
            for i, p in zip(idx, preds):
                rec = prediction_record(i, examples[i], p, classifier.decide(p))
                rec["seconds"] = round(per, 4)
                recs.append(rec)
            ckpt.append(recs)
            computed += len(idx)
            bar.update(len(idx))
            if on_chunk is not None:
                on_chunk(idx)
    return ckpt.finish(len(examples)), computed


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Records of a predictions.jsonl, with errors naming the line."""
    path = Path(path)
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: invalid JSON: {e.msg}") from None
    return out


# -- scoring and writing ------------------------------------------------------------------------


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
) -> Path:
    """metrics.json, config.yaml, run.json and report.md (+ plots), each written atomically."""
    from iclcls.report import run_report

    out = Path(out_dir)
    resolved = cfg.model_dump(mode="json")
    atomic_write_json(out / METRICS, dict(metrics))
    atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
    atomic_write_json(out / RUN, {"config_hash": config_hash(cfg), "command": command, **info})
    return run_report(
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


def run_eval(
    cfg: EvalConfig,
    out_dir: str | Path,
    *,
    force: bool = False,
    command: str | None = None,
    on_chunk: ChunkCallback | None = None,
    lm_cache: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> RunResult:
    """Run one experiment into ``out_dir`` (resuming or re-scoring what is already there)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = config_hash(cfg)
    previous = read_json(out / RUN) if (out / RUN).is_file() else None
    if previous is not None and previous.get("config_hash") != key:
        if not force:
            raise ResumeError(
                f"{out} holds a run of a different config (hash {previous.get('config_hash')}, now {key}): "
                "re-run with --force to replace it, or choose another output directory"
            )
        _clear(out)
        previous = None
    elif force:
        _clear(out)
        previous = None
    if previous is not None and (out / PREDICTIONS).is_file() and not (out / PARTIAL).exists():
        records = read_predictions(out / PREDICTIONS)
        info = {k: v for k, v in previous.items() if k not in ("config_hash", "command")}
        info["rescored_only"] = True
        metrics = score_records(records, ks=cfg.eval.ks)
        write_run(out, cfg=cfg, records=records, metrics=metrics, info=info, command=command or previous.get("command"))
        return RunResult(out, metrics, records, info, computed=0)
    # Refuse a foreign checkpoint before spending time on fitting.
    if (out / PARTIAL).exists():
        meta = read_json(out / CHECKPOINT) if (out / CHECKPOINT).is_file() else {}
        if meta.get("config_hash") != key and not force:
            raise ResumeError(
                f"{out / PARTIAL} holds predictions of a different config (hash {meta.get('config_hash')}, "
                f"now {key}): re-run with --force to discard them, or choose another output directory"
            )
    prep = prepare(cfg, tuned_path=out / TUNED, config_key=key, lm_cache=lm_cache, show_progress=None if show_progress else False)
    t0 = time.time()
    records, computed = predict_with_checkpoint(
        prep.classifier,
        prep.examples,
        out_dir=out,
        config_key=key,
        chunk_size=cfg.eval.checkpoint_every,
        force=force,
        on_chunk=on_chunk,
        show_progress=show_progress,
    )
    info = dict(prep.info)
    info["predict_seconds_this_call"] = round(time.time() - t0, 2)
    info["resumed_examples"] = len(records) - computed
    metrics = score_records(records, ks=cfg.eval.ks)
    write_run(out, cfg=cfg, records=records, metrics=metrics, info=info, command=command)
    return RunResult(out, metrics, records, info, computed)


# -- sweeps ---------------------------------------------------------------------------------------


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
    from iclcls.report import sweep_report

    if not axes:
        raise ValueError("a sweep needs at least one axis, e.g. shots=2,4,8")
    out = Path(out_dir)
    base_name = raw.get("eval", {}).get("name") or Path(source).stem
    points = grid_points(axes)
    cfgs = []
    for point in points:
        cfg = parse(EvalConfig, apply_overrides(raw, point), f"{source} [{run_name(point)}]")
        cfg.eval.name = f"{base_name}/{run_name(point)}"
        cfgs.append(cfg)
    lm_cache: dict[str, Any] = {}
    results = []
    for point, cfg in zip(points, cfgs):
        res = run_eval(cfg, out / run_name(point), force=force, command=command, lm_cache=lm_cache, show_progress=show_progress)
        results.append((point, res))
        if on_run is not None:
            on_run(point, res)
    rows = [{"run": run_name(p), **p, **r.metrics} for p, r in results]
    multi = any(r.info.get("multi_label") for _, r in results)
    primary = primary_metric(cfgs[0], multi)
    atomic_write_json(out / "sweep.json", {"axes": {k: list(v) for k, v in axes.items()}, "primary": primary, "rows": rows})
    sweep_report(out, name=base_name, rows=rows, axes=list(axes), primary=primary, ks=cfgs[0].eval.ks, command=command)
    return results
