"""The selection study: grid expansion, the CLI's outputs, resuming, config errors, and a real-LM run."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from iclcls.cli import app
from iclcls.experiment.study import StudyOptions, load_study_config, run_study, study_points


def write_config(path, **study):
    cfg = {
        "data": {"benchmark": "sample", "seed": 0},
        "classifier": {"lm": None, "shortlist": "knn_vote", "shortlist_k": 3, "rank": "retriever", "tune": False},
        "eval": {"per_class": False},
        "study": {"selectors": {"knn": "knn", "random": {"name": "random"}}, "shots": [1, 2], "seeds": [0, 1],
                  "queries": 6, **study},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_grid_runs_seeded_selectors_per_seed_and_deterministic_ones_once():
    opts = StudyOptions(selectors={"knn": "knn", "random": "random", "ms": {"name": "many_shot", "order": "class_balanced"}},
                        shots=[2, 4], seeds=[0, 1, 2])
    points = study_points(opts)
    assert len(points) == 3 * 2 * 3
    knn = [p for p in points if p.select == "knn"]
    assert {p.run_seed for p in knn} == {0} and "seed" not in knn[0].spec
    ms = [p for p in points if p.select == "ms" and p.shots == 4]
    assert [p.spec for p in ms] == [{"name": "many_shot", "order": "class_balanced", "seed": s} for s in (0, 1, 2)]
    assert len({p.run for p in points}) == 2 + 2 * 3 + 2 * 3
    forced = study_points(StudyOptions(selectors={"r": "random"}, shots=[1], seeds=[3, 4], deterministic=["r"]))
    assert {p.run for p in forced} == {"r_shots-1_seed-3"} and forced[0].spec["seed"] == 3


def test_study_cli_writes_rows_report_and_plot_then_resumes(tmp_path, data_dir):
    cfg = write_config(tmp_path / "study.yaml")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["study", str(cfg), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "metrics.json").read_text())
    assert len(rows) == 2 * 2 * 2
    assert all({"select", "shots", "seed", "accuracy"} <= set(r) and 0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert {(r["select"], r["shots"], r["seed"]) for r in rows} == {
        (s, k, seed) for s in ("knn", "random") for k in (1, 2) for seed in (0, 1)}
    assert all(r["n"] == 6 for r in rows)
    knn = [r for r in rows if r["select"] == "knn"]
    assert all(r["deterministic"] for r in knn) and {r["run"] for r in knn} == {"knn_shots-1_seed-0", "knn_shots-2_seed-0"}
    report = (out / "report.md").read_text()
    assert "| selector | 1 shots | 2 shots |" in report and "retriever alone" in report and "†" in report
    assert (out / "accuracy_vs_shots.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert all(s["accuracy_std"] == 0.0 for s in summary if s["select"] == "knn")
    assert (out / "runs" / "random_shots-2_seed-1" / "predictions.jsonl").is_file()
    # A second call re-scores finished runs without predicting again.
    before = (out / "runs" / "random_shots-2_seed-1" / "predictions.jsonl").stat().st_mtime_ns
    res2 = CliRunner().invoke(app, ["study", str(cfg), "--out", str(out), "--quiet"])
    assert res2.exit_code == 0, res2.output
    assert (out / "runs" / "random_shots-2_seed-1" / "predictions.jsonl").stat().st_mtime_ns == before
    assert json.loads((out / "metrics.json").read_text()) == rows
    # A different fixed setting in the same folder is refused (it would mix configs).
    res3 = CliRunner().invoke(app, ["study", str(cfg), "--out", str(out), "--quiet", "--set", "classifier.shortlist_k=4"])
    assert res3.exit_code == 78 and "different study config" in res3.output  # ResumeError: EX_CONFIG


def test_bad_study_configs_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"study\.shots"):
        load_study_config(write_config(tmp_path / "a.yaml", shots=[-1]))
    with pytest.raises(ValueError, match=r"study\.selectors\.x: unknown selector 'nope'"):
        load_study_config(write_config(tmp_path / "b.yaml", selectors={"x": "nope"}))
    with pytest.raises(ValueError, match=r"study\.deterministic"):
        load_study_config(write_config(tmp_path / "c.yaml", deterministic=["dpp"]))
    res = CliRunner().invoke(app, ["study", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 66 and "not found" in res.output  # EX_NOINPUT


@pytest.mark.slow
def test_a_real_lm_study_counts_calls_and_shared_prefix_tokens(tmp_path, data_dir, smollm):
    cfg = tmp_path / "s.yaml"
    write_config(cfg, selectors={"knn": "knn", "many_shot": {"name": "many_shot", "order": "class_balanced"}},
                 shots=[2], seeds=[0, 1], queries=4)
    raw = yaml.safe_load(cfg.read_text())
    raw["classifier"].update(lm="smollm2", rank="likelihood", prompt={"template": "classify_demos_first"}, batch_size=4)
    cfg.write_text(yaml.safe_dump(raw))
    res = run_study(cfg, tmp_path / "out", lm=smollm, show_progress=False)
    by = {s["select"]: s for s in res.summary}
    assert by["knn"]["lm_calls_per_query"] == 1.0 and by["many_shot"]["lm_calls_per_query"] == 1.0
    assert by["knn"]["demos_per_query"] == 2.0 and by["many_shot"]["demos_per_query"] == 2.0
    # kNN prompts differ per query: every token is prefilled. Many-shot prompts share their
    # demonstrations: each run prefills them once, so fewer tokens than the prompts hold.
    assert by["knn"]["prefill_tokens_per_query"] == pytest.approx(by["knn"]["prompt_tokens_per_query"])
    assert by["many_shot"]["prefill_tokens_per_query"] < 0.8 * by["many_shot"]["prompt_tokens_per_query"]
    assert res.reference is not None and 0.0 <= res.reference["accuracy"] <= 1.0
    assert len(res.rows) == 4
