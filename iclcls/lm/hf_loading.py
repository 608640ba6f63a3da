"""Loading a transformers causal LM and its tokenizer for in-process use.

``model`` is an offline short name (``smollm2``, ``gemma3-270m``), a local directory or
``.gguf`` file, or a Hugging Face model id. GGUF weights are dequantised to float32; with
``convert_gguf`` the dequantised model is saved once as a plain HF directory in iclcls's
cache (``iclcls.lm.convert``) so later loads take a second. Local models load with the
Hub offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from iclcls.errors import ConfigError
from iclcls.lm.gguf import gguf_add_bos
from iclcls.lm.models import OFFLINE_MODELS, ModelSource, resolve_model


@dataclass
class Loaded:
    source: ModelSource
    tokenizer: Any
    model: Any
    device: torch.device
    dtype: torch.dtype


def load_causal_lm(
    model: str, *, gguf_file: str | None, device: str | None, dtype: str | torch.dtype | None,
    convert_gguf: bool, attn_implementation: str | None,
) -> Loaded:
    """Tokenizer (must be fast: character offsets split prompt from continuation) and model, in eval mode."""
    if model in OFFLINE_MODELS or os.path.exists(model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(model, gguf_file=gguf_file)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    path, kwargs = source.path, {}
    if source.gguf_file:
        if convert_gguf:
            from iclcls.lm.convert import gguf_to_hf_dir

            path = str(gguf_to_hf_dir(source))
        else:
            kwargs["gguf_file"] = source.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"transformers:{source.name}: needs a fast tokenizer (character offsets split prompt from continuation)"
        )
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    lm.to(device=dev, dtype=dtype)
    lm.eval()
    return Loaded(source, tokenizer, lm, dev, dtype)


def context_window_of(model: Any, name: str, context_window: int | None, context_cap: int) -> int:
    """The window to use: the given one, else the model's positions capped at ``context_cap``."""
    cfg = model.config.get_text_config(decoder=True)
    model_max = getattr(cfg, "max_position_embeddings", None) or context_cap
    window = int(context_window or min(model_max, context_cap))
    if window > model_max:
        raise ConfigError(f"{name}: context_window {window} exceeds the model's {model_max} positions")
    return window


def special_ids(tokenizer: Any, source: ModelSource, add_bos: bool | None) -> tuple[int, int, bool]:
    """(pad id, start id, extra BOS): the start token gives an empty prompt a position that
    predicts the first continuation token; the extra BOS restores a GGUF's "add BOS" flag."""
    pad = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if add_bos is None:
        add_bos = gguf_add_bos(source.gguf_path) or False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    adds_bos_itself = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    return pad, start, bool(add_bos and not adds_bos_itself and tokenizer.bos_token_id is not None)
