"""Embedder specs with a backend: ``<model>@<backend>``, e.g. ``minilm@onnx-int8``.

The model part is an offline alias (``minilm``, ``mpnet``, or another name of those two) or,
from code only, a local sentence-transformers folder. The backend says how it runs on a CPU:

- ``torch``: sentence-transformers on PyTorch, float32 (the same as the plain spec);
- ``onnx`` / ``onnx-int8``: onnxruntime, float32 or dynamically quantised int8 weights;
- ``openvino`` / ``openvino-int8``: OpenVINO, float32 or statically quantised int8 (NNCF);
- ``static``: a model2vec static embedding distilled locally from the model (no transformer).

Every non-torch backend runs a model exported once from the source folder into iclcls's cache
(:mod:`iclcls.embed.export`); a spec never names an exported file.
"""

from __future__ import annotations

from typing import NamedTuple

from iclcls.errors import ConfigError

BACKENDS = ("torch", "onnx", "onnx-int8", "openvino", "openvino-int8", "static")
EXPORTED_BACKENDS = BACKENDS[1:]  # all but torch run a model exported into the cache

MINILM_ALIASES = frozenset({"minilm", "default", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})
MPNET_ALIASES = frozenset({"mpnet", "all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2"})


class BackendSpec(NamedTuple):
    model: str  # alias or folder, without the "st:" prefix
    backend: str  # one of BACKENDS


def parse_backend_spec(spec: str) -> BackendSpec | None:
    """``"minilm@onnx-int8"`` -> ``("minilm", "onnx-int8")``; None for a spec without a backend.

    An ``@`` followed by something that is not a backend is not a backend spec (a folder may
    contain ``@``); an empty model part is an error.
    """
    if spec.startswith("st:"):
        spec = spec[3:]
    model, sep, backend = spec.rpartition("@")
    if not sep or backend not in BACKENDS:
        return None
    if not model:
        raise ConfigError(f"embedder spec {spec!r} names no model before '@'")
    return BackendSpec(model, backend)


def offline_names() -> frozenset[str]:
    """Every spec naming a model that installs from PyPI, with or without a backend.

    A saved state may name these (they load no file the state chose); any other backend spec
    needs a local folder, which only the caller's code may name.
    """
    plain = MINILM_ALIASES | MPNET_ALIASES
    named = {f"{m}@{b}" for m in plain for b in BACKENDS}
    return frozenset(plain | named | {f"st:{n}" for n in plain | named})


def is_offline_name(spec: str) -> bool:
    """True when ``spec`` is one of :func:`offline_names` (a model alias, any backend)."""
    return spec in offline_names()
