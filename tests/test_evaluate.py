"""The experiment runner, checkpoint/resume, reports, sweeps and the `iclcls eval` command,
on real data subsets with the real embedder (retriever-only configs; one tiny LM run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from iclcls.experiment import PARTIAL, ResumeError, read_predictions, score_records
from iclcls.experiment import run_experiment as run_eval
from iclcls.experiment.config import apply_overrides, config_hash, load_eval_config, parse_assignments
from iclcls.experiment.sweep import run_sweep

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def banking_raw(data_dir: Path, **data) -> dict:
    return {
        "data": {"benchmark": "banking77_10shot", "data_dir": str(data_dir), "test_size": 50, "validation_size": 20, **data},
        "classifier": {"program": "retriever_only", "shortlist": "knn_vote", "shortlist_k": 10},
        "eval": {"ks": [1, 3, 10], "checkpoint_every": 8},
    }


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def load(tmp_path: Path, raw: dict, name: str = "cfg"):
    return load_eval_config(write_config(tmp_path / f"{name}.yaml", raw))


def stable(records):
    """What must not change between an interrupted-and-resumed run and a straight one."""
    return [{k: r[k] for k in ("index", "text", "gold", "labels", "scores", "candidates", "predicted")} for r in records]


# -- configs --------------------------------------------------------------------------------------


def test_assignments_are_typed_and_qualified():
    grid = parse_assignments(["select=random,knn,class_balanced", "shots=2,4,8", "multi_label=true"], grid=True)
    assert grid == {"select": ["random", "knn", "class_balanced"], "shots": [2, 4, 8], "multi_label": [True]}
    raw = {"classifier": {"select": "knn"}, "data": {"benchmark": "x"}}
    out = apply_overrides(raw, {"shots": 4, "test_size": 10, "select.order": "ascending", "eval.ks": [5]})
    assert out["classifier"]["shots"] == 4
    assert out["data"]["test_size"] == 10
    assert out["classifier"]["select"] == {"name": "knn", "order": "ascending"}  # a name became a spec
    assert out["eval"]["ks"] == [5]
    assert raw["classifier"]["select"] == "knn"  # the input is not modified
    with pytest.raises(ValueError, match="unknown option 'shotz'"):
        parse_assignments(["shotz=3"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_assignments(["shots"])


def test_config_errors_name_file_and_field(tmp_path, data_dir):
    raw = banking_raw(data_dir)
    raw["classifier"]["shots"] = -1
    path = write_config(tmp_path / "bad.yaml", raw)
    with pytest.raises(ValueError, match=r"bad\.yaml.*\n.*classifier\.shots"):
        load_eval_config(path)
    raw = banking_raw(data_dir)
    raw["eval"]["kz"] = [1]
    with pytest.raises(ValueError, match="eval.kz"):
        load_eval_config(write_config(tmp_path / "bad2.yaml", raw))


def test_config_hash_ignores_report_options(tmp_path, data_dir):
    a = load(tmp_path, banking_raw(data_dir))
    b = load(tmp_path, apply_overrides(banking_raw(data_dir), {"eval.ks": [1, 5], "eval.notes": "x"}), "b")
    c = load(tmp_path, apply_overrides(banking_raw(data_dir), {"shortlist_k": 5}), "c")
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_shipped_configs_validate():
    names = {p.name for p in (REPO / "eval" / "configs").glob("*.yaml")}
    for required in ("esco_tech_retrieve.yaml", "esco_tech_irera.yaml", "banking77_knn.yaml"):
        assert required in names
    for p in (REPO / "eval" / "configs").glob("*.yaml"):
        if p.name.startswith(("cil_", "study_")):
            continue  # other commands' configs
        cfg = load_eval_config(p)
        assert cfg.eval.name == p.stem


# -- one run --------------------------------------------------------------------------------------


def test_run_writes_metrics_predictions_report(tmp_path, data_dir):
    cfg = load(tmp_path, banking_raw(data_dir))
    out = tmp_path / "run"
    res = run_eval(cfg, out, command="iclcls eval cfg.yaml", show_progress=False)
    for name in ("metrics.json", "predictions.jsonl", "report.md", "config.yaml", "run.json", "at_k.png", "per_class.png"):
        assert (out / name).is_file(), name
    assert not (out / PARTIAL).exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # flat
    assert metrics["n"] == 50
    assert metrics["accuracy"] > 0.6  # the retriever alone is ~0.8 on BANKING77 10-shot
    assert metrics["r@10"] >= metrics["r@3"] >= metrics["accuracy"]
    records = read_predictions(out / "predictions.jsonl")
    assert [r["index"] for r in records] == list(range(50))
    assert all(len(r["candidates"]) == 10 and "demonstrations" in r and r["gold"] for r in records)
    assert score_records(records, ks=[1, 3, 10]) == pytest.approx(metrics)  # metrics follow from the predictions
    report = (out / "report.md").read_text()
    assert "| accuracy |" in report and "![" in report and "iclcls eval cfg.yaml" in report
    assert f"{100 * metrics['accuracy']:.2f}" in report
    assert (out / "per_class.png").read_bytes()[:8] == PNG_MAGIC
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["data"]["test_size"] == 50 and resolved["classifier"]["shortlist_k"] == 10
    assert json.loads((out / "run.json").read_text())["config_hash"] == config_hash(cfg)
    assert res.computed == 50


def test_resume_after_a_crash_skips_finished_examples(tmp_path, data_dir):
    cfg = load(tmp_path, banking_raw(data_dir))
    straight = run_eval(cfg, tmp_path / "straight", show_progress=False)

    out = tmp_path / "crashy"
    seen: list[int] = []

    def crash_after_three(idx):
        seen.extend(idx)
        if len(seen) >= 24:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(cfg, out, on_chunk=crash_after_three, show_progress=False)
    assert not (out / "predictions.jsonl").exists()
    assert len((out / PARTIAL).read_text().splitlines()) == 24  # three chunks of 8, fsync'd

    recomputed: list[int] = []
    res = run_eval(cfg, out, on_chunk=recomputed.extend, show_progress=False)
    assert sorted(recomputed) == list(range(24, 50))  # finished examples are not predicted again
    assert res.computed == 26 and res.info["resumed_examples"] == 24
    assert res.info["tuned_restored"] is True  # nor is the classifier tuned again
    assert stable(res.records) == stable(straight.records)
    assert res.metrics == pytest.approx(straight.metrics | {"seconds_per_example": res.metrics["seconds_per_example"]})
    assert not (out / PARTIAL).exists() and not (out / "checkpoint.json").exists()


def test_ctrl_c_and_a_torn_line_resume(tmp_path, data_dir):
    cfg = load(tmp_path, banking_raw(data_dir))
    out = tmp_path / "run"

    def interrupt(idx):
        if idx[0] >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, out, on_chunk=interrupt, show_progress=False)
    partial = out / PARTIAL
    assert len(partial.read_text().splitlines()) == 16
    with open(partial, "a", encoding="utf-8") as f:  # a hard kill in the middle of a write
        f.write('{"index": 16, "text": "half a li')
    recomputed: list[int] = []
    res = run_eval(cfg, out, on_chunk=recomputed.extend, show_progress=False)
    assert sorted(recomputed) == list(range(16, 50))
    assert [r["index"] for r in read_predictions(out / "predictions.jsonl")] == list(range(50))
    assert res.metrics["n"] == 50


def test_a_different_config_is_refused_unless_forced(tmp_path, data_dir):
    cfg = load(tmp_path, banking_raw(data_dir))
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        run_eval(cfg, out, on_chunk=lambda idx: (_ for _ in ()).throw(RuntimeError("stop")), show_progress=False)
    other = load(tmp_path, apply_overrides(banking_raw(data_dir), {"shortlist_k": 5}), "other")
    with pytest.raises(ResumeError, match="different config"):
        run_eval(other, out, show_progress=False)
    res = run_eval(other, out, force=True, show_progress=False)
    assert res.computed == 50 and all(len(r["candidates"]) == 5 for r in res.records)
    with pytest.raises(ResumeError, match="different config"):  # a finished run is protected too
        run_eval(cfg, out, show_progress=False)


def test_a_finished_run_is_rescored_not_rerun(tmp_path, data_dir):
    cfg = load(tmp_path, banking_raw(data_dir))
    out = tmp_path / "run"
    first = run_eval(cfg, out, show_progress=False)
    more_ks = load(tmp_path, apply_overrides(banking_raw(data_dir), {"eval.ks": [1, 2, 10]}), "ks")
    again = run_eval(more_ks, out, show_progress=False)
    assert again.computed == 0 and again.info["rescored_only"]
    assert "r@2" in again.metrics and again.metrics["accuracy"] == first.metrics["accuracy"]


# -- sweeps and the command -------------------------------------------------------------------------


def test_sweep_runs_the_cross_product_and_compares(tmp_path, data_dir):
    raw = banking_raw(data_dir, test_size=30)
    results = run_sweep(raw, {"shortlist_k": [3, 10], "shortlist.neighbors": [5, 50]}, tmp_path / "sw", show_progress=False)
    assert len(results) == 4
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["run"] for r in sweep["rows"]] == ["shortlist_k-3_neighbors-5", "shortlist_k-3_neighbors-50",
                                                  "shortlist_k-10_neighbors-5", "shortlist_k-10_neighbors-50"]
    for row in sweep["rows"]:
        assert (tmp_path / "sw" / row["run"] / "metrics.json").is_file()
        assert len(read_predictions(tmp_path / "sw" / row["run"] / "predictions.jsonl")[0]["candidates"]) == row["shortlist_k"]
    assert {r["r@3"] for r in sweep["rows"] if r["shortlist_k"] == 3} <= {r["r@3"] for r in sweep["rows"]}
    report = (tmp_path / "sw" / "report.md").read_text()
    assert report.count("](shortlist_k-") == 4 and "sweep.png" in report
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:8] == PNG_MAGIC


def test_bad_sweep_value_fails_before_running(tmp_path, data_dir):
    with pytest.raises(ValueError, match=r"shortlist_k-0.*\n.*classifier\.shortlist_k"):
        run_sweep(banking_raw(data_dir), {"shortlist_k": [3, 0]}, tmp_path / "sw", show_progress=False)
    assert not (tmp_path / "sw" / "shortlist_k-3").exists()


def test_cli_eval(tmp_path, data_dir):
    from typer.testing import CliRunner

    from iclcls.cli import app

    raw = banking_raw(tmp_path / "nowhere")  # the flag below overrides the data folder
    cfg = write_config(tmp_path / "b.yaml", raw)
    out = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(cfg), "--out", str(out), "--data-dir", str(data_dir), "--test-size", "20", "--quiet"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 20 and 0 <= metrics["macro_f1"] <= 1
    assert "--test-size 20" in (out / "report.md").read_text()
    bad = runner.invoke(app, ["eval", str(cfg), "--out", str(out), "--set", "shots=-2"])
    assert bad.exit_code == 78 and "classifier.shots" in bad.output  # EX_CONFIG
    stray = runner.invoke(app, ["eval", str(cfg), "shots=2,4"])
    assert stray.exit_code == 2 and "--sweep" in stray.output


@pytest.mark.slow
def test_esco_retrieve_subset_reports_rank_precision(tmp_path, data_dir):
    """The 13,896-label retriever on 30 TECH sentences (slow only while the label embeddings are uncached)."""
    cfg = load_eval_config(REPO / "eval" / "configs" / "esco_tech_retrieve.yaml",
                           overrides={"data.data_dir": str(data_dir), "data.test_size": 30})
    res = run_eval(cfg, tmp_path / "esco", show_progress=False)
    m = res.metrics
    assert {"rp@5", "rp@10", "r@50", "micro_f1", "macro_f1"} <= set(m)
    assert m["r@50"] > 0.5  # measured ~0.75 on the full TECH test set
    assert m["rp@10"] <= m["r@50"] + 1e-9
    assert all(len(r["candidates"]) == 50 for r in res.records)
    report = (tmp_path / "esco" / "report.md").read_text()
    assert "IReRa paper" in report and "71.98" in report
    assert (tmp_path / "esco" / "at_k.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_tiny_lm_eval_records_demonstrations_and_prompts(tmp_path, data_dir):
    """SmolLM2 ranks kNN-selected demonstrations' labels on 6 BANKING77 queries (fusion tuned on 6)."""
    cfg = load_eval_config(REPO / "eval" / "configs" / "banking77_knn.yaml",
                           overrides={"data.data_dir": str(data_dir), "data.test_size": 6, "data.validation_size": 6})
    res = run_eval(cfg, tmp_path / "lm", show_progress=False)
    assert res.info["lm"] and "fusion_weight" in res.info["tuned"]
    for r in res.records:
        assert len(r["demonstrations"]) == cfg.classifier.shots
        assert all(d["labels"][0] in r["candidates"] for d in r["demonstrations"])  # from the shortlisted classes
        assert r["text"] in r["trace"]["prompt"] and "lm_score" in r["trace"]
        assert r["prompt_tokens"] > 0
    assert 0 <= res.metrics["accuracy"] <= 1 and res.metrics["n"] == 6
    assert (tmp_path / "lm" / "fusion.png").is_file() and "LM alone" in (tmp_path / "lm" / "report.md").read_text()


def test_fusion_curve_from_traces():
    from iclcls.experiment.report import fusion_curve

    rec = {"gold": ["a"], "trace": {"lm_score": {"a": -0.1, "b": -3.0}, "retriever_score": {"a": 0.2, "b": 0.9}}}
    curve = fusion_curve([rec, {**rec, "gold": ["b"]}], grid=3)
    assert curve["weight"] == [0.0, 0.5, 1.0]
    # w=0 follows the retriever (b), w=1 the LM (a); each is right once out of two
    assert curve["accuracy"][0] == 0.5 and curve["accuracy"][2] == 0.5
    assert fusion_curve([{"gold": ["a"], "trace": {"ranker": "retriever"}}]) is None


# -- a figure never fails a run --------------------------------------------------------------------


def test_per_class_plot_draws_classes_at_100_and_0_percent(tmp_path):
    from iclcls.experiment.report import plot_per_class
    from iclcls.metrics import wilson_interval

    assert wilson_interval(6, 6)[1] < 1.0 and wilson_interval(0, 11)[0] > 0.0  # the rounding that broke it
    records = [{"gold": ["a"], "labels": ["a"]}] * 6 + [{"gold": ["b"], "labels": ["a"]}] * 11
    records += [{"gold": ["c"], "labels": ["c"]}] * 21 + [{"gold": ["d"], "labels": ["c"]}, {"gold": ["d"], "labels": ["d"]}]
    p = plot_per_class(records, tmp_path / "per_class.png", title="t")
    assert p is not None and p.read_bytes()[:8] == PNG_MAGIC


def test_a_failing_figure_or_report_is_a_warning_and_the_results_are_written(tmp_path, data_dir, monkeypatch):
    from typer.testing import CliRunner

    import iclcls.experiment.report as report
    from iclcls.cli import app

    def broken(*args, **kwargs):
        raise ValueError("'xerr' must not contain negative values")

    monkeypatch.setattr(report, "plot_per_class", broken)
    cfg = load(tmp_path, banking_raw(data_dir, test_size=20))
    out = tmp_path / "run"
    with pytest.warns(report.ReportWarning, match="per_class.png was not drawn"):
        res = run_eval(cfg, out, show_progress=False)
    assert res.metrics["n"] == 20 and json.loads((out / "metrics.json").read_text())["n"] == 20
    assert len(read_predictions(out / "predictions.jsonl")) == 20 and (out / "at_k.png").is_file()
    assert "per_class.png was not drawn (ValueError: 'xerr' must not contain negative values)" in (out / "report.md").read_text()

    monkeypatch.setattr(report, "atomic_write_text", lambda *a, **k: broken())  # report.md itself fails
    (out / "metrics.json").unlink()
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "cfg.yaml"), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output  # rescored from predictions.jsonl; the report's failure is a warning
    assert json.loads((out / "metrics.json").read_text())["n"] == 20
