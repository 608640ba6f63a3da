"""The class-incremental runner (``iclcls cil``) on a tiny retriever-only config (the packaged sample)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from iclcls.cli import app
from iclcls.experiment.continual import CILConfig, load_cil_config, run_cil

CONFIG = {
    "name": "cil_sample",
    "data": {"benchmark": "sample", "seed": 0},
    "tasks": 4,
    "task_seed": 3,
    "recall_k": 2,
    "primary": "ecl",
    "methods": [
        {"name": "ecl", "classifier": {"shortlist": {"name": "ecl", "alpha": 0.1}, "shortlist_k": 3, "select": None, "rank": "retriever"}},
        {"name": "class_mean", "classifier": {"shortlist": "class_mean", "shortlist_k": 3, "select": None, "rank": "retriever"}},
        {"name": "knn_vote", "classifier": {"shortlist": "knn_vote", "shortlist_k": 3, "select": None, "rank": "retriever"}},
        {"name": "ecl_final", "eval": "final", "test_per_task": 10, "joint": False,
         "classifier": {"shortlist": "ecl", "shortlist_k": 3, "select": None, "rank": "retriever"}},
    ],
}


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "cil_sample.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_cli_writes_metrics_report_and_plot(config_file, tmp_path, embedder):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["cil", str(config_file), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    for key in ("final_accuracy", "avg_incremental_accuracy", "forgetting", "joint_accuracy", "shortlist_recall_at_2"):
        assert isinstance(m[key], float), key
    assert m["n_tasks"] == 4 and [len(t) for t in m["tasks"]] == [2, 2, 2, 2]
    assert sorted(x for t in m["tasks"] for x in t) == sorted(
        ["card_lost", "refund_request", "change_address", "cancel_subscription", "track_order", "reset_password",
         "billing_error", "speak_to_agent"]
    )
    for name in ("ecl", "class_mean", "knn_vote"):
        r = m["methods"][name]
        assert len(r["accuracy_per_task"]) == 4 and r["eval_examples"] == [6, 12, 18, 24]
        # Nothing is forgotten: the last state equals one fit on all the data.
        assert r["final_accuracy"] == r["joint_accuracy"] and r["joint_prediction_agreement"] == 1.0
        a = np.array([row + [np.nan] * (4 - len(row)) for row in r["accuracy_matrix"]], dtype=float)
        forgetting = np.mean([np.nanmax(a[j:3, j]) - a[3, j] for j in range(3)])
        assert r["forgetting"] == pytest.approx(forgetting)
        assert r["avg_incremental_accuracy"] == pytest.approx(np.mean([np.nanmean(a[i, : i + 1]) for i in range(4)]))
        assert 0.0 <= r["final_accuracy"] <= r["shortlist_recall_at_2"] <= 1.0
    assert m["final_accuracy"] == m["methods"]["ecl"]["final_accuracy"]
    d = m["methods"]["ecl"]["joint_statistics_diff"]
    assert d["max_abs_mean_diff"] < 1e-6 and d["max_abs_cov_diff"] < 1e-6
    fin = m["methods"]["ecl_final"]
    assert fin["eval_examples"] == [10] and fin["avg_incremental_accuracy"] is None and fin["forgetting"] is None
    assert "joint_accuracy" not in fin
    assert m["methods"]["ecl"]["final_accuracy"] >= 0.7  # the sample's intents are easy
    report = (out / "report.md").read_text()
    assert "accuracy_vs_task.png" in report and "| ecl |" in report
    assert (out / "accuracy_vs_task.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_methods_filter_and_config_errors(config_file, tmp_path):
    res = CliRunner().invoke(app, ["cil", str(config_file), "--out", str(tmp_path / "x"), "--methods", "ecl,nope"])
    assert res.exit_code == 2 and "nope" in res.output
    bad = dict(CONFIG, primary="missing")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="bad.yaml"):
        load_cil_config(path)
    with pytest.raises(ValueError, match="tasks"):
        CILConfig.model_validate(dict(CONFIG, tasks=0))


def test_run_subset_of_methods(embedder, tmp_path):
    cfg = CILConfig.model_validate(CONFIG)
    m = run_cil(cfg, tmp_path / "r", only=["ecl"], show_progress=False)
    assert list(m["methods"]) == ["ecl"]
    with pytest.raises(ValueError, match="primary"):
        run_cil(cfg, tmp_path / "r2", only=["knn_vote"], show_progress=False)


def test_fusion_curve_recomputes_accuracy_at_other_weights():
    from iclcls.experiment.continual import fusion_curve
    from iclcls.types import Example, Prediction

    # The LM prefers b, the retriever prefers a: w=0 follows the retriever, w=1 the LM.
    trace = {"lm_score": {"a": -2.0, "b": -0.1}, "retriever_score": {"a": -1.0, "b": -9.0}}
    preds = [Prediction(labels=("a", "b"), scores=(0.0, -1.0), trace=trace)]
    curve = fusion_curve(preds, [Example("x", labels=("a",))], (0.0, 1.0))
    assert curve == {"0": 1.0, "1": 0.0}
    assert fusion_curve([Prediction(labels=("a",), scores=(0.0,), trace={})], [Example("x", labels=("a",))], (0.5,)) is None
