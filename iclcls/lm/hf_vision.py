"""The transformers backend for vision-language models: images through ``AutoProcessor`` and
the model's own chat template (LLaVA, Idefics3/SmolVLM, Qwen2-VL, Gemma-3, ... any
``AutoModelForImageTextToText``).

``chat(..., choices=labels)`` is constrained generation by per-label scoring: every choice
is scored as the assistant's reply (its tokens, then end of turn) after the conversation,
images included, and the likeliest is returned, so the answer is always one of the
choices. ``count_chat_tokens`` counts a conversation as the model sees it, image tokens
included, so a prompt builder can fit demonstrations to the context window.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iclcls.lm.base import BaseLM, Conversation, ScoreRequest
from iclcls.lm.common import check_choices, likeliest
from iclcls.lm.hf_generate import cut_at_stop


def is_vision_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is a local model folder, or a Hugging Face id ("org/name", not a local
    path), whose config has a vision tower."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        name = str(path)
        if name.count("/") != 1 or Path(name).exists() or name.endswith(".gguf") or os.environ.get("HF_HUB_OFFLINE") == "1":
            return False
        try:
            from transformers import AutoConfig

            return hasattr(AutoConfig.from_pretrained(name), "vision_config")
        except Exception:  # unknown id, no network: the text loader reports it
            return False
    import json

    try:
        return "vision_config" in json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def to_processor_messages(conv: Conversation) -> list[dict]:
    """OpenAI/iclcls messages -> the processor's form: image parts carry decoded PIL images."""
    from iclcls.data.images import open_image

    out = []
    for m in conv:
        content = m.get("content", "")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
            continue
        parts = []
        for p in content:
            kind = p.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": p.get("text", "")})
            elif kind == "image_url":
                url = p["image_url"]["url"] if isinstance(p["image_url"], dict) else p["image_url"]
                parts.append({"type": "image", "image": open_image(url)})
            elif kind == "image":
                parts.append({"type": "image", "image": open_image(p["image"])})
            else:
                raise ValueError(f"unknown message part type {kind!r}")
        out.append({"role": m["role"], "content": parts})
    return out


class TransformersVLM(BaseLM):
    """A vision-language model run in process through transformers (see the module docstring)."""

    multimodal = True

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        context_window: int | None = None,
        context_cap: int = 8192,
        max_batch_size: int = 8,
    ) -> None:
        if os.path.exists(model):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from iclcls.lm.hf_loading import context_window_of

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.dtype = dtype
        self.processor = AutoProcessor.from_pretrained(model)
        self.tokenizer = self.processor.tokenizer
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.name = f"transformers:{Path(model).name if os.path.exists(model) else model}"
        self.max_batch_size = max_batch_size
        self._context_window = context_window_of(self.model, self.name, context_window, context_cap)
        eos = self.model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        self._eos = eos if eos is not None else self.tokenizer.eos_token_id
        self._pad = next(i for i in (self.tokenizer.pad_token_id, self._eos, 0) if i is not None)
        self._lock = threading.RLock()

    @property
    def context_window(self) -> int:
        return self._context_window

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _inputs(self, conv: Conversation) -> dict[str, Any]:
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"{self.name}: the processor has no chat template; cannot place images in a prompt")
        inputs = self.processor.apply_chat_template(
            to_processor_messages(conv), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        return {k: (v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items() if isinstance(v, torch.Tensor)}

    def count_chat_tokens(self, conv: Conversation) -> int:
        """Prompt tokens of a conversation as the model reads it (image tokens included)."""
        with self._lock:
            return int(self._inputs(conv)["input_ids"].shape[1])

    def _check_window(self, i: int, n: int, extra: int) -> None:
        if n + extra > self._context_window:
            raise ValueError(f"conversation {i} is {n} tokens (images included); with {extra} more it exceeds "
                             f"{self.name}'s context window of {self._context_window}")

    # -- scoring ---------------------------------------------------------------------
    def _continuation_ids(self, text: str, *, end: bool) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids + [self._eos] if end and self._eos is not None else ids

    def _score_inputs(self, inputs: dict[str, Any], conts: Sequence[list[int]]) -> list[np.ndarray]:
        """Log-probs of each continuation's tokens after ``inputs`` (one batched forward per
        ``max_batch_size`` continuations; the images ride along in every row)."""
        prompt = inputs["input_ids"][0]
        n = prompt.shape[0]
        out: list[np.ndarray] = []
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        for start in range(0, len(conts), self.max_batch_size):
            chunk = conts[start : start + self.max_batch_size]
            width = n + max(len(c) for c in chunk)
            x = torch.full((len(chunk), width), self._pad, dtype=torch.long, device=self.device)
            mask = torch.zeros_like(x)
            for r, c in enumerate(chunk):
                x[r, :n] = prompt
                x[r, n : n + len(c)] = torch.tensor(c, dtype=torch.long)
                mask[r, : n + len(c)] = 1
            rep = {k: torch.cat([v] * len(chunk)) for k, v in extra.items()}
            logits = self.model(input_ids=x, attention_mask=mask, **rep).logits.float()
            logp = torch.log_softmax(logits[:, n - 1 : width - 1], dim=-1)
            for r, c in enumerate(chunk):
                tgt = torch.tensor(c, dtype=torch.long, device=logp.device)
                out.append(logp[r, : len(c)].gather(1, tgt[:, None])[:, 0].double().cpu().numpy())
        return out

    def score_chat(self, conversations: Sequence[Conversation], continuations: Sequence[str], *,
                   end_of_turn: bool = True) -> list[list[np.ndarray]]:
        """Per-token log-probs of each continuation as the assistant's reply to each conversation
        (with the end-of-turn token when ``end_of_turn``, so "1" does not win over "10")."""
        conts = [self._continuation_ids(c, end=end_of_turn) for c in continuations]
        out = []
        with self._lock, torch.inference_mode():
            for i, conv in enumerate(conversations):
                inputs = self._inputs(conv)
                self._check_window(i, inputs["input_ids"].shape[1], max(len(c) for c in conts))
                out.append(self._score_inputs(inputs, conts))
        return out

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[list[np.ndarray]]:
        """Text-only scoring: each continuation's tokens after the plain-text prompt."""
        out = []
        with self._lock, torch.inference_mode():
            for prompt, conts in requests:
                ids = self.tokenizer(prompt, add_special_tokens=True, return_tensors="pt")["input_ids"].to(self.device)
                cont_ids = [self._continuation_ids(c, end=False) for c in conts]
                out.append(self._score_inputs({"input_ids": ids}, cont_ids) if conts else [])
        return out

    # -- generation ------------------------------------------------------------------
    def _generate(self, inputs: dict[str, Any], *, max_tokens: int, temperature: float, stop: Sequence[str] | None,
                  seed: int) -> str:
        sample = temperature > 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=sample,
                                      temperature=temperature if sample else None, top_p=None, top_k=None,
                                      pad_token_id=self._pad)
        text = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return cut_at_stop(text, stop)

    def chat(
        self,
        conversations: Sequence[Conversation],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        seed: int = 0,
        choices: Sequence[str] | None = None,
    ) -> list[str]:
        """Reply to each conversation (images included); with ``choices``, the likeliest choice."""
        if choices is not None:
            choices = check_choices(choices)
            return likeliest(self.score_chat(conversations, choices), choices)
        out = []
        with self._lock, torch.inference_mode():
            for i, conv in enumerate(conversations):
                inputs = self._inputs(conv)
                self._check_window(i, inputs["input_ids"].shape[1], max_tokens)
                out.append(self._generate(inputs, max_tokens=max_tokens, temperature=temperature, stop=stop, seed=seed))
        return out

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        seed: int = 0,
        choices: Sequence[str] | None = None,
    ) -> list[str]:
        """Plain-text completion (no chat template); with ``choices``, the likeliest choice."""
        if choices is not None:
            choices = check_choices(choices)
            return likeliest(self.score_batch([(p, choices) for p in prompts]), choices)
        out = []
        with self._lock, torch.inference_mode():
            for i, p in enumerate(prompts):
                ids = self.tokenizer(p, add_special_tokens=True, return_tensors="pt")["input_ids"].to(self.device)
                self._check_window(i, ids.shape[1], max_tokens)
                out.append(self._generate({"input_ids": ids}, max_tokens=max_tokens, temperature=temperature, stop=stop,
                                          seed=seed))
        return out
