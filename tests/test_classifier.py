"""ICLClassifier end to end: real embedder, real data, real SmolLM2; bad input; persistence."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from scripted_lm import ScriptedLM
from typer.testing import CliRunner

from iclcls import Example, ICLClassifier, NotFittedError
from iclcls.cli import app
from iclcls.data import load_benchmark
from iclcls.experiment import subset
from iclcls.programs import knn_fusion, retrieval_icl, retriever_only


@pytest.fixture(scope="module")
def sample():
    return load_benchmark("sample")


@pytest.fixture(scope="module")
def banking(data_dir):
    b = load_benchmark("banking77_10shot", data_dir=data_dir)
    return b.train, subset(b.test, 24, 1), subset(b.validation, 16, 1)


def test_retriever_only_fit_predict_and_prediction_contents(sample):
    clf = retriever_only(shortlist_k=4).fit(sample.train)
    assert clf.fit(sample.train) is clf
    preds = clf.predict_detailed(sample.test)
    acc = np.mean([p.label == e.label for p, e in zip(preds, sample.test)])
    assert acc >= 0.7, acc
    p = preds[0]
    assert len(p.candidates) == 4 and set(p.labels) == set(p.candidates)
    assert list(p.scores) == sorted(p.scores, reverse=True)
    assert clf.predict_labels(["I lost my card"])[0] in clf.classes_


def test_predict_with_precomputed_embeddings_is_the_same(sample):
    """A pipeline may embed the next chunk ahead (``label`` on a GPU): the same predictions."""
    clf = retriever_only(shortlist_k=4).fit(sample.train)
    texts = [e.text for e in sample.test]
    emb = clf.embed_queries(texts)
    assert emb.shape == (len(texts), clf.pool_.dim)
    a, b = clf.predict_detailed(texts), clf.predict_detailed(texts, embeddings=emb)
    assert [p.labels for p in a] == [p.labels for p in b]
    assert all(np.allclose(x.scores, y.scores) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="embeddings for"):
        clf.predict_detailed(texts, embeddings=emb[:-1])


def test_save_load_round_trip_is_identical_and_atomic(sample, tmp_path):
    clf = retriever_only(shortlist_k=3).fit(sample.train)
    out = tmp_path / "state"
    clf.save(out)
    (out / "stale.txt").write_text("from an older save")
    clf.save(out)  # saving again replaces the folder whole
    assert not (out / "stale.txt").exists()
    assert {p.name for p in out.iterdir()} >= {"config.json", "pool"}
    assert not list(tmp_path.glob(".state.*")), "no temporary folders left behind"
    again = ICLClassifier.load(out)
    a, b = clf.predict_detailed(sample.test), again.predict_detailed(sample.test)
    assert [x.labels for x in a] == [x.labels for x in b]
    assert np.allclose([x.scores for x in a], [x.scores for x in b])
    assert again.get_params()["shortlist_k"] == 3


def test_load_rejects_foreign_or_corrupt_state(sample, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved ICLClassifier"):
        ICLClassifier.load(tmp_path)
    clf = retriever_only().fit(sample.train)
    clf.save(tmp_path / "s")
    cfg = tmp_path / "s" / "config.json"
    cfg.write_text(cfg.read_text()[:-20])
    with pytest.raises(ValueError, match="config.json: invalid JSON at line"):
        ICLClassifier.load(tmp_path / "s")
    clf.save(tmp_path / "s")
    d = json.loads(cfg.read_text())
    d["format"] = "something-else"
    cfg.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="format is 'something-else'"):
        ICLClassifier.load(tmp_path / "s")


def test_bad_input_is_named(sample):
    clf = retriever_only().fit(sample.train)
    with pytest.raises(ValueError, match="input 1 is empty or whitespace"):
        clf.predict_detailed(["fine", "   "])
    with pytest.raises(TypeError, match="input 0 must be a str or Example"):
        clf.predict_detailed([3])
    with pytest.raises(ValueError, match="empty label space"):
        ICLClassifier(rank="retriever").fit([])
    with pytest.raises(ValueError, match=r"example 0 has labels \['card_lost'\] that are not in the given label space"):
        ICLClassifier(rank="retriever").fit([Example("lost card", ("card_lost",))], labels=["other"])
    with pytest.raises(NotFittedError, match="not fitted"):
        ICLClassifier().predict_detailed(["x"])
    with pytest.raises(ValueError, match="need an LM"):
        ICLClassifier(rank="likelihood").fit(sample.train)
    # A query whose gold label was never seen at fit time is still classified (into known labels).
    p = clf.predict_detailed([Example("please cancel my brokerage account", ("close_brokerage",))])[0]
    assert p.label in clf.classes_ and "close_brokerage" not in clf.classes_


def test_unmappable_lm_answer_falls_back_to_retriever_order_flagged(sample):
    lm = ScriptedLM(answers=[" zzqx vvv"])
    clf = ICLClassifier(lm=lm, rank="generative", shortlist_k=3, shots=2).fit(sample.train)
    retr = retriever_only(shortlist_k=3).fit(sample.train)
    p, r = clf.predict_detailed(sample.test[:1])[0], retr.predict_detailed(sample.test[:1])[0]
    assert p.trace["unmapped_answer"] is True
    assert list(p.labels) == list(r.labels)
    assert len(p.demonstrations) == 2 and "Input: " in lm.prompts[0]


def test_multi_label_threshold_is_tuned_on_validation(embedder):
    train = [Example("python and sql developer", ("python", "sql")), Example("python scripts", ("python",)),
             Example("sql queries and reports", ("sql",)), Example("drive the truck", ("driving",)),
             Example("truck driver with python skills", ("driving", "python"))]
    clf = ICLClassifier(rank="retriever", select=None, shortlist="knn_vote", shortlist_k=3, multi_label=True)
    clf.fit(train, validation=train)
    assert "threshold" in clf.tuned_
    labels = clf.predict_labels(["python developer who writes sql"])
    assert isinstance(labels[0], tuple) and "python" in labels[0]


@pytest.mark.slow
def test_real_lm_pipeline_beats_chance_and_reports_what_it_used(smollm, banking):
    train, test, val = banking
    clf = knn_fusion(lm=smollm, shots=4, shortlist_k=10).fit(train, validation=val)
    assert 0.0 <= clf.ranker_.weight <= 1.0 and "fusion_weight" in clf.tuned_
    preds = clf.predict_detailed(test)
    lm_top = [max(p.trace["lm_score"], key=p.trace["lm_score"].get) for p in preds]
    lm_acc = np.mean([t == e.label for t, e in zip(lm_top, test)])
    assert lm_acc >= 0.4, f"SmolLM2 over a 10-label shortlist should be far above chance (0.1): {lm_acc}"
    p = preds[0]
    assert len(p.demonstrations) == 4 and p.prompt_tokens > 50
    assert all(d.label in p.candidates for d in p.demonstrations)
    assert p.trace["prompt"].endswith("Label:") and test[0].text[:30] in p.trace["prompt"]


@pytest.mark.slow
def test_text_longer_than_the_context_window_is_truncated_and_flagged(sample):
    from iclcls.lm.transformers_lm import TransformersLM

    small = TransformersLM("smollm2", context_window=160)
    clf = ICLClassifier(lm=small, shortlist_k=3, shots=4, prompt={"max_query_chars": 100_000}).fit(sample.train)
    long_text = "I want to know where my card is. " * 300
    p = clf.predict_detailed([long_text])[0]
    assert p.prompt_tokens <= 160 - clf.label_token_reserve
    assert p.trace["query_truncated_chars"] < len(long_text)
    assert p.trace["dropped_demonstrations"] == 4 and p.demonstrations == ()
    assert p.label in p.candidates


@pytest.mark.slow
def test_retrieval_icl_generative_with_real_lm(smollm, sample):
    clf = retrieval_icl(lm=smollm, shots=4, shortlist_k=4).fit(sample.train)
    preds = clf.predict_detailed(sample.test[:6])
    for p in preds:
        assert p.trace["ranker"] == "generative" and set(p.labels) >= set(p.candidates)
    mapped = sum(not p.trace.get("unmapped_answer") for p in preds)
    assert mapped >= 3, [p.trace["answer"] for p in preds]


def test_cli_fit_then_predict_round_trip(tmp_path, sample):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  benchmark: sample\n  validation_size: null\nclassifier:\n  program: retriever_only\n  shortlist_k: 3\n")
    runner = CliRunner()
    r = runner.invoke(app, ["fit", str(cfg), "--out", str(tmp_path / "st")])
    assert r.exit_code == 0, r.output
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": e.text}) + "\n" for e in sample.test[:5]))
    r = runner.invoke(app, ["predict", str(inp), "--state", str(tmp_path / "st"), "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(len(x["candidates"]) == 3 and x["labels"] for x in rows)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  benchmark: sample\nclassifier:\n  shots: -1\n")
    r = runner.invoke(app, ["fit", str(bad), "--out", str(tmp_path / "x")])
    assert r.exit_code == 78 and "classifier.shots" in r.output  # EX_CONFIG


@pytest.mark.slow
def test_demo_command_runs_offline():
    r = CliRunner().invoke(app, ["demo", "--show", "3"])
    assert r.exit_code == 0, r.output
    m = re.search(r"accuracy: pipeline ([\d.]+) \| retriever alone ([\d.]+)", r.output)
    assert m, r.output
    assert float(m[1]) >= float(m[2]), "the demo's pipeline (channel ranker, CV-tuned fusion) is at least its retriever"
    assert "examples the LM" in r.output
