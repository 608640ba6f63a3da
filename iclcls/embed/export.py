"""Export a sentence-transformers model once, offline, into iclcls's model cache, for a CPU backend.

``<exports root>/<source sha256[:16]>/<backend>-v<RECIPE>/`` holds one export (the root is
beside the Python environment, see :func:`exports_root`):
the model file(s), the source's ``tokenizer.json`` and ``export.json`` (written last, so a
folder without it is unfinished). Folders are built in a temporary sibling and renamed into
place, so concurrent first uses never see half an export. Only these folders are ever loaded:
a spec or a saved state names a model and a backend, never a file.

Why not sentence-transformers' own ``backend="onnx"|"openvino"``: it exports through optimum,
and optimum-onnx 0.1.0 (transformers<4.58) and optimum-intel 2.2.0 (transformers<5.6) fail to
import beside transformers 5.x (``get_parameter_dtype``, ``_CAN_RECORD_REGISTRY``,
``VisionRotaryEmbedding`` are gone). So the same recipe is done directly: ``torch.onnx.export``
of transformer + pooling + normalisation; int8 the way ``export_dynamic_quantized_onnx_model``
does it (onnxruntime ``quantize_dynamic``, per-channel int8 MatMul weights) and the way
``export_static_quantized_openvino_model`` does it (NNCF post-training quantisation with a
calibration set); OpenVINO reads the ONNX file.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from iclcls.embed.source import SourceModel, exports_root
from iclcls.embed.specs import EXPORTED_BACKENDS
from iclcls.errors import ConfigError
from iclcls.io import staged_dir

STATIC_DIMS = 256  # model2vec PCA dimensions
RECIPE = 1  # bump when an export recipe changes: old exports are then ignored, not reused
MANIFEST = "export.json"
MODEL_FILES = {"onnx": "model.onnx", "onnx-int8": "model.onnx", "openvino": "model.xml", "openvino-int8": "model.xml", "static": "model.safetensors"}


def export_dir(source: SourceModel, backend: str) -> Path:
    """Where ``backend``'s export of ``source`` lives (whether or not it exists yet)."""
    if backend not in EXPORTED_BACKENDS:
        raise ConfigError(f"backend {backend!r} is not exported (choose from {', '.join(EXPORTED_BACKENDS)})")
    return exports_root() / source.digest[:16] / f"{backend}-v{RECIPE}"


def read_manifest(folder: Path) -> dict | None:
    """The export's manifest, or None when the folder is missing or unfinished."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def ensure_export(source: SourceModel, backend: str, *, calibration: list[str] | None = None) -> Path:
    """The folder of ``backend``'s export of ``source``, exporting it first if needed (offline)."""
    target = export_dir(source, backend)
    if read_manifest(target) is not None:
        return target
    if backend in ("onnx-int8", "openvino"):  # both start from the float32 ONNX export
        base = ensure_export(source, "onnx")
    elif backend == "openvino-int8":
        base = ensure_export(source, "openvino")
    else:
        base = None
    with staged_dir(target, done=lambda t: read_manifest(t) is not None) as staging:
        started = time.perf_counter()
        _BUILDERS[backend](source, base, staging, calibration)
        if not (staging / "tokenizer.json").exists():  # model2vec writes its own (pruned) tokenizer
            shutil.copy2(source.path / "tokenizer.json", staging / "tokenizer.json")
        manifest = {
            "backend": backend, "recipe": RECIPE, "source_digest": source.digest, "source": str(source.path),
            "pooling": source.pooling, "max_seq_length": source.max_seq_length, "dim": STATIC_DIMS if backend == "static" else source.dim,
            "model_file": MODEL_FILES[backend], "export_s": round(time.perf_counter() - started, 2),
        }  # fmt: skip
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return target


# -- the recipes -------------------------------------------------------------------------------


def _export_onnx(source: SourceModel, base: Path | None, out: Path, calibration: list[str] | None) -> None:
    """Transformer + pooling + L2 normalisation in one float32 ONNX graph (dynamic batch and length)."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(source.path), attn_implementation="eager").eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if source.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    ids = torch.ones(2, 8, dtype=torch.long)
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer chatter about the legacy exporter and shape asserts
        torch.onnx.export(
            Pooled(), (ids, torch.ones_like(ids)), str(out / "model.onnx"),
            input_names=["input_ids", "attention_mask"], output_names=["embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "embedding": {0: "batch"}},
            opset_version=17, dynamo=False,
        )  # fmt: skip


def _quantize_onnx(source: SourceModel, base: Path | None, out: Path, calibration: list[str] | None) -> None:
    """Dynamic int8: per-channel int8 MatMul weights, activations quantised at run time.

    Only MatMul: quantising the embedding Gather too (optimum's default list) costs accuracy
    for no speed. Per-channel weights keep the mean cosine to float32 at ~0.99 (per-tensor: ~0.97).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    assert base is not None
    quantize_dynamic(
        str(base / "model.onnx"), str(out / "model.onnx"), op_types_to_quantize=["MatMul"],
        weight_type=QuantType.QInt8, per_channel=True, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )  # fmt: skip


def _convert_openvino(source: SourceModel, base: Path | None, out: Path, calibration: list[str] | None) -> None:
    """OpenVINO IR read from the float32 ONNX export (weights kept float32)."""
    import openvino as ov

    assert base is not None
    ov.save_model(ov.convert_model(str(base / "model.onnx")), str(out / "model.xml"), compress_to_fp16=False)


def _quantize_openvino(source: SourceModel, base: Path | None, out: Path, calibration: list[str] | None) -> None:
    """Static int8 with NNCF (weights and activations), calibrated on real sentences."""
    import nncf
    import openvino as ov

    from iclcls.embed.tokens import TokenBatcher

    assert base is not None
    texts = calibration or calibration_texts()
    batcher = TokenBatcher(source.path / "tokenizer.json", max_length=source.max_seq_length)
    items = [{"input_ids": ids, "attention_mask": mask} for _, ids, mask in batcher.batches(texts, batch_size=1)]
    model = ov.Core().read_model(str(base / "model.xml"))
    quantized = nncf.quantize(
        model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items),
        preset=nncf.QuantizationPreset.MIXED,
    )  # fmt: skip
    ov.save_model(quantized, str(out / "model.xml"), compress_to_fp16=False)


def _distill_static(source: SourceModel, base: Path | None, out: Path, calibration: list[str] | None) -> None:
    """model2vec: one forward pass per vocabulary token, PCA to 256 dims, SIF weights; offline."""
    import logging

    from model2vec.distill import distill

    logging.getLogger("model2vec").setLevel(logging.ERROR)

    model = distill(model_name=str(source.path), pca_dims=STATIC_DIMS)
    model.save_pretrained(str(out))


_BUILDERS: dict[str, Callable[[SourceModel, Path | None, Path, list[str] | None], None]] = {
    "onnx": _export_onnx,
    "onnx-int8": _quantize_onnx,
    "openvino": _convert_openvino,
    "openvino-int8": _quantize_openvino,
    "static": _distill_static,
}


def calibration_texts() -> list[str]:
    """Sentences shipped with iclcls (its sample data) to calibrate static quantisation offline."""
    from importlib import resources

    texts: list[str] = []
    for name in ("train.jsonl", "test.jsonl"):
        for line in resources.files("iclcls.data").joinpath("sample", name).read_text().splitlines():
            if line.strip():
                texts.append(json.loads(line)["text"])
    return texts


def main(argv: list[str] | None = None) -> None:
    """``python -m iclcls.embed.export minilm@onnx-int8 ...``: make exports ahead of first use."""

    from iclcls.embed import _model_folder
    from iclcls.embed.source import describe
    from iclcls.embed.specs import parse_backend_spec

    specs = argv if argv is not None else sys.argv[1:]
    if not specs:
        raise SystemExit("usage: python -m iclcls.embed.export MODEL@BACKEND [...]  (e.g. minilm@onnx-int8)")
    for spec in specs:
        parsed = parse_backend_spec(spec)
        if parsed is None or parsed.backend == "torch":
            raise SystemExit(f"{spec!r} is not an exported backend spec (model@{'|'.join(EXPORTED_BACKENDS)})")
        print(f"{spec}: {ensure_export(describe(_model_folder(parsed.model)[0]), parsed.backend)}")


if __name__ == "__main__":
    main()
