"""Turn a GGUF model into a plain Hugging Face directory, once, for backends that need one.

vLLM (and most servers) load an HF directory, but the offline models here ship as GGUF.
transformers dequantises a GGUF on load; we save that float model with its tokenizer under
``cache_dir()/hf/<name>`` so every later run reuses it. The write is atomic (temp dir, then
rename) and a marker file says the conversion finished, so a crash never leaves a
half-written model that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from iclcls.errors import ConfigError
from iclcls.io import staged_dir
from iclcls.lm.gguf import gguf_add_bos
from iclcls.lm.models import ModelSource, resolve_model
from iclcls.util import cache_dir

MARKER = "iclcls_converted.json"


def converted_dir(source: ModelSource) -> Path:
    """Where ``gguf_to_hf_dir`` puts (or has put) ``source``."""
    return cache_dir() / "hf" / source.name


def gguf_to_hf_dir(source: ModelSource, *, out_dir: str | Path | None = None) -> Path:
    """Convert ``source`` (a GGUF model) to an HF directory once; reuse it when present.

    The weights are dequantised to float32 (what transformers does with a GGUF); the
    directory holds ``config.json``, safetensors weights and the tokenizer files.
    """
    if source.gguf_file is None:
        raise ConfigError(f"{source.name}: not a GGUF model (no gguf_file); load {source.path} directly")
    gguf_path = source.gguf_path
    if gguf_path is None or not gguf_path.is_file():
        raise FileNotFoundError(f"{source.name}: GGUF file {gguf_path} does not exist")
    target = Path(out_dir) if out_dir is not None else converted_dir(source)
    if (target / MARKER).is_file():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if target.exists() and not (target / MARKER).is_file():  # a stale, unmarked (interrupted) conversion
        shutil.rmtree(target)
    with staged_dir(target, done=lambda t: (t / MARKER).is_file()) as tmp:
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        add_bos = gguf_add_bos(gguf_path)
        if add_bos and tokenizer.bos_token_id is not None:
            probe = tokenizer("a", add_special_tokens=True)["input_ids"]
            if probe[:1] != [tokenizer.bos_token_id]:
                # transformers' GGUF tokenizer drops the GGUF's "add BOS" flag; keep it, so
                # every backend loading this directory sees the BOS the model was trained with.
                tokenizer.add_bos_token = True
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file)
        # A GGUF-loaded model carries quantizer marks and refuses save_pretrained with them,
        # although its weights are already plain float tensors.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "source": str(gguf_path),
            "name": source.name,
            "dtype": str(model.dtype).removeprefix("torch."),
            "add_bos_token": bool(add_bos),
            "seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / MARKER).write_text(json.dumps(info, indent=2), encoding="utf-8")
        del model
    return target


def hf_dir_for(name_or_path: str) -> str:
    """A directory (or HF id) vLLM can load: converts GGUF models on first use."""
    source = resolve_model(name_or_path)
    if source.gguf_file:
        return str(gguf_to_hf_dir(source))
    return source.path
