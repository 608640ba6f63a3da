"""LM backends behind one protocol; ``get_lm(spec)`` builds one from a short string.

Specs: ``smollm2`` / ``gemma3-270m`` / a local dir / ``hf:<model id>`` (transformers),
``vllm:<name or dir>`` (in-process vLLM engine), ``openai:<model>@<base url>`` (any
OpenAI-compatible server). Add ``+cache`` to wrap it in the on-disk request cache.
"""

from __future__ import annotations

from typing import Any

from iclcls.errors import ConfigError
from iclcls.lm.base import LM, BaseLM, CapabilityError

__all__ = ["LM", "BaseLM", "CapabilityError", "get_lm"]


def get_lm(spec: Any, **options: Any) -> LM | None:
    if spec is None or not isinstance(spec, str):
        return spec
    cached = spec.endswith("+cache")
    if cached:
        spec = spec[: -len("+cache")]
    kind, _, rest = spec.partition(":")
    if kind == "vllm" and rest:
        from iclcls.lm.vllm_engine import VLLMEngine

        lm: LM = VLLMEngine.from_name(rest, **options)
    elif kind == "openai" and rest:
        from iclcls.lm.openai_compat import OpenAICompatibleLM

        model, _, base_url = rest.partition("@")
        if not base_url:
            raise ConfigError(f"openai LM spec must be 'openai:<model>@<base url>', got {spec!r}")
        lm = OpenAICompatibleLM(base_url, model, **options)
    else:
        from iclcls.lm.transformers_lm import TransformersLM

        lm = TransformersLM.from_name(rest if kind == "hf" and rest else spec, **options)
    if cached:
        from iclcls.lm.cache import CachedLM

        lm = CachedLM(lm)
    return lm
