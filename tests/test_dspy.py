"""Infer-Retrieve-Rank as a DSPy program: the LM adapter (real SmolLM2), guided JSON, the
modules, compile -> save -> load with identical predictions, the served vLLM path."""

from __future__ import annotations

import json

import pytest

dspy = pytest.importorskip("dspy")

from scripted_lm import ScriptedLM  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from iclcls.cli import app  # noqa: E402
from iclcls.metrics import one_se_choice  # noqa: E402
from iclcls.programs.dspy import Infer, IReRa, Rank, dspy_lm, served_lm  # noqa: E402
from iclcls.programs.dspy.lm import GuidedDecoder  # noqa: E402
from iclcls.rank.fusion import fuse_rankings  # noqa: E402

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
    from iclcls.programs.dspy.modules import StepStats

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
    from iclcls.programs.dspy.modules import StepStats

    rank._stats.value = stats = StepStats()
    cands = ["card_lost", "refund_request"]
    out = rank(text="lost my card", candidates=cands)
    assert out.ranking == cands and out.lm_labels == []
    assert stats.counts["rank"]["unparsed"] == 1


# -- honest compiling: the one-SE rule, rank fusion, the decision in the saved program ------------


def test_one_se_rule_keeps_the_simpler_candidate_unless_a_richer_one_is_better_beyond_noise():
    import numpy as np

    rng = np.random.default_rng(0)
    simple = rng.uniform(0, 1, 60)
    noisy_gain = simple + np.tile([0.32, -0.28], 30)  # +0.02 on average, SE of the difference 0.04
    assert noisy_gain.mean() > simple.mean()
    pick, rows = one_se_choice([simple, noisy_gain])
    assert pick == 0 and rows[0]["gap_to_best"] <= rows[0]["se_of_gap"]
    clear_gain = simple + 0.1 + rng.normal(0, 0.05, 60)  # better on nearly every example
    pick, rows = one_se_choice([simple, noisy_gain, clear_gain])
    assert pick == 2 and rows[0]["gap_to_best"] > rows[0]["se_of_gap"]
    # an ineligible candidate is never the pick, even when it is best
    assert one_se_choice([simple, clear_gain], eligible=[True, False])[0] == 0
    # ties go to the simpler candidate
    assert one_se_choice([simple, simple.copy()])[0] == 0


def test_rank_fusion_at_weight_zero_is_the_retriever_list_and_keeps_every_label():
    text, guesses = ["a", "b", "c"], ["x", "c", "y"]
    assert fuse_rankings(text, guesses, 0.0) == ["a", "b", "c", "x", "y"]
    assert fuse_rankings(text, guesses, 1.0) == ["x", "c", "y", "a", "b"]
    mid = fuse_rankings(text, guesses, 0.5)
    assert set(mid) == {"a", "b", "c", "x", "y"} and mid[0] == "c"  # in both lists: first
    with pytest.raises(ValueError):
        fuse_rankings(text, guesses, 1.5)


def _scripted_program(sample_retriever, *, guess: str = "weather forecast for the weekend"):
    """IReRa on the sample intents with a scripted LM: Infer writes ``guess`` whatever the
    text; Rank's likelihoods prefer the shortest label (control flow only, not a model)."""
    lm = dspy_lm(ScriptedLM(answers=[guess + '"']))
    program = IReRa(sample_retriever, infer=Infer(), rank=Rank(max_labels=3), retrieve_k=6, infer_lm=lm, rank_lm=lm)
    return program, lm


def test_compiler_turns_off_useless_steps_and_the_saved_program_keeps_the_decision(sample, sample_retriever, tmp_path):
    from iclcls.programs.dspy.compile import ProgramOptions, load_compiled, save_compiled
    from iclcls.programs.dspy.select import HonestCompiler

    program, lm = _scripted_program(sample_retriever)
    compiler = HonestCompiler(program, sample.train[:24], demo_counts=[0], weight_grid=[0, 0.5, 1], metric_k=1, threads=4)
    with dspy.context(adapter=dspy.JSONAdapter()):
        chosen, decision = compiler.compile()
    assert decision["weights"] == {"infer": 0.0, "rank": 0.0}, decision["why"]
    assert (chosen.infer_weight, chosen.rank_weight) == (0.0, 0.0)
    cand = decision["candidates"][0]
    assert decision["pick"] == "zero-shot" and decision["n"] == 24 and "Infer off" in decision["why"]
    curve = cand["weight_curves"]["infer"]
    assert curve["grid"] == [0.0, 0.5, 1.0] and curve["rp@1"][0] >= max(curve["rp@1"][1:]) - 1e-9
    assert set(cand["rp@1"]) == {"mean", "se", "ci95"} and cand["rp@1"]["ci95"][0] <= cand["rp@1"]["mean"] <= cand["rp@1"]["ci95"][1]

    # weight 0 turns a step off: the compiled program is its retriever and calls no LM
    calls = lm.engine.calls
    out = chosen(text=sample.test[0].text)
    assert lm.engine.calls == calls and out.guesses == [] and out.lm_labels == []
    assert out.ranking == chosen.retrieve.lists(sample.test[0].text)[0]

    opts = ProgramOptions.model_validate({
        "retrieve": {"shortlist": {"name": "knn_vote", "neighbors": 20}, "k": 6},
        "rank": {"max_labels": 3},
        "optimizer": {"name": "one_se", "demo_counts": [0]},
    })
    folder = save_compiled(chosen, opts, tmp_path / "prog", info={"report": {"decision": decision}})
    saved = json.loads((folder / "config.json").read_text())
    assert saved["decision"]["pick"] == "zero-shot" and saved["weights"] == {"infer": 0.0, "rank": 0.0}
    loaded = load_compiled(folder, attach=False, retriever=sample_retriever)
    assert loaded.decision == json.loads(json.dumps(decision)) and (loaded.infer_weight, loaded.rank_weight) == (0.0, 0.0)
    assert not loaded.uses_infer and not loaded.uses_rank


def test_infer_fusion_keeps_every_candidate_of_the_sentence(sample_retriever, sample):
    program, _ = _scripted_program(sample_retriever)
    text = sample.test[0].text
    from_text, from_guesses = program.retrieve.lists(text, ["weather forecast"])
    for w in (0.25, 1.0):
        program.set_weights(infer=w, rank=0.0)
        out = program(text=text)
        assert set(from_text) <= set(out.candidates) and set(from_guesses) <= set(out.candidates)
    with pytest.raises(ValueError):
        program.set_weights(rank=2.0)


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


def test_coalesced_generations_from_threads_equal_one_at_a_time(smollm):
    """Threads' generations are batched into one call, with the answers of separate calls."""
    from iclcls.programs.dspy.lm import coalescing
    from iclcls.programs.dspy.modules import map_threads

    lm = coalescing(smollm)
    assert coalescing(smollm) is lm and lm.tokenizer is smollm.tokenizer
    prompts = ["Skills: Python, SQL and", "The capital of France is", "Refund my order because"]
    alone = [smollm.generate([p], max_tokens=6, temperature=0.0, stop=["\n"])[0] for p in prompts]
    lm.batches.clear()
    together = map_threads(lambda p: lm.generate([p], max_tokens=6, temperature=0.0, stop=["\n"])[0], prompts, threads=3)
    assert together == alone and sum(lm.batches) == 3 and max(lm.batches) >= 2


def test_honest_compile_runs_on_the_real_smollm2(smol_dspy, sample, sample_retriever):
    """A short real run of the compiler's control flow: zero-shot only, 4 sentences (11 s on busy cores)."""
    from iclcls.programs.dspy.select import HonestCompiler

    program = IReRa(sample_retriever, infer=Infer(max_guesses=3), rank=Rank(max_labels=3), retrieve_k=6, infer_lm=smol_dspy, rank_lm=smol_dspy)
    with dspy.context(adapter=dspy.JSONAdapter()):
        chosen, decision = HonestCompiler(program, sample.train[:4], demo_counts=[0], weight_grid=[0, 1], threads=4).compile()
    assert decision["candidates"][0]["unparsed"] == 0
    assert set(decision["weights"]) == {"infer", "rank"} and all(w in (0.0, 1.0) for w in decision["weights"].values())
    assert program.stats.counts["infer"]["lm_calls"] == 4 and program.stats.counts["rank"]["lm_calls"] == 4


# -- compile, save, load -----------------------------------------------------------------------------


def _tiny_config(tmp_path, **optimizer):
    from iclcls.experiment.compile import load_compile_config

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
    from iclcls.experiment.compile import compile_program
    from iclcls.programs.dspy.classifier import DSPyIReRaClassifier
    from iclcls.programs.dspy.compile import LMPool, load_compiled, save_compiled

    path, cfg = _tiny_config(tmp_path)
    lms = LMPool(backends={"smollm2": smollm})
    compiled, report = compile_program(cfg, lms=lms, log=lambda m: None)
    assert [c["seed"] for c in report["candidates"]] == [-1] and report["train"] == 2 and report["val"] == 2
    assert report["weights"] == {"infer": 0.5, "rank": 0.5}  # the configured weights: this optimizer does not pick them
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
    preds = clf.fit().predict_detailed(texts[:1])
    assert list(preds[0].labels) == before[0].ranking and set(preds[0].candidates) == set(before[0].candidates)
    assert preds[0].trace["lm_calls"] == {"infer": 1, "retrieve": 0, "rank": 1}
    assert clf.decide(preds[0]) and set(clf.decide(preds[0])) <= set(preds[0].candidates)


def test_compile_command_reports_bad_configs(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["compile", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 66 and "not found" in res.output  # EX_NOINPUT
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {benchmark: sample}\nclassifier: {program: dspy_irera, dspy: {optimizer: {name: sgd}}}\n")
    res = runner.invoke(app, ["compile", str(bad), "--out", str(tmp_path / "x")])
    assert res.exit_code == 78 and "classifier.dspy.optimizer.name" in res.output  # EX_CONFIG


def test_loading_refuses_foreign_folders_and_unknown_options(tmp_path):
    from iclcls.programs.dspy.classifier import DSPyIReRaClassifier
    from iclcls.programs.dspy.compile import load_compiled

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
    from iclcls.experiment.config import ClassifierConfig
    from iclcls.experiment.fit import build_classifier
    from iclcls.programs.dspy.classifier import DSPyIReRaClassifier

    section = ClassifierConfig(program="dspy_irera", compiled="runs/x", dspy={"rank": {"max_labels": 5}}, top_k=3, tune=True)
    clf = build_classifier(section, quiet=True)
    assert isinstance(clf, DSPyIReRaClassifier) and clf.compiled == "runs/x" and clf.top_k == 3
    assert clf.show_progress is False
