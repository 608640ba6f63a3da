"""A saved state is untrusted input: schema checks, and poisoned states refused with a reason.

Each test copies one real fitted state (real embedder, real faiss) and edits it the way a
stranger handing over a state folder could; ``load`` must refuse, say what and why, and
load again with ``trust=True`` or an override where the edit is not a corruption.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from scripted_lm import ScriptedLM
from typer.testing import CliRunner

from iclcls import ICLClassifier, UntrustedStateError
from iclcls.data import load_benchmark
from iclcls.programs import retriever_only


@pytest.fixture(scope="module")
def sample():
    return load_benchmark("sample")


@pytest.fixture(scope="module")
def saved(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "state"
    retriever_only(shortlist_k=3).fit(sample.train).save(out)
    return out


@pytest.fixture
def state(saved, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(saved, d)
    return d


def edit(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def set_params(d, **params):
    edit(d, lambda c: c["params"].update(params))


def test_clean_state_loads_and_predicts(state, sample):
    clf = ICLClassifier.load(state)
    assert clf.predict_detailed(sample.test[:2])[0].labels


def test_openai_endpoint_refused_unless_trusted_or_overridden(state):
    set_params(state, lm="openai:x@http://203.0.113.9:8000", rank="likelihood")
    with pytest.raises(UntrustedStateError, match=r"lm 'openai:x@http://203\.0\.113\.9:8000' is an LM endpoint") as e:
        ICLClassifier.load(state)
    assert "trust=True" in str(e.value) and "--trust-state" in str(e.value) and "lm=" in str(e.value)
    assert isinstance(e.value, ValueError)  # documented: a ValueError subclass
    lm = ScriptedLM()
    assert ICLClassifier.load(state, lm=lm).lm_ is lm  # the caller's override needs no trust
    trusted = ICLClassifier.load(state, trust=True)  # the caller trusts it: the client is built
    assert "203.0.113.9:8000" in trusted.lm_.api_base


@pytest.mark.parametrize(
    "spec, why",
    [
        ("/tmp/some/model_dir", "filesystem path"),
        ("vllm:/tmp/some/model_dir", "filesystem path"),
        ("hf:../weights", "filesystem path"),
        ("model.gguf", "filesystem path"),
        ("totally-unknown-model", "not a registry model name"),
        ("openai:gpt@https://api.example.com/v1+cache", "LM endpoint"),
    ],
)
def test_lm_paths_and_unknown_names_refused(state, spec, why):
    set_params(state, lm=spec)
    with pytest.raises(UntrustedStateError, match=why):
        ICLClassifier.load(state)


@pytest.mark.parametrize("spec", ["smollm2", "gemma3-270m", "vllm:smollm2", "smollm2+cache", "hf:smollm2"])
def test_registry_model_names_are_fine(state, spec):
    set_params(state, lm=spec)  # the retriever ranker needs no LM: nothing is loaded
    assert ICLClassifier.load(state).get_params()["lm"] == spec


def test_file_path_in_stage_options_refused(state, tmp_path):
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "x", "label": "y"}\n')
    set_params(state, select={"name": "influence", "validation": str(secret)})
    with pytest.raises(UntrustedStateError, match=r"select\.validation .*secret\.jsonl' is a file path"):
        ICLClassifier.load(state)
    set_params(state, select={"name": "knn", "extra": {"deep": ["ok", "../../etc/passwd"]}})
    with pytest.raises(UntrustedStateError, match=r"select\.extra\.deep\[1\]"):
        ICLClassifier.load(state)


def test_template_file_refused_and_sandboxed_when_trusted(state, tmp_path, sample):
    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    set_params(state, prompt={"template": str(evil)}, rank="likelihood", shots=0)
    with pytest.raises(UntrustedStateError, match=r"prompt\.template .*evil\.jinja' is not a packaged template"):
        ICLClassifier.load(state)
    with pytest.raises(UntrustedStateError, match="not a packaged template"):
        ICLClassifier.load(state, lm=ScriptedLM())  # an LM override does not vouch for the template
    # Trusted, the template is used, but it renders in the sandbox: no Python internals.
    from jinja2.exceptions import SecurityError

    clf = ICLClassifier.load(state, lm=ScriptedLM(), trust=True)
    with pytest.raises(SecurityError):
        clf.predict_detailed(sample.test[:1])
    set_params(state, prompt={"summary_options": {"template": "../x"}})
    with pytest.raises(UntrustedStateError, match=r"prompt\.summary_options\.template"):
        ICLClassifier.load(state)


def test_packaged_template_name_is_fine(state):
    set_params(state, prompt={"template": "classify_demos_first"})
    assert ICLClassifier.load(state).builder_.template == "classify_demos_first"


def test_embedder_path_refused(state, tmp_path):
    set_params(state, embedder=str(tmp_path))
    with pytest.raises(UntrustedStateError, match="embedder .* is a local path"):
        ICLClassifier.load(state)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda c: c["params"].update(shots="8"), "params.shots"),
        (lambda c: c["params"].update(evil_option=1), "params.evil_option"),
        (lambda c: c.update(run_this="rm -rf /"), "run_this"),
        (lambda c: c.update(version=0), "version"),
        (lambda c: c.update(summaries={"a": 3}), "summaries.a"),
        (lambda c: c.update(stages={"select": {"meta": {}, "arrays": ["../../../tmp/x"]}}), "stages.select.arrays.0"),
        (lambda c: c.update(stages={"../x": None}), "stages"),
        (lambda c: c.pop("embedder_name"), "embedder_name"),
    ],
)
def test_schema_names_the_bad_field(state, mutate, field):
    edit(state, mutate)
    with pytest.raises(ValueError, match=rf"field {field.replace('.', '[.]')}\b") as e:
        ICLClassifier.load(state)
    assert "config.json" in str(e.value)


def test_ranker_state_cannot_set_arbitrary_attributes(state):
    edit(state, lambda c: c.update(ranker_state={"needs_lm": True}))
    with pytest.raises(ValueError, match=r"ranker_state: keys \['needs_lm'\]"):
        ICLClassifier.load(state)


def test_faiss_index_checked_against_recorded_size_and_sha256(state):
    idx = state / "pool" / "index.faiss"
    meta_path = state / "pool" / "index.faiss.json"
    meta = json.loads(meta_path.read_text())
    assert meta["file_bytes"] == idx.stat().st_size
    assert meta["file_sha256"] == hashlib.sha256(idx.read_bytes()).hexdigest()
    data = bytearray(idx.read_bytes())
    data[-5] ^= 0xFF
    idx.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="the file was changed or damaged"):
        ICLClassifier.load(state)
    with pytest.raises(ValueError, match="changed or damaged"):
        ICLClassifier.load(state, trust=True)  # trust does not accept a damaged file


def test_faiss_index_without_checksum_needs_trust(state):
    meta_path = state / "pool" / "index.faiss.json"
    meta = json.loads(meta_path.read_text())
    del meta["file_bytes"], meta["file_sha256"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="refusing to parse an unverified faiss file"):
        ICLClassifier.load(state)
    assert ICLClassifier.load(state, trust=True).pool_.index is not None


def test_symlinked_state_file_refused(state, tmp_path):
    idx = state / "pool" / "index.faiss"
    elsewhere = tmp_path / "other.faiss"
    shutil.move(idx, elsewhere)
    idx.symlink_to(elsewhere)
    with pytest.raises(UntrustedStateError, match=r"pool/index\.faiss is a symbolic link"):
        ICLClassifier.load(state)


def test_cli_predict_refuses_untrusted_state_and_trust_flag_lets_it_load(state, tmp_path):
    from iclcls.cli import app

    set_params(state, lm="./local-weights")  # unused by the retriever ranker, still refused
    inputs = tmp_path / "in.txt"
    inputs.write_text("I lost my card\n")
    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(inputs), "--state", str(state)])
    assert res.exit_code != 0 and "untrusted state" in res.output and "--trust-state" in res.output
    out = tmp_path / "preds.jsonl"
    res = runner.invoke(app, ["predict", str(inputs), "--state", str(state), "--trust-state", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text().splitlines()[0])["labels"]


def test_untrusted_flat_index_is_rebuilt_from_embeddings_not_parsed(state, sample, monkeypatch):
    import faiss

    # A poisoner can rewrite index.faiss AND its recorded checksum: an untrusted load must not parse it.
    idx = state / "pool" / "index.faiss"
    meta_path = state / "pool" / "index.faiss.json"
    junk = b"IxMp" + bytes(range(256)) * 4
    meta = json.loads(meta_path.read_text())
    meta.update(file_bytes=len(junk), file_sha256=hashlib.sha256(junk).hexdigest())
    idx.write_bytes(junk)
    meta_path.write_text(json.dumps(meta))
    calls = []
    monkeypatch.setattr(faiss, "deserialize_index", lambda *a: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    clf = ICLClassifier.load(state)
    assert not calls  # the bytes were never handed to faiss
    assert clf.predict_detailed(sample.test[:3])[0].labels
    monkeypatch.undo()
    with pytest.raises(ValueError, match="not a faiss index"):
        ICLClassifier.load(state, trust=True)  # trusted: parsed, and the junk is caught


# -- round 2: the embedder is an allow-list; an HNSW index is rebuilt, its sidecar bounded ----------------


@pytest.mark.parametrize("spec", ["st:../models", "st:./x", "clip:../x", "st:/abs", "/abs/model", "clip:/m"])
def test_embedder_paths_behind_a_prefix_are_refused(state, spec):
    set_params(state, embedder=spec)
    with pytest.raises(UntrustedStateError, match=rf"embedder '{spec}' is a local path"):
        ICLClassifier.load(state)


@pytest.mark.parametrize("spec", ["org/some-model", "clip:openai/clip-vit-base-patch32", "pixels:../x", "st:some-hub-model"])
def test_embedder_names_not_on_the_allow_list_are_refused(state, spec):
    set_params(state, embedder=spec)
    with pytest.raises(UntrustedStateError, match=rf"embedder '{spec}' is not a known offline embedder"):
        ICLClassifier.load(state)


def test_known_embedder_names_and_an_override_load(state, sample):
    from iclcls.embed import get_embedder, is_known_embedder

    assert all(map(is_known_embedder, ["default", "st:all-MiniLM-L6-v2", "all-MiniLM-L6-v2", "mpnet", "pixels", "pixels:8x8:RGB"]))
    set_params(state, embedder="st:all-MiniLM-L6-v2")
    assert ICLClassifier.load(state).predict_detailed(sample.test[:1])[0].labels
    set_params(state, embedder="st:../models")
    assert ICLClassifier.load(state, embedder=get_embedder("default")).predict_detailed(sample.test[:1])[0].labels


@pytest.fixture
def hnsw_state(sample, tmp_path):
    clf = retriever_only(shortlist="knn_vote", shortlist_k=3).fit(sample.train, tune="none")
    clf.pool_.index.rebuild("hnsw")
    d = tmp_path / "hnsw"
    clf.save(d)
    return d, clf


def test_untrusted_hnsw_index_is_rebuilt_from_embeddings_not_parsed(hnsw_state, sample, monkeypatch):
    import faiss

    state, clf = hnsw_state
    meta_path = state / "pool" / "index.faiss.json"
    assert json.loads(meta_path.read_text())["kind"] == "hnsw"
    junk = b"IHNf" + bytes(range(256)) * 8  # a poisoned graph, with a checksum to match
    (state / "pool" / "index.faiss").write_bytes(junk)
    meta = json.loads(meta_path.read_text())
    meta.update(file_bytes=len(junk), file_sha256=hashlib.sha256(junk).hexdigest())
    meta_path.write_text(json.dumps(meta))
    calls = []
    monkeypatch.setattr(faiss, "deserialize_index", lambda *a: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    back = ICLClassifier.load(state)
    assert not calls and back.pool_.index.kind == "hnsw" and len(back.pool_.index) == len(clf.pool_)
    assert [p.labels for p in back.predict_detailed(sample.test[:5])] == [p.labels for p in clf.predict_detailed(sample.test[:5])]


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("hnsw_m", 10**9, r"hnsw_m is 1000000000; expected an integer in \[2, 256\]"),
        ("hnsw_m", True, "hnsw_m is True"),
        ("ef_search", -1, "ef_search is -1"),
        ("ef_construction", "80", "ef_construction is '80'"),
        ("dim", 2**31, "dim is"),
        ("ntotal", -5, "ntotal is -5"),
        ("compact_fraction", float("nan"), "compact_fraction is nan"),
        ("deleted_ids", [1, 1], "deleted_ids holds duplicates"),
        ("deleted_ids", list(range(10**4)), "deleted_ids must be a list of at most"),
        ("deleted_ids", ["0"], "deleted_ids must hold integers"),
        ("kind", "ivf", "kind 'ivf' is not"),
    ],
)
def test_index_sidecar_numbers_are_bounded(hnsw_state, field, value, match):
    state, _ = hnsw_state
    meta_path = state / "pool" / "index.faiss.json"
    meta = json.loads(meta_path.read_text())
    meta[field] = value
    meta_path.write_text(json.dumps(meta))
    for trust in (False, True):
        with pytest.raises(ValueError, match=match):
            ICLClassifier.load(state, trust=trust)


def test_untrusted_rebuild_leaves_out_deleted_ids(tmp_path):
    import numpy as np

    from iclcls.index import VectorIndex

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(40, 8)).astype(np.float32)
    idx = VectorIndex(8, exact_threshold=10)
    idx.add(vecs)
    assert idx.kind == "hnsw"
    idx.remove([3, 7])
    idx.save(tmp_path / "i")
    back = VectorIndex.load(tmp_path / "i", require_checksum=True, rebuild_from=vecs)
    assert back.kind == "hnsw" and sorted(back.ids.tolist()) == sorted(set(range(40)) - {3, 7})
    assert back.search(vecs[5], 1)[1][0, 0] == 5 and 3 not in back.search(vecs[3], 5)[1][0]


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_config_json_is_strict_json_and_infinities_round_trip(sample, tmp_path):
    import math

    clf = retriever_only(shortlist_k=3).fit(sample.train)
    clf.tuned_.setdefault("conformal", {"n": 1, "kind": "single", "scores": []})["scores"].append(math.inf)  # a missed gold
    d = tmp_path / "st"
    clf.save(d)
    for f in d.rglob("*.json"):
        _strict(f.read_text())  # every JSON file of the state, not only config.json
    back = ICLClassifier.load(d)
    assert back.tuned_["conformal"]["scores"][-1] == math.inf and back.tuned_ == clf.tuned_
    cfg = json.loads((d / "config.json").read_text())  # a state saved before: a bare Infinity still loads
    cfg["tuned"]["conformal"]["scores"][-1] = math.inf
    (d / "config.json").write_text(json.dumps(cfg))
    assert "Infinity" in (d / "config.json").read_text()
    assert ICLClassifier.load(d).tuned_["conformal"]["scores"][-1] == math.inf


def test_the_options_are_declared_in_step():
    """The constructor (scikit-learn reads it), the state schema and the YAML config's classifier
    section name the same options, so a new option cannot be saved but not loaded."""
    import inspect
    from typing import Any

    from iclcls.classifier.trust import _state_models
    from iclcls.experiment.config import ClassifierConfig

    init = set(inspect.signature(ICLClassifier.__init__).parameters) - {"self"}
    params, _ = _state_models(ICLClassifier)
    assert set(params.model_fields) == init
    untyped = [n for n, f in params.model_fields.items() if f.annotation is Any]
    assert not untyped, f"give {untyped} a JSON type in the state schema (classifier/trust.py)"
    config_only = {"program", "tune", "compiled", "dspy"}  # presets, tuning, the DSPy program's folder
    assert set(ClassifierConfig.model_fields) - config_only <= init
