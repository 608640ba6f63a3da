"""Infer-Retrieve-Rank as a DSPy program: the LM adapter (real SmolLM2), guided JSON, the
modules, compile -> save -> load with identical predictions, the served vLLM path."""

from __future__ import annotations

import json

import pytest

dspy = pytest.importorskip("dspy")

from scripted_lm import ScriptedLM  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from iclcls.cli import app  # noqa: E402
from iclcls.dspy import IReRa, Rank, dspy_lm, served_lm  # noqa: E402
from iclcls.dspy.lm import GuidedDecoder  # noqa: E402

SAMPLE_LABELS = ["card_lost", "refund_request", "change_address", "cancel_subscription", "track_order", "reset_password", "billing_error", "speak_to_agent"]


@pytest.fixture(scope="module")
def sample():
    from iclcls.data import load_benchmark

    return load_benchmark("sample")


@pytest.fixture(scope="module")
def sample_retriever(sample, embedder):
    """A kNN-vote retriever over the sample's 8 intents (the session embedder: no second load)."""
    from iclcls.classifier import ICLClassifier

    clf = ICLClassifier(lm=None, embedder=embedder, shortlist={"name": "knn_vote", "neighbors": 20}, shortlist_k=6, select=None, rank="retriever")
    return clf.fit(sample.train)


@pytest.fixture(scope="module")
def smol_dspy(smollm):
    return dspy_lm(smollm, max_tokens=16)


# -- the guided decoder and the modules' control flow (scripted LM) -----------------------------


def test_guided_decoder_writes_the_skeleton_and_ranks_enum_arrays_by_likelihood():
    lm = ScriptedLM(answers=['use Python, SQL"'], scores={'"b"': -1.0, '"a"': -3.0, '"c"': -2.0})
    schema = {
        "type": "object",
        "properties": {
            "guesses": {"type": "string"},
            "ranked": {"type": "array", "items": {"enum": ["a", "b", "c"], "type": "string"}, "maxItems": 2},
            "pick": {"enum": ["a", "b", "c"]},
        },
    }
    out = json.loads(GuidedDecoder(lm).decode("PROMPT", schema))
    assert out == {"guesses": "use Python, SQL", "ranked": ["b", "c"], "pick": "b"}
    # the array is scored as the first element after '[' with the fields before it in place
    prompt, conts = lm.score_requests[0]
    assert prompt.startswith("PROMPT{") and prompt.endswith('"ranked": [') and conts == ['"a"', '"b"', '"c"']


def test_rank_maps_to_the_label_space_counts_dropped_and_fills_in_retrieval_order():
    # without the constraint the engine still writes the JSON; the model writes the list items
    lm = dspy_lm(ScriptedLM(answers=['Track_Order", "teleport me", "refund_request"]']))
    rank = Rank(labels=SAMPLE_LABELS, constrain=False, lm=lm)
    from iclcls.dspy.modules import StepStats

    rank._stats.value = stats = StepStats()
    cands = ["card_lost", "refund_request", "track_order", "billing_error"]
    with dspy.context(adapter=dspy.JSONAdapter()):
        out = rank(text="where is my parcel", candidates=cands)
    assert out.lm_labels == ["track_order", "refund_request"]  # case-insensitive map; unknown dropped
    assert out.ranking == ["track_order", "refund_request", "card_lost", "billing_error"]
    assert out.dropped == 1 and stats.counts["rank"]["dropped"] == 1 and stats.counts["rank"]["unparsed"] == 0
    assert stats.counts["rank"]["lm_calls"] == 1


def test_unparseable_rank_answer_is_counted_and_falls_back_to_retrieval_order():
    lm = dspy_lm(ScriptedLM(answers=["I think the answer is the first one"]))
    rank = Rank(labels=SAMPLE_LABELS, constrain=False, lm=lm)
    from iclcls.dspy.modules import StepStats

    rank._stats.value = stats = StepStats()
    cands = ["card_lost", "refund_request"]
    out = rank(text="lost my card", candidates=cands)
    assert out.ranking == cands and out.lm_labels == []
    assert stats.counts["rank"]["unparsed"] == 1


# -- the real embedded model ---------------------------------------------------------------------


def test_adapter_serves_dspy_with_the_real_smollm2(smol_dspy):
    assert isinstance(smol_dspy, dspy.BaseLM)
    out = smol_dspy("The capital of France is")
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str) and out[0].strip()

    class Guess(dspy.Signature):
        """List the topics of the text, comma-separated."""

        text: str = dspy.InputField()
        topics: str = dspy.OutputField()

    with dspy.context(lm=smol_dspy, adapter=dspy.JSONAdapter()):
        pred = dspy.Predict(Guess)(text="I want my money back for the broken phone")
    assert isinstance(pred.topics, str)  # the JSON always parses: the engine writes the skeleton
    assert smol_dspy.engine.guided_calls >= 1


def test_constrained_rank_outputs_are_always_candidate_labels(smol_dspy, sample, sample_retriever):
    program = IReRa(sample_retriever, rank=Rank(max_labels=3), retrieve_k=6, rank_lm=smol_dspy)
    texts = [ex.text for ex in sample.test[:3]] + ["asdf qwerty zxcv"]  # nonsense too
    for text in texts:
        out = program(text=text)
        assert out.lm_labels, "with the constraint on, Rank always returns labels"
        assert set(out.lm_labels) <= set(out.candidates) and len(out.lm_labels) <= 3
        assert sorted(out.ranking) == sorted(out.candidates)
    s = program.stats.summary()
    assert s["rank"]["unparsed_share"] == 0.0 and s["rank"]["dropped"] == 0
    assert s["rank"]["lm_calls_per_input"] == 1.0


# -- compile, save, load -----------------------------------------------------------------------------


def _tiny_config(tmp_path, **optimizer):
    from iclcls.dspy.compile import load_compile_config

    cfg = {
        "data": {"benchmark": "sample", "validation_size": 10},
        "classifier": {
            "program": "dspy_irera",
            "compiled": str(tmp_path / "prog"),
            "dspy": {
                "retrieve": {"shortlist": {"name": "knn_vote", "neighbors": 20}, "k": 6},
                "infer": {"lm": "smollm2", "max_tokens": 8},
                "rank": {"lm": "smollm2", "max_tokens": 8, "max_labels": 3},
                "optimizer": {"name": "bootstrap_random_search", "num_candidate_programs": 1, "seeds": [-1], "train_size": 2, "val_size": 2, "cache": False, **optimizer},
            },
        },
    }
    path = tmp_path / "cfg.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path, load_compile_config(path)


@pytest.mark.slow
def test_tiny_program_compiles_saves_and_reloads_with_identical_predictions(smollm, sample, tmp_path):
    from iclcls.dspy.classifier import DSPyIReRaClassifier
    from iclcls.dspy.compile import LMPool, compile_program, load_compiled, save_compiled

    path, cfg = _tiny_config(tmp_path)
    lms = LMPool(backends={"smollm2": smollm})
    compiled, report = compile_program(cfg, lms=lms, log=lambda m: None)
    assert [c["seed"] for c in report["candidates"]] == [-1] and report["train"] == 2 and report["val"] == 2
    assert report["lm_calls"]["infer"] > 0 and report["lm_calls"]["rank"] > 0
    demos = {name: len(p.demos) for name, p in compiled.named_predictors()}
    assert demos == {"infer.predict": demos["infer.predict"], "rank.predict": demos["rank.predict"]}
    assert 1 <= demos["rank.predict"] <= 2  # bootstrapped from the train examples

    out = save_compiled(compiled, cfg.classifier.dspy, tmp_path / "prog", info={"report": report})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "program.json", "retriever"]
    state = json.loads((out / "program.json").read_text())  # DSPy's JSON state: plain data
    assert len(state["rank.predict"]["demos"]) == demos["rank.predict"]
    assert not list(out.rglob("*.pkl"))

    loaded = load_compiled(out, lms=lms)
    assert {n: len(p.demos) for n, p in loaded.named_predictors()} == demos
    texts = [ex.text for ex in sample.test[:2]]
    before = [compiled(text=t) for t in texts]
    after = [loaded(text=t) for t in texts]
    assert [b.ranking for b in before] == [a.ranking for a in after]
    assert [b.guesses for b in before] == [a.guesses for a in after]

    # the same folder as a classifier for the eval harness
    clf = DSPyIReRaClassifier(compiled=str(out), lm="smollm2")
    clf._pool = lms
    preds = clf.fit().predict(texts[:1])
    assert list(preds[0].labels) == before[0].ranking and set(preds[0].candidates) == set(before[0].candidates)
    assert preds[0].trace["lm_calls"] == {"infer": 1, "retrieve": 0, "rank": 1}
    assert clf.decide(preds[0]) and set(clf.decide(preds[0])) <= set(preds[0].candidates)


def test_compile_command_reports_bad_configs(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["compile", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "not found" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {benchmark: sample}\nclassifier: {program: dspy_irera, dspy: {optimizer: {name: sgd}}}\n")
    res = runner.invoke(app, ["compile", str(bad), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "classifier.dspy.optimizer.name" in res.output


def test_loading_refuses_foreign_folders_and_unknown_options(tmp_path):
    from iclcls.dspy.classifier import DSPyIReRaClassifier
    from iclcls.dspy.compile import load_compiled

    with pytest.raises(FileNotFoundError, match="not a compiled DSPy program"):
        load_compiled(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="format"):
        load_compiled(tmp_path)
    with pytest.raises(ValueError, match="do not apply"):
        DSPyIReRaClassifier.from_spec({"program": "dspy_irera", "compiled": "x", "shots": 4})
    with pytest.raises(ValueError, match="needs classifier.compiled"):
        DSPyIReRaClassifier().fit()


# -- the served path: dspy.LM on the local vLLM server with guided JSON ------------------------------


@pytest.mark.slow
def test_served_rank_is_restricted_to_candidates_by_guided_decoding(openai_lm, sample, sample_retriever):
    lm = served_lm(openai_lm.base_url, openai_lm.model, max_tokens=48)
    program = IReRa(sample_retriever, rank=Rank(max_labels=3), retrieve_k=6, rank_lm=lm)
    for ex in sample.test[:3]:
        out = program(text=ex.text)
        assert out.lm_labels and set(out.lm_labels) <= set(out.candidates)
    sent = lm.history[-1]["kwargs"].get("response_format")
    assert sent is not None, "DSPy sent no JSON schema to the server"
    schema = sent.model_json_schema() if hasattr(sent, "model_json_schema") else sent
    field = schema["properties"]["ranked_labels"]
    assert set(field["items"]["enum"]) == set(out.candidates) and field["maxItems"] == 3
    assert program.stats.summary()["rank"]["unparsed_share"] == 0.0


def test_eval_harness_builds_the_adapter_from_the_classifier_section():
    from iclcls.config import ClassifierConfig
    from iclcls.dspy.classifier import DSPyIReRaClassifier
    from iclcls.experiment.fit import build_classifier

    section = ClassifierConfig(program="dspy_irera", compiled="runs/x", dspy={"rank": {"max_labels": 5}}, top_k=3, tune=True)
    clf = build_classifier(section, quiet=True)
    assert isinstance(clf, DSPyIReRaClassifier) and clf.compiled == "runs/x" and clf.top_k == 3
    assert clf.show_progress is False
