"""CPU embedder backends (``minilm@onnx``, ``@onnx-int8``, ``@openvino``, ``@openvino-int8``, ``@static``).

Real models, no mocks: each backend is exported from the packaged all-MiniLM-L6-v2 into
iclcls's cache (offline; the conftest shares that folder across sessions, so only the first
run pays the export) and compared with the float32 PyTorch embeddings of real sentences.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from iclcls import ICLClassifier, UntrustedStateError
from iclcls.data import load_benchmark
from iclcls.embed import get_embedder, is_known_embedder
from iclcls.embed.specs import BACKENDS, parse_backend_spec
from iclcls.programs import retriever_only

pytest.importorskip("onnxruntime")

# Lowest cosine to float32 (mean, min) each backend must keep on the sample sentences, with
# margin under what was measured (eval/results/bench_embedders.json has the full test sets):
# float32 exports measured 1.00000 / 0.99999; onnx-int8 0.994 / 0.979; openvino-int8 0.996 / 0.969.
FLOOR = {"onnx": (0.999, 0.99), "openvino": (0.999, 0.99), "onnx-int8": (0.98, 0.95), "openvino-int8": (0.98, 0.94)}


@pytest.fixture(scope="session")
def sample():
    return load_benchmark("sample")


@pytest.fixture(scope="session")
def sentences(sample) -> list[str]:
    return [ex.text for ex in sample.train + sample.test]


@pytest.fixture(scope="session")
def fp32(sentences) -> np.ndarray:
    return get_embedder("minilm", cache=False).encode(sentences)


@pytest.mark.parametrize("backend", sorted(FLOOR))
def test_backend_matches_float32(backend, sentences, fp32):
    emb = get_embedder(f"minilm@{backend}", cache=False)
    assert emb.name == f"st:all-MiniLM-L6-v2@{backend}"
    vecs = emb.encode(sentences)
    assert vecs.shape == fp32.shape and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    cos = (vecs * fp32).sum(1)
    mean_floor, min_floor = FLOOR[backend]
    assert cos.mean() >= mean_floor and cos.min() >= min_floor, (cos.mean(), cos.min())
    # padding is masked out: float32 gives a text the same vector alone or in a batch; dynamic
    # int8 quantises activations with each batch's range, so there it only stays close
    one = np.stack([emb.encode([t])[0] for t in sentences[:8]])
    if "int8" in backend:
        assert (one * vecs[:8]).sum(1).min() >= 0.97
    else:
        np.testing.assert_allclose(one, vecs[:8], atol=1e-5)


def test_export_is_cached_by_source_hash_and_reused(sentences):
    from iclcls import embed
    from iclcls.embed.export import ensure_export, export_dir, read_manifest
    from iclcls.embed.source import describe

    source = describe(embed.default_model_path())
    folder = ensure_export(source, "onnx")
    assert folder == export_dir(source, "onnx") and source.digest[:16] in str(folder)
    manifest = read_manifest(folder)
    assert manifest["source_digest"] == source.digest and manifest["pooling"] == "mean" and manifest["dim"] == 384
    mtime = (folder / "model.onnx").stat().st_mtime_ns
    assert ensure_export(source, "onnx") == folder and (folder / "model.onnx").stat().st_mtime_ns == mtime


def test_exported_embedder_starts_without_torch(sentences):
    """An exported backend needs only onnxruntime and tokenizers at run time (fast start-up)."""
    import subprocess
    import sys

    get_embedder("minilm@onnx-int8", cache=False).encode(sentences[:1])  # export made beforehand
    code = (
        "import sys; from iclcls.embed import get_embedder; "
        "v = get_embedder('minilm@onnx-int8', cache=False).encode(['hello']); "
        "print(v.shape, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "False", out.stdout


def test_specs_parse_and_are_on_the_allow_list():
    assert parse_backend_spec("minilm@onnx-int8") == ("minilm", "onnx-int8")
    assert parse_backend_spec("st:all-MiniLM-L6-v2@openvino") == ("all-MiniLM-L6-v2", "openvino")
    assert parse_backend_spec("minilm") is None and parse_backend_spec("folder@v2") is None
    with pytest.raises(ValueError, match="names no model"):
        parse_backend_spec("@onnx")
    for backend in BACKENDS:
        assert is_known_embedder(f"minilm@{backend}") and is_known_embedder(f"st:all-MiniLM-L6-v2@{backend}")
    for spec in ("/tmp/model@onnx", "./m@onnx-int8", "org/model@onnx", "minilm@nope"):
        assert not is_known_embedder(spec)
    with pytest.raises(ValueError, match="neither an offline alias"):
        get_embedder("no-such-model@onnx")


def test_torch_backend_is_the_plain_embedder():
    assert get_embedder("minilm@torch", cache=False).name == get_embedder("minilm", cache=False).name == "st:all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def int8_state(sample, tmp_path_factory):
    clf = retriever_only(shortlist="knn_vote", shortlist_k=3, embedder="minilm@onnx-int8").fit(sample.train, tune="none")
    out = tmp_path_factory.mktemp("int8") / "state"
    clf.save(out)
    return out, clf


def test_classifier_with_int8_embedder_saves_and_loads_untrusted(int8_state, sample):
    state, clf = int8_state
    assert json.loads((state / "config.json").read_text())["embedder_name"] == "st:all-MiniLM-L6-v2@onnx-int8"
    loaded = ICLClassifier.load(state)  # untrusted by default: the spec is a known offline name
    assert loaded.embedder_.name == "st:all-MiniLM-L6-v2@onnx-int8"
    assert [p.labels for p in loaded.predict_detailed(sample.test)] == [p.labels for p in clf.predict_detailed(sample.test)]


@pytest.mark.parametrize("spec", ["/tmp/evil-model@onnx-int8", "../models/m@openvino", "org/model@onnx"])
def test_untrusted_state_naming_a_path_or_unknown_model_with_a_backend_is_refused(int8_state, tmp_path, spec):
    state, _ = int8_state
    d = tmp_path / "copy"
    shutil.copytree(state, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["params"]["embedder"] = spec
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UntrustedStateError, match="embedder"):
        ICLClassifier.load(d)


@pytest.mark.slow
def test_static_embedder_distilled_offline(sample, sentences):
    """model2vec distilled from MiniLM (about two minutes the first time): unit vectors whose
    1-NN on the sample data is far above chance."""
    pytest.importorskip("model2vec")
    emb = get_embedder("minilm@static", cache=False)
    assert emb.name == "st:all-MiniLM-L6-v2@static"
    vecs = emb.encode(sentences)
    assert vecs.shape == (len(sentences), 256)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    clf = retriever_only(shortlist="knn_vote", shortlist_k=3, embedder="minilm@static").fit(sample.train, tune="none")
    acc = np.mean([p.label == ex.label for p, ex in zip(clf.predict_detailed(sample.test), sample.test)])
    assert acc >= 0.5, acc


def test_int8_state_predicts_in_a_process_that_never_imports_torch(int8_state, sample):
    """`label`/`serve` start-up with an exported embedder: no torch import (seconds) anywhere on
    the load-and-predict path (the index asks torch about CUDA only where a driver exists)."""
    import subprocess
    import sys

    state, _ = int8_state
    code = (
        "import sys; from iclcls import ICLClassifier; "
        f"clf = ICLClassifier.load({str(state)!r}); "
        f"print(clf.predict_detailed([{sample.test[0].text!r}])[0].label, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "False", out.stdout + out.stderr
