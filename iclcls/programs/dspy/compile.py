"""Build, compile, save and load the IReRa DSPy program (``iclcls compile``'s YAML config: iclcls.experiment.compile).

A compiled program is a folder, data only (no pickle):

- ``config.json``: the program's options (steps, LM specs, retriever), the optimizer's
  report, DSPy's version;
- ``program.json``: DSPy's JSON state of the program (instructions and demonstrations of
  the Infer and Rank predictors), written by ``dspy.Module.save``;
- ``retriever/``: the fitted iclcls retriever (``ICLClassifier.save``).

Loading rebuilds the program skeleton from ``config.json``, the retriever from its state,
and loads ``program.json`` into it; the LMs come from the caller or, for local model
names, from the saved specs (a served endpoint is taken from a file only with ``trust``).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from iclcls.errors import ConfigError, DataError, UntrustedStateError
from iclcls.io import atomic_write_json, read_json

FORMAT = "iclcls-dspy-irera"
FORMAT_VERSION = 2  # 2: fusion weights and the compile decision in config.json


class RetrieveOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shortlist: str | dict[str, Any] = Field(default_factory=lambda: {"name": "label_retriever"})
    k: int = Field(default=50, ge=1)
    embedder: str | None = None


class StepOptions(BaseModel):
    """One LM step. ``lm``: an iclcls spec (``smollm2``, ``gemma3-270m``, ``vllm:NAME``) or
    ``served:MODEL@URL`` (an OpenAI-compatible vLLM server through ``dspy.LM``)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    lm: str = "smollm2"
    instructions: str | None = None
    chain_of_thought: bool = False
    max_tokens: int = Field(default=32, ge=1)


class InferOptions(StepOptions):
    max_guesses: int = Field(default=8, ge=1)
    weight: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="fusion weight of the guesses' candidates against the sentence's (0: Infer off); compiling picks it",
    )


class RankOptions(StepOptions):
    rank_k: int | None = Field(default=None, ge=1, description="candidates shown to the LM (default: all retrieved)")
    max_labels: int = Field(default=10, ge=1)
    constrain: bool = True
    weight: float = Field(
        default=0.5, ge=0.0, le=1.0, description="fusion weight of the LM's picks against retrieval order (0: Rank off); compiling picks it"
    )


class OptimizerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["one_se", "bootstrap_random_search", "mipro_light", "none"] = Field(
        default="one_se",
        description="one_se: zero-shot, then more demonstrations, and the fusion weights, each kept only when "
        "better beyond one standard error on all compile examples (iclcls.programs.dspy.select)",
    )
    demo_counts: list[int] = Field(default_factory=lambda: [0, 1, 2], description="one_se: demonstrations per step of each candidate")
    folds: int = Field(default=3, ge=1, description="one_se: cross-fitting folds (demonstrations never from the scored fold)")
    weight_grid: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], description="one_se: fusion weights tried")
    threads: int = Field(default=8, ge=1, description="one_se: sentences in flight (their generations are batched)")
    max_bootstrapped_demos: int = Field(default=2, ge=0)
    max_labeled_demos: int = Field(default=0, ge=0)
    num_candidate_programs: int = Field(default=10, ge=1)
    num_trials: int | None = Field(default=None, ge=1, description="mipro: trials (default: DSPy's for auto='light')")
    train_size: int | None = Field(default=None, ge=1, description="compile examples from the validation split")
    val_size: int | None = Field(default=None, ge=1, description="scoring examples from the validation split")
    seeds: list[int] | None = Field(
        default=None,
        description="bootstrap_random_search: only these candidate seeds (-3 zero-shot, -2 labelled demos only, "
        "-1 unshuffled bootstrap, 0.. random bootstraps); default all",
    )
    metric_k: int = Field(default=10, ge=1)
    seed: int = 0
    cache: bool = True


class ProgramOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    retrieve: RetrieveOptions = RetrieveOptions()
    infer: InferOptions = InferOptions()
    rank: RankOptions = RankOptions()
    optimizer: OptimizerOptions = OptimizerOptions()


# -- LMs -------------------------------------------------------------------------------------


class LMPool:
    """Loads each LM spec once (Infer and Rank on the same model share it)."""

    def __init__(self, backends: Mapping[str, Any] | None = None) -> None:
        self._lms: dict[tuple[str, int, bool], Any] = {}
        self._backends: dict[str, Any] = dict(backends or {})  # spec -> an already loaded iclcls LM

    def get(self, spec: str, *, max_tokens: int, cache: bool = False) -> Any:
        key = (spec, max_tokens, cache)
        if key not in self._lms:
            from iclcls.programs.dspy.lm import dspy_lm, served_lm

            if spec.startswith("served:"):
                model, _, url = spec[len("served:") :].partition("@")
                if not model or not url:
                    raise ConfigError(f"served LM spec must be 'served:MODEL@URL', got {spec!r}")
                self._lms[key] = served_lm(url, model, max_tokens=max_tokens, cache=cache)
            else:
                if spec not in self._backends:
                    from iclcls.lm import get_lm

                    self._backends[spec] = get_lm(spec)
                self._lms[key] = dspy_lm(self._backends[spec], max_tokens=max_tokens, cache=cache)
        return self._lms[key]


# -- building ----------------------------------------------------------------------------------


def resolve_priors(spec: Any, priors: Mapping[str, float] | None, where: str) -> Any:
    if isinstance(spec, Mapping) and spec.get("priors") == "benchmark":
        if not priors:
            raise ConfigError(f"{where}.priors is 'benchmark' but the benchmark ships no label priors")
        return {**spec, "priors": dict(priors)}
    return spec


def fit_retriever(opts: RetrieveOptions, train: Sequence[Any], labels: Any, *, priors: Mapping[str, float] | None = None) -> Any:
    """An iclcls classifier used only for its embedder and shortlister (no LM)."""
    from iclcls.classifier import ICLClassifier

    shortlist = resolve_priors(opts.shortlist, priors, "classifier.dspy.retrieve.shortlist")
    clf = ICLClassifier(lm=None, embedder=opts.embedder, shortlist=shortlist, shortlist_k=opts.k, select=None, rank="retriever", show_progress=False)
    return clf.fit(list(train), labels=labels)


def build_program(opts: ProgramOptions, retriever: Any, *, lms: LMPool | None = None, cache: bool = False) -> Any:
    """The IReRa program with its per-step LMs (``lms=None``: no LMs attached)."""
    from iclcls.programs.dspy.modules import Infer, IReRa, Rank

    infer = rank = None
    if opts.infer.enabled:
        infer = Infer(instructions=opts.infer.instructions, chain_of_thought=opts.infer.chain_of_thought, max_guesses=opts.infer.max_guesses)
    if opts.rank.enabled:
        rank = Rank(
            labels=list(retriever.pool_.labels),
            instructions=opts.rank.instructions,
            rank_k=opts.rank.rank_k,
            max_labels=opts.rank.max_labels,
            constrain=opts.rank.constrain,
            chain_of_thought=opts.rank.chain_of_thought,
        )
    program = IReRa(retriever, infer=infer, rank=rank, retrieve_k=opts.retrieve.k, infer_weight=opts.infer.weight, rank_weight=opts.rank.weight)
    if lms is not None:
        attach_lms(program, opts, lms, cache=cache)
    return program


def attach_lms(program: Any, opts: ProgramOptions, lms: LMPool, *, cache: bool = False) -> None:
    program.set_lms(
        infer=lms.get(opts.infer.lm, max_tokens=opts.infer.max_tokens, cache=cache) if opts.infer.enabled else None,
        rank=lms.get(opts.rank.lm, max_tokens=opts.rank.max_tokens, cache=cache) if opts.rank.enabled else None,
    )


def compile_split(validation: Sequence[Any], opt: OptimizerOptions, *, fallback: Sequence[Any] = ()) -> tuple[list[Any], list[Any]]:
    """The compile data from the labelled validation examples; a benchmark without a
    validation split uses ``fallback`` (its train split) instead.

    ``one_se``: (all of them, capped at ``val_size``; []): it cross-fits over them itself.
    Otherwise seeded train/val parts (``train_size``/``val_size``, default halves).
    """
    pool = [ex for ex in validation if ex.labels] or [ex for ex in fallback if ex.labels]
    random.Random(opt.seed).shuffle(pool)
    if opt.name == "one_se":
        pool = pool[: opt.val_size] if opt.val_size else pool
        if len(pool) < 2:
            raise DataError(f"compiling needs at least 2 labelled examples; got {len(pool)}")
        return pool, []
    n_train = opt.train_size or max(1, len(pool) // 2)
    n_val = opt.val_size or max(1, len(pool) - n_train)
    train, val = pool[:n_train], pool[n_train : n_train + n_val]
    if not train or not val:
        raise DataError(f"compiling needs labelled validation examples for both train and val; got {len(pool)}")
    return train, val


def optimize(
    program: Any, opt: OptimizerOptions, train: Sequence[Any], val: Sequence[Any], *, task_lm: Any = None, log: Any = lambda m: None
) -> tuple[Any, dict[str, Any]]:
    """Compile ``program`` with the configured optimizer; returns it and a JSON-able report."""
    import dspy

    from iclcls.programs.dspy.modules import as_dspy_examples, rp_at_k_metric

    trainset, valset = as_dspy_examples(train), as_dspy_examples(val)
    metric = rp_at_k_metric(opt.metric_k)
    report: dict[str, Any] = {"optimizer": opt.name, "train": len(trainset), "val": len(valset), "metric": metric.__name__}
    t0 = time.time()
    program.stats.reset()
    with dspy.context(lm=task_lm, adapter=dspy.JSONAdapter()):
        if opt.name == "none":
            compiled = program
        elif opt.name == "one_se":
            from iclcls.programs.dspy.select import HonestCompiler

            compiler = HonestCompiler(
                program,
                [*train, *val],
                demo_counts=opt.demo_counts,
                folds=opt.folds,
                weight_grid=opt.weight_grid,
                metric_k=opt.metric_k,
                threads=opt.threads,
                seed=opt.seed,
                log=log,
            )
            compiled, report["decision"] = compiler.compile()
        elif opt.name == "bootstrap_random_search":
            from dspy.teleprompt import BootstrapFewShotWithRandomSearch

            tp = BootstrapFewShotWithRandomSearch(
                metric=metric,
                max_bootstrapped_demos=opt.max_bootstrapped_demos,
                max_labeled_demos=opt.max_labeled_demos,
                num_candidate_programs=opt.num_candidate_programs,
                num_threads=1,
            )
            random.seed(opt.seed)
            compiled = tp.compile(program, trainset=trainset, valset=valset, restrict=opt.seeds)
            report["candidates"] = [
                {"seed": c.get("seed"), "score": round(float(c.get("score", 0.0)), 2)}
                for c in getattr(compiled, "candidate_programs", None) or []
                if isinstance(c, dict)
            ]
        else:  # mipro_light
            from dspy.teleprompt import MIPROv2

            tp = MIPROv2(
                metric=metric,
                auto="light" if opt.num_trials is None else None,
                num_candidates=None if opt.num_trials is None else max(2, opt.num_candidate_programs),
                max_bootstrapped_demos=opt.max_bootstrapped_demos,
                max_labeled_demos=opt.max_labeled_demos,
                num_threads=1,
                seed=opt.seed,
                verbose=False,
            )
            kwargs: dict[str, Any] = {"minibatch": len(valset) > 35}
            if opt.num_trials is not None:
                # A tiny budget: no dataset summary (many LM calls) and no program summary (the
                # proposer reads the program's source: thousands of prompt tokens per call).
                kwargs.update(num_trials=opt.num_trials, data_aware_proposer=False, program_aware_proposer=False)
            compiled = tp.compile(program, trainset=trainset, valset=valset, **kwargs)
    report["seconds"] = round(time.time() - t0, 1)
    report["lm_calls"] = {s: c["lm_calls"] for s, c in program.stats.counts.items()}
    report["demos"] = {name: len(p.demos) for name, p in compiled.named_predictors()}
    report["weights"] = {"infer": compiled.infer_weight, "rank": compiled.rank_weight}
    return compiled, report


# -- saving and loading --------------------------------------------------------------------------


def save_compiled(program: Any, opts: ProgramOptions, directory: str | Path, *, info: Mapping[str, Any] | None = None) -> Path:
    """Write config.json, program.json (DSPy JSON state) and retriever/ atomically (temp folder, renamed)."""
    import dspy

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        program.save(str(tmp / "program.json"))
        program.retrieve.retriever.save(tmp / "retriever")
        atomic_write_json(
            tmp / "config.json",
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "dspy_version": dspy.__version__,
                "options": opts.model_dump(),
                "weights": {"infer": program.infer_weight, "rank": program.rank_weight},
                "decision": decision_of(info),
                "info": dict(info or {}),
            },
        )
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{time.time_ns()}")
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def decision_of(info: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The compiler's decision record (``one_se``), if the report holds one."""
    report = (info or {}).get("report") or {}
    return report.get("decision") if isinstance(report, Mapping) else None


def read_compiled_config(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    path = d / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{d}: not a compiled DSPy program (no config.json)")
    cfg = read_json(path)
    if cfg.get("format") != FORMAT:
        raise ConfigError(f"{path}: format is {cfg.get('format')!r}, expected {FORMAT!r}")
    if int(cfg.get("version", 0)) > FORMAT_VERSION:
        raise ConfigError(f"{path}: written by a newer iclcls (format version {cfg['version']})")
    return cfg


def load_compiled(
    directory: str | Path,
    *,
    infer_lm: Any = None,
    rank_lm: Any = None,
    lms: LMPool | None = None,
    attach: bool = True,
    trust: bool = False,
    retriever: Any = None,
) -> Any:
    """Rebuild a compiled program: skeleton from config.json, retriever, then DSPy's JSON state.

    ``infer_lm``/``rank_lm`` (``dspy.BaseLM``) override the saved specs; ``attach=False``
    loads no LM. A saved ``served:`` spec names an endpoint and is used only with ``trust``.
    ``retriever``: an already fitted retriever to use instead of the saved one (a caller that
    just saved it; the label retriever re-embeds every label when loaded).
    """
    from iclcls.classifier import ICLClassifier

    d = Path(directory)
    cfg = read_compiled_config(d)
    try:
        opts = ProgramOptions.model_validate(cfg["options"])
    except Exception as e:
        raise ConfigError(f"{d / 'config.json'}: invalid options: {e}") from None
    if retriever is None:
        retriever = ICLClassifier.load(d / "retriever", trust=trust)
    program = build_program(opts, retriever)
    if not (d / "program.json").is_file():
        raise FileNotFoundError(f"{d}: program.json is missing")
    program.load(str(d / "program.json"))
    weights = cfg.get("weights") or {}
    try:
        program.set_weights(infer=weights.get("infer"), rank=weights.get("rank"))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{d / 'config.json'}: invalid weights: {e}") from None
    program.decision = cfg.get("decision")  # plain attributes: not DSPy state
    if attach:
        for step, given in (("infer", infer_lm), ("rank", rank_lm)):
            spec = getattr(opts, step).lm
            if given is None and getattr(opts, step).enabled and spec.startswith("served:") and not trust:
                raise UntrustedStateError(
                    f"{d / 'config.json'}: the {step} LM is the endpoint {spec!r}; pass {step}_lm= or trust=True"
                )
        lms = lms or LMPool()
        attach_lms(program, opts, lms)
        program.set_lms(infer=infer_lm, rank=rank_lm)
    program.options = opts  # plain attribute: not DSPy state
    return program


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)
