"""The ``iclcls`` command: demo, data, fit, label/predict, eval, study, cil, compile, serve.

Every command exits with the code of its error's class (``EXIT_CODES``, sysexits.h where one
fits), listed under ``iclcls --help``. One module on purpose (~470 lines): the command table
reads as one page, and each command is a thin wrapper over a package function.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from iclcls.errors import CapabilityError, ConfigError, DataError, IclclsError, LMBackendError, LMServerError, UntrustedStateError

EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (  # the first class that matches wins; else 2
    (DataError, 65), (FileNotFoundError, 66), (CapabilityError, 78), (LMBackendError, 75),
    (UntrustedStateError, 77), (ConfigError, 78),
)
HANDLED = (IclclsError, ValueError, FileNotFoundError, KeyError, TypeError, ImportError)  # one line, no traceback
EXIT_HELP = """Exit codes:
  0 done; 1 label: done, but some rows failed; 2 bad usage or another error (a store locked by another serve)
  65 bad input data (the file, line and field are named); 66 a file not found
  75 the LM backend failed or is unreachable: run the same command again
  77 the state needs --trust-state; 78 bad options, config or saved state, or an LM that cannot do what is asked
  130 interrupted"""

app = typer.Typer(add_completion=False, no_args_is_help=True, help="In-context-learning classifiers.", epilog=EXIT_HELP)
console = Console()


def _say(text: str, *, stderr: bool = False) -> None:
    """Print text that holds data (paths, labels, dicts, pip extras like ``iclcls[ray]``) as it
    is: no rich markup (it eats anything in square brackets), no emoji codes (``openai:m:`` is not
    an emoji), no highlighting."""
    out = Console(stderr=True) if stderr else console
    out.print(text, markup=False, emoji=False, highlight=False, soft_wrap=True)


def exit_code(error: BaseException) -> int:
    """The exit code of ``error``'s class (``EXIT_CODES``), else 2."""
    return next((code for cls, code in EXIT_CODES if isinstance(error, cls)), 2)


def _fail(error: str | BaseException, code: int | None = None) -> NoReturn:
    """Print the message and exit with ``code`` (default: the error's class's, 2 for a message)."""
    console.print(f"[red]error:[/red] {escape(str(error))}", emoji=False, highlight=False, soft_wrap=True)  # paths stay whole
    raise typer.Exit(exit_code(error) if code is None and isinstance(error, BaseException) else code or 2)


@app.command()
def data(
    name: str = typer.Argument(..., help="benchmark name, e.g. banking77, clinc150, esco_tech"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="benchmark data folder (default: $ICLCLS_DATA or ../shared/data)"),
) -> None:
    """Print a benchmark's split sizes and label count as JSON."""
    from iclcls.data import load_benchmark

    try:
        bench = load_benchmark(name, data_dir=data_dir)
    except HANDLED as e:
        _fail(e)
    typer.echo(
        json.dumps(
            {"train": len(bench.train), "validation": len(bench.validation), "test": len(bench.test), "labels": len(bench.labels)}
        )
    )


@app.command()
def demo(
    lm: str = typer.Option("smollm2", help="LM spec: smollm2, gemma3-270m, a model dir, vllm:NAME, openai:MODEL@URL"),
    ranker: str = typer.Option("channel", help="channel: P(text | each candidate's examples); likelihood: P(label | prompt)"),
    shots: int = typer.Option(4, help="demonstrations per prompt (likelihood ranker)"),
    shortlist_k: int = typer.Option(4, help="candidate classes the LM ranks"),
    show: int = typer.Option(8, help="how many predictions to print"),
) -> None:
    """Fit on the packaged sample (a small hand-written set), predict, and show what the LM used."""
    from iclcls.data import load_benchmark
    from iclcls.programs import knn_channel, knn_fusion, retriever_only

    if ranker not in ("channel", "likelihood"):
        _fail(f"--ranker must be channel or likelihood, got {ranker!r}")
    bench = load_benchmark("sample")
    console.print(
        f"[bold]iclcls demo[/bold]: the packaged sample dataset ({len(bench.train)} train / "
        f"{len(bench.test)} test, {len(bench.labels)} intents), LM [cyan]{escape(lm)}[/cyan], offline.",
        emoji=False,
    )
    t0 = time.time()
    retr = retriever_only(shortlist_k=shortlist_k).fit(bench.train)
    if ranker == "channel":
        clf = knn_channel(lm=lm, shortlist_k=shortlist_k, show_progress=True).fit(bench.train)
    else:
        clf = knn_fusion(lm=lm, shots=shots, shortlist_k=shortlist_k, show_progress=True).fit(bench.train)
    _say(f"fitted in {time.time() - t0:.1f} s (embeddings, index, pools; no LM training)")
    t0 = time.time()
    preds = clf.predict_detailed(bench.test)
    elapsed = time.time() - t0
    retr_preds = retr.predict_detailed(bench.test)
    table = Table(title="predictions (first rows)", show_lines=True)
    for col in ("text", "gold", "top labels (fused score)", "examples the LM read"):
        table.add_column(col, overflow="fold")
    for ex, p in list(zip(bench.test, preds))[:show]:
        ok = Text("✓ ", style="green") if p.label == ex.label else Text("✗ ", style="red")
        tops = ", ".join(f"{lab} ({s:.2f})" for lab, s in zip(p.labels[:3], p.scores[:3]))
        shown = [d for d in p.demonstrations[-2:]] or [  # channel: the top label's own examples
            clf.pool_.examples[i] for i in p.trace.get("channel_examples", {}).get(p.label, [])[-2:]]
        demos = "\n".join(f"{d.label}: {d.text[:40]}" for d in shown)
        table.add_row(Text(ex.text), Text(ex.label), Text.assemble(ok, tops), Text(demos or "-"))  # data, not markup
    console.print(table)
    acc = sum(p.label == ex.label for p, ex in zip(preds, bench.test)) / len(preds)
    racc = sum(p.label == ex.label for p, ex in zip(retr_preds, bench.test)) / len(preds)
    console.print(
        f"accuracy: pipeline [bold]{acc:.3f}[/bold] | retriever alone {racc:.3f} | "
        f"fusion weight {clf.ranker_.weight:.2f} ({escape(str(clf.tuned_.get('tuned_on', 'untuned')))}) | "
        f"{elapsed / len(preds):.2f} s per query | n={len(preds)}",
        emoji=False,
    )


def _run_label(inputs: Path, state: Path, out: Path | None, **options) -> None:
    """Shared by `label` and its alias `predict`: run, print the summary, set the exit code."""
    from iclcls.label import LabelOptions, LMUnavailable, label_corpus

    try:
        summary = label_corpus(inputs, state=state, out=out, options=LabelOptions(**options))
    except KeyboardInterrupt:
        where = f"{out} holds every finished chunk; run the same command again to resume" if out else "stopped"
        Console(stderr=True).print(f"[yellow]interrupted[/yellow]: {escape(where)}")
        raise typer.Exit(130) from None
    except LMUnavailable as e:
        done = e.summary.rows_done if e.summary is not None else 0
        kept = f"the {done} rows labelled before it are in {out}, nothing for the rest" if done else "no row was written"
        _fail(f"the LM server is unavailable, so labelling stopped: {e}\n{kept}. Run the same command again "
              "when the server is back: it resumes there.", exit_code(e))
    except HANDLED as e:
        _fail(e)
    for note in summary.notes:
        _say(note, stderr=True)
    _say(
        f"labelled {summary.rows_done} rows ({summary.rows_failed} failed"
        + (f", {summary.rows_skipped} already in {out}" if summary.rows_skipped else "")
        + f") in {summary.seconds:.1f} s, {summary.rows_per_s:.1f} rows/s"
        + (f" -> {out}" if out else ""),
        stderr=True,
    )
    if summary.rows_failed:
        raise typer.Exit(1)


@app.command()
def label(
    inputs: Path = typer.Argument(..., help="JSONL, CSV, TSV, Parquet or .txt (one text per line); read in chunks"),
    state: Path = typer.Option(..., "--state", help="a folder written by `iclcls fit` / ICLClassifier.save"),
    out: Path = typer.Option(..., "--out", help="JSONL output; re-running the same command resumes it"),
    text_field: str = typer.Option("text", "--text-field", help="the text column"),
    id_field: str | None = typer.Option(None, "--id-field", help="the id column (default: the row number, from 0)"),
    with_text: bool = typer.Option(False, "--with-text", help="copy each input text into its row"),
    trace: bool = typer.Option(False, "--trace", help="add candidates, demonstrations and the prompt to each row"),
    alpha: float | None = typer.Option(
        None, "--alpha", min=0.0, max=1.0, help="add each row's conformal label set ('set'), covering the gold label w.p. >= 1 - alpha"
    ),
    limit: int | None = typer.Option(None, "--limit", min=0, help="label only the first N rows (a dry run)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start OUT over instead of resuming it"),
    skip_errors: bool = typer.Option(
        False, "--skip-errors", help="resume: keep OUT's error rows as done (default: label them again)"
    ),
    lm: str | None = typer.Option(None, "--lm", help="override the saved LM spec, e.g. openai:MODEL@URL"),
    trust_state: bool = typer.Option(
        False, "--trust-state", help="trust the state folder: let it name an LM endpoint, local model, file or template"
    ),
    engine: str = typer.Option("local", "--engine", help="local, or ray (a Ray Data job; pip install 'iclcls[ray]')"),
    workers: int = typer.Option(1, "--workers", min=1, help="ray: actors, each loading the state once"),
    address: str | None = typer.Option(None, "--address", help="ray: cluster address (default: start a local one)"),
    chunk_rows: int = typer.Option(256, "--chunk-rows", min=1, help="rows per chunk (each chunk is written and fsynced)"),
    store: str | None = typer.Option(
        None, "--store", help="also use the classes added live: the store of `iclcls serve --store` (a SQLite file or "
        "postgresql://...), up to its current seq (kept in OUT.meta.json; a resume uses the same seq)",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Label a corpus: stream rows through a saved classifier into OUT (id, labels, scores per
    row), a chunk at a time; resumable; failed rows become {"id", "error"} rows (exit code 1).
    An unreachable LM server stops the run (exit code 75); run it again to resume."""
    _run_label(
        inputs, state, out, text_field=text_field, id_field=id_field, with_text=with_text, trace=trace, alpha=alpha,
        limit=limit, overwrite=overwrite, skip_errors=skip_errors, lm=lm, trust=trust_state, engine=engine, workers=workers,
        address=address, chunk_rows=chunk_rows, progress=not quiet, store=store,
    )


@app.command()
def predict(
    inputs: Path = typer.Argument(..., help="JSONL, CSV, TSV, Parquet or .txt (one text per line)"),
    state: Path = typer.Option(..., "--state", help="a folder written by `iclcls fit` / ICLClassifier.save"),
    out: Path | None = typer.Option(None, "--out", help="JSONL output (default: stdout)"),
    lm: str | None = typer.Option(None, help="override the saved LM spec"),
    text_field: str = typer.Option("text", help="the text column"),
    id_field: str | None = typer.Option(None, "--id-field", help="the id column (default: the row number)"),
    trust_state: bool = typer.Option(
        False, "--trust-state", help="trust the state folder: let it name an LM endpoint, local model, file or template"
    ),
    store: str | None = typer.Option(
        None, "--store", help="also use the classes added live (the store of `iclcls serve`), up to its current seq"
    ),
) -> None:
    """`iclcls label --trace`: one JSON line per input with candidates and demonstrations (stdout without --out)."""
    _run_label(inputs, state, out, text_field=text_field, id_field=id_field, trace=True, lm=lm, trust=trust_state,
               store=store)


@app.command()
def fit(
    config: Path = typer.Argument(..., help="YAML with `data:` and `classifier:` sections"),
    out: Path = typer.Option(..., "--out", help="folder to save the fitted state to"),
) -> None:
    """Fit a classifier from a config (embeddings, index, tuning on validation) and save its state."""
    from iclcls.experiment import build_classifier, load_splits
    from iclcls.experiment.config import FitConfig, load_config

    try:
        cfg = load_config(config, FitConfig)
        splits = load_splits(cfg.data)
        clf = build_classifier(cfg.classifier)
    except HANDLED as e:
        _fail(e)
    val = splits.validation if cfg.classifier.tune and splits.validation else None
    clf.fit(splits.train, labels=splits.labels, validation=val, tune="auto" if cfg.classifier.tune else "none")
    clf.save(out)
    _say(f"saved to {out} ({len(clf.pool_)} pool examples, {len(clf.classes_)} labels; tuned: {clf.tuned_})")


@app.command("compile")
def compile_(
    config: Path = typer.Argument(..., help="YAML with data: and classifier: {program: dspy_irera, dspy: {...}} (e.g. eval/configs/esco_tech_dspy.yaml)"),
    out: Path | None = typer.Option(None, "--out", help="folder for the compiled program (default: classifier.compiled)"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="override data.data_dir"),
) -> None:
    """Compile Infer-Retrieve-Rank as a DSPy program on the validation split and save it
    (DSPy JSON state + the retriever's state; no pickle)."""
    from iclcls.experiment.compile import compile_from_config

    try:
        report = compile_from_config(config, out, data_dir=str(data_dir) if data_dir else None, log=lambda m: _say(str(m)))
    except HANDLED as e:
        _fail(e)
    _say(f"best candidate scores: {report.get('candidates')}")


@app.command("eval")
def eval_(
    config: Path = typer.Argument(..., help="experiment YAML with data:, classifier: and eval: sections"),
    more_axes: list[str] | None = typer.Argument(None, help="more sweep axes after --sweep, e.g. shots=2,4,8", show_default=False),
    out: Path | None = typer.Option(None, "--out", help="run directory (default: runs/<config name>)"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="override data.data_dir"),
    test_size: int | None = typer.Option(None, "--test-size", min=1, help="override data.test_size (a seeded subset)"),
    sweep: list[str] | None = typer.Option(None, "--sweep", help="a grid axis KEY=V1,V2,... (repeatable; more axes may follow)"),
    set_: list[str] | None = typer.Option(None, "--set", help="override one option, KEY=VALUE (repeatable), e.g. classifier.shots=4"),
    force: bool = typer.Option(False, "--force", help="discard a run of a different config (or a finished run) in --out"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Run an experiment: fit, predict (checkpointed; re-run to resume), score, and write
    metrics.json, predictions.jsonl, report.md (+ plots) and the resolved config to --out."""
    import shlex

    from iclcls.experiment import run_experiment as run_eval
    from iclcls.experiment.config import EvalConfig, apply_overrides, load_yaml, parse, parse_assignments
    from iclcls.experiment.sweep import run_sweep

    _EVAL_SHOW = ("accuracy", "micro_f1", "macro_f1", "rp@5", "rp@10", "r@10", "r@50")
    argv = ["iclcls", "eval", str(config)]
    argv += [x for s in (sweep or []) for x in ("--sweep", s)] + list(more_axes or [])
    argv += [x for s in (set_ or []) for x in ("--set", s)]
    for flag, value in (("--out", out), ("--data-dir", data_dir), ("--test-size", test_size)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--force"] if force else []
    command = " ".join(shlex.quote(a) for a in argv)
    try:
        overrides = parse_assignments(set_ or [])
        if data_dir is not None:
            overrides["data.data_dir"] = str(data_dir)
        if test_size is not None:
            overrides["data.test_size"] = test_size
        axes_items = list(sweep or []) + list(more_axes or [])
        if more_axes and not sweep:
            raise ValueError(f"unexpected arguments {more_axes}: sweep axes follow --sweep (e.g. --sweep select=knn,random shots=2,4)")
        axes = parse_assignments(axes_items, grid=True)
        raw = apply_overrides(load_yaml(config), overrides)
        cfg = parse(EvalConfig, raw, config)
        name = cfg.eval.name or config.stem
        target = out or Path("runs") / name
        if axes:
            results = run_sweep(raw, axes, target, source=config, force=force, command=command, show_progress=not quiet)
            for point, res in results:
                _say(f"{point}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.metrics.items() if k in _EVAL_SHOW))
            _say(f"sweep report: {target / 'report.md'}")
            return
        cfg.eval.name = name
        res = run_eval(cfg, target, force=force, command=command, show_progress=not quiet)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: finished examples are checkpointed; run the same command again to resume")
        raise typer.Exit(130) from None
    except LMServerError as e:
        _fail(f"the LM server failed: {e}\nfinished examples are checkpointed; run the same command again to resume", exit_code(e))
    except HANDLED as e:
        _fail(e)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in res.metrics.items() if k in _EVAL_SHOW)
    done = f"{res.computed} predicted now" + (f", {len(res.records) - res.computed} from earlier" if res.computed < len(res.records) else "")
    _say(f"{name}: {shown} (n={len(res.records)}; {done})")
    _say(f"report: {target / 'report.md'}")



@app.command("cil")
def cil(
    config: Path = typer.Argument(..., help="continual-learning YAML: data:, tasks:, methods: (see eval/configs/cil_*.yaml)"),
    out: Path = typer.Option(..., "--out", help="folder for metrics.json, report.md and the accuracy-vs-task plot"),
    methods: str | None = typer.Option(None, "--methods", help="comma-separated method names to run (default: all)"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="override data.data_dir"),
    test_size: int | None = typer.Option(None, "--test-size", min=1, help="override data.test_size (a seeded subset)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Class-incremental learning: classes arrive task by task; evaluate on all seen classes after each task."""
    from iclcls.experiment.config import load_yaml, parse
    from iclcls.experiment.continual import CILConfig, run_cil

    try:
        raw = load_yaml(config)
        data = dict(raw.get("data") or {})
        if data_dir is not None:
            data["data_dir"] = str(data_dir)
        if test_size is not None:
            data["test_size"] = test_size
        raw["data"] = data
        cfg = parse(CILConfig, raw, config)
        only = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
        unknown = sorted(set(only or ()) - {m.name for m in cfg.methods})
        if unknown:
            raise ValueError(f"unknown methods {unknown}; the config has {[m.name for m in cfg.methods]}")
        metrics = run_cil(cfg, out, only=only, show_progress=not quiet, config_path=str(config))
    except HANDLED as e:
        _fail(e)
    k = cfg.recall_k
    for name, r in metrics["methods"].items():
        joint = r.get("joint_accuracy")
        _say(
            f"{name}: final {r['final_accuracy']:.4f}"
            + (f", avg incremental {r['avg_incremental_accuracy']:.4f}, forgetting {r['forgetting']:.4f}" if r["avg_incremental_accuracy"] is not None else "")
            + (f", joint {joint:.4f}" if joint is not None else "")
            + f", recall@{k} {r[f'shortlist_recall_at_{k}']:.4f} (n={r['eval_examples'][-1]})"
        )
    _say(f"report: {out / 'report.md'}")


@app.command("study")
def study(
    config: Path = typer.Argument(..., help="study YAML: data:, classifier:, eval: and study: (selectors, shots, seeds)"),
    out: Path | None = typer.Option(None, "--out", help="study directory (default: runs/<config name>)"),
    set_: list[str] | None = typer.Option(None, "--set", help="override one fixed option, KEY=VALUE (repeatable)"),
    force: bool = typer.Option(False, "--force", help="discard runs of a different config in --out"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Run a demonstration-selection study (selectors x shots x seeds, all else fixed; re-run to
    resume) and write metrics.json, summary.json, report.md and a plot of accuracy against shots."""
    import shlex

    from iclcls.experiment.config import parse_assignments
    from iclcls.experiment.study import run_study

    argv = ["iclcls", "study", str(config)] + [x for s in (set_ or []) for x in ("--set", s)]
    argv += ["--out", str(out)] if out is not None else []
    argv += ["--force"] if force else []
    study_command = " ".join(shlex.quote(a) for a in argv)
    try:
        overrides = parse_assignments(set_ or [])
        target = out or Path("runs") / config.stem
        res = run_study(config, target, overrides=overrides, force=force, show_progress=not quiet, command=study_command)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: finished examples are checkpointed; run the same command again to resume")
        raise typer.Exit(130) from None
    except HANDLED as e:
        _fail(e)
    for s in res.summary:
        _say(
            f"{s['select']:>16} {s['shots']:>3} shots: accuracy {100 * s['accuracy_mean']:.2f} ± "
            f"{100 * s['accuracy_std']:.2f}" + (" (deterministic)" if s["deterministic"] else "")
        )
    _say(f"report: {target / 'report.md'}")


@app.command("serve")
def serve(
    state: Path = typer.Option(..., "--state", help="a folder written by `iclcls fit` / ICLClassifier.save (only read, never written)"),
    store: str | None = typer.Option(
        None, "--store",
        help="where the classes added live are kept: a SQLite file (one server; snapshots in STORE.snapshots/, the "
        "writer lock in STORE.lock; default: DIR.additions.sqlite beside the --state folder DIR, never inside it), "
        "or postgresql://USER@HOST:PORT/DB shared by any number of replicas (snapshots in the database)",
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (non-loopback needs --api-key-env)"),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    api_key_env: str | None = typer.Option(None, "--api-key-env", help="name of the environment variable holding the classify key (Bearer auth)"),
    admin_key_env: str | None = typer.Option(
        None, "--admin-key-env",
        help="name of the environment variable holding the admin key, for adding and listing classes (default: the classify key)",
    ),
    trust_state: bool = typer.Option(False, "--trust-state", help="trust the state folder: let it name an LM endpoint, local model, file or template"),
    lm: str | None = typer.Option(None, "--lm", help="override the saved LM spec"),
    snapshot_every: int = typer.Option(100, "--snapshot-every", min=1, help="write a snapshot after this many additions"),
    refresh_every_s: float = typer.Option(
        60.0, "--refresh-every-s", min=0, help="refit stages that additions leave stale this often (seconds; 0: never)"
    ),
    follow_poll_s: float = typer.Option(
        1.0, "--follow-poll-s", min=0.05, help="replicas: look for other replicas' additions at least this often "
        "(a PostgreSQL notification wakes them sooner)",
    ),
    min_seq_wait_s: float = typer.Option(
        5.0, "--min-seq-wait-s", min=0, help="how long a classify request with min_seq waits for it before 503"
    ),
    max_texts: int = typer.Option(64, "--max-texts", min=1, help="texts per classify request"),
    max_text_chars: int = typer.Option(2000, "--max-text-chars", min=1, help="characters per text, example or description"),
    max_examples: int = typer.Option(256, "--max-examples", min=1, help="examples per addition"),
    max_classes: int = typer.Option(10_000, "--max-classes", min=1, help="classes in the state: an addition past it gets 409"),
    max_pool: int = typer.Option(200_000, "--max-pool", min=1, help="pool examples in the state: an addition past it gets 409"),
    max_body_bytes: int = typer.Option(1_000_000, "--max-body-bytes", min=1, help="bytes per request body"),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="micro-batch concurrent classify requests"),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", min=0, help="how long a batch waits for more requests"),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="texts per classifier call when batching"),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Serve the classifier over HTTP: classify, add classes live (kept in a transactional store), metrics, a web page."""
    import os

    from iclcls.serve.auth import bind_refusal

    def key_from(flag: str, name: str | None) -> str | None:
        if not name:
            return None
        value = os.environ.get(name, "")
        if not value.strip():
            _fail(f"{flag} {name}: the environment variable ${name} is unset or empty")
        return value

    key = key_from("--api-key-env", api_key_env)
    admin_key = key_from("--admin-key-env", admin_key_env)
    refusal = bind_refusal(host, key)
    if refusal:
        _fail(refusal)
    from iclcls.serve.app import ServeSettings
    from iclcls.serve.app import serve as run_service

    settings = ServeSettings(
        max_texts=max_texts, max_text_chars=max_text_chars, max_examples=max_examples, max_body_bytes=max_body_bytes,
        batching=batching, batch_wait_ms=batch_wait_ms, max_batch=max_batch, max_classes=max_classes, max_pool=max_pool,
        min_seq_wait_s=min_seq_wait_s,
    )
    try:
        run_service(str(state), store=store, host=host, port=port, api_key=key,
                    admin_key=admin_key, trust_state=trust_state, lm=lm, snapshot_every=snapshot_every,
                    refresh_every_s=refresh_every_s, follow_poll_s=follow_poll_s, settings=settings,
                    log_level=log_level)
    except HANDLED as e:
        _fail(e)


if __name__ == "__main__":
    app()
