"""``iclcls compile``: a DSPy program's YAML config (data + the program's options), compiled
on the config's validation split and saved (the program itself: iclcls.programs.dspy)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from iclcls.experiment.config import DataConfig, load_yaml, parse
from iclcls.experiment.splits import load_splits
from iclcls.programs.dspy.compile import LMPool, ProgramOptions, build_program, compile_split, fit_retriever, optimize, save_compiled


class DSPyClassifierSection(BaseModel):
    """The ``classifier:`` section of a DSPy config: ``program: dspy_irera``, the compiled
    folder and the program's options."""

    model_config = ConfigDict(extra="allow")
    program: Literal["dspy_irera"] = "dspy_irera"
    compiled: str | None = None
    dspy: ProgramOptions = ProgramOptions()


class CompileConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # eval: and other sections belong to other commands
    data: DataConfig
    classifier: DSPyClassifierSection = DSPyClassifierSection()


def load_compile_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> CompileConfig:
    raw = load_yaml(path)
    for key, value in (overrides or {}).items():
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return parse(CompileConfig, raw, path)


def compile_program(cfg: CompileConfig, *, lms: LMPool | None = None, log: Any = print) -> tuple[Any, dict[str, Any]]:
    """Load the data, fit the retriever, compile on the validation split; (program, report)."""
    opts = cfg.classifier.dspy
    splits = load_splits(cfg.data)
    train, val = compile_split(splits.validation, opts.optimizer, fallback=splits.train)
    source = "validation" if any(ex.labels for ex in splits.validation) else "train"
    log(f"data: {splits.name}; compiling on {len(train) + len(val)} examples from the {source} split")
    retriever = fit_retriever(opts.retrieve, splits.train, splits.labels, priors=splits.priors)
    program = build_program(opts, retriever, lms=lms or LMPool(), cache=opts.optimizer.cache)
    task_lm = program.rank._lm.value if program.rank is not None else (program.infer._lm.value if program.infer is not None else None)
    compiled, report = optimize(program, opts.optimizer, train, val, task_lm=task_lm, log=log)
    report["benchmark"] = splits.name
    report["compile_split"] = source
    return compiled, report


def compile_from_config(
    config: str | Path | CompileConfig,
    out: str | Path | None = None,
    *,
    data_dir: str | None = None,
    lms: LMPool | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """``iclcls compile``: compile (``compile_program``) and save to ``out`` (default: classifier.compiled)."""
    cfg = config if isinstance(config, CompileConfig) else load_compile_config(config)
    if data_dir is not None:
        cfg.data.data_dir = str(data_dir)
    target = Path(out or cfg.classifier.compiled or "runs/dspy_program")
    compiled, report = compile_program(cfg, lms=lms, log=log)
    save_compiled(compiled, cfg.classifier.dspy, target, info={"report": report})
    log(f"compiled in {report['seconds']} s; demos {report['demos']}; weights {report['weights']}; saved to {target}")
    if report.get("decision"):
        log(f"decision: {report['decision']['why']}")
    return {"out": str(target), **report}
