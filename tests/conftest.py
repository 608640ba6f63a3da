"""Shared fixtures: the real benchmark data, the real embedder, the real small LM.

Expensive objects are session-scoped: one embedder, one LM, one vLLM engine per run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One math thread per process: the suite runs a vLLM engine and server beside the test
# process on a 2-core machine, and oversubscribed OpenMP threads made SmolLM2 10-30x slower
# there. Set OMP_NUM_THREADS yourself to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["fixtures_lm_servers"]  # vllm_lm, openai_lm: one engine, one server per run


def _data_dir() -> Path | None:
    for cand in (os.environ.get("ICLCLS_DATA"), REPO.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _data_dir()
    if d is None:
        pytest.skip("benchmark data folder (../shared/data or $ICLCLS_DATA) not present")
    return d


# Model folders that are slow to rebuild (GGUF->HF conversions for vLLM, the assembled
# Gemma GGUF): they stay in the user's cache and are linked into the tests' own cache.
_STABLE_MODEL_DIRS = ("hf", "gguf")


def _isolate_cache(root: Path) -> Path:
    """Point ICLCLS_CACHE at ``root`` (a fresh folder), linking the stable model folders in."""
    stable = Path(os.environ.get("ICLCLS_CACHE") or Path.home() / ".cache" / "iclcls")
    root.mkdir(parents=True, exist_ok=True)
    for name in _STABLE_MODEL_DIRS:
        (stable / name).mkdir(parents=True, exist_ok=True)
        link = root / name
        if not link.exists():
            link.symlink_to(stable / name, target_is_directory=True)
    os.environ["ICLCLS_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory) -> Path:
    """Tests write caches (embeddings, LM requests) to a temporary folder, never the user's;
    converted models are shared (see ``_STABLE_MODEL_DIRS``). Server processes inherit it."""
    return _isolate_cache(tmp_path_factory.mktemp("iclcls_cache"))


@pytest.fixture(scope="session")
def embedder():
    from iclcls.embed import default_embedder

    return default_embedder()


@pytest.fixture(scope="session")
def smollm():
    from iclcls.lm.transformers_lm import TransformersLM

    return TransformersLM.from_name("smollm2")
