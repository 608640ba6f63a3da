"""Session fixtures for the vLLM backends: ONE in-process engine and ONE server per test run.

Both start slowly on CPU (engine ~45-100 s, server ~65-180 s), so every test that needs
one shares it, and when a run needs both, the server process is launched first and loads
in the background while the in-process engine starts. They skip cleanly, with the reason, where vLLM is not importable.
Loaded by ``pytest_plugins`` in conftest.py; the LM contract suite requests ``vllm_lm``
and ``openai_lm`` by name.
"""

from __future__ import annotations

import functools
import os

import pytest


@functools.cache
def _vllm_problem() -> str | None:
    """Why vLLM cannot run here, or None."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (e.g. mismatched torchvision)
        return f"vllm is not importable ({type(e).__name__}: {str(e)[:200]})"
    return None


def _require_vllm() -> None:
    problem = _vllm_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> str:
    """SmolLM2 converted once from its GGUF to a float32 HF directory (what vLLM loads)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from iclcls.lm.convert import hf_dir_for

    return hf_dir_for("smollm2")


_SERVER: dict[str, object] = {}


def _launch_server(hf_dir: str):
    """The session's server process, launched (not yet ready) on first call."""
    if "handle" not in _SERVER:
        from iclcls.lm.server import start_vllm_server

        _SERVER["handle"] = start_vllm_server(hf_dir, max_model_len=2048, wait=False)
    return _SERVER["handle"]


def _session_needs(session, *names: str) -> bool:
    return any(n in getattr(item, "fixturenames", ()) for item in session.items for n in names)


@pytest.fixture(scope="session")
def vllm_lm(request, smollm2_hf_dir):
    """An in-process VLLMEngine on SmolLM2 (float32 on CPU, 2048-token window)."""
    _require_vllm()
    from iclcls.lm.vllm_engine import VLLMEngine

    if _session_needs(request.session, "openai_lm", "vllm_server"):
        _launch_server(smollm2_hf_dir)  # loads while the engine starts

    lm = VLLMEngine.from_name("smollm2", max_model_len=2048)
    print(f"\n[vllm_lm] engine started in {lm.start_seconds:.1f} s")
    yield lm
    lm.close()


@pytest.fixture(scope="session")
def vllm_server(request, smollm2_hf_dir):
    """A running vLLM OpenAI-compatible server on SmolLM2 (its ServerHandle)."""
    _require_vllm()
    launched = _launch_server(smollm2_hf_dir)
    if _session_needs(request.session, "vllm_lm"):
        request.getfixturevalue("vllm_lm")  # the engine starts while the server loads
    handle = launched.wait_ready(timeout=600)
    print(f"\n[vllm_server] ready in {handle.start_seconds:.1f} s at {handle.base_url}")
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def openai_lm(vllm_server):
    """OpenAICompatibleLM talking to ``vllm_server``."""
    from iclcls.lm.openai_compat import OpenAICompatibleLM

    lm = OpenAICompatibleLM(vllm_server.base_url, vllm_server.model, timeout=120)
    yield lm
    lm.close()
