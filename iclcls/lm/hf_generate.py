"""Generation for the transformers backend: batched, left-padded, greedy at temperature 0,
stop strings, and chat rendered with the model's own template."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from iclcls.lm.base import CapabilityError, Conversation, has_images, text_of


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    if not stop:
        return text
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text[:cut] if cut >= 0 else text


class StopOnStrings:
    """A stopping criterion: a row is done once its new text contains a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def render_chat(tokenizer: Any, conv: Conversation, *, index: int, name: str, encode_text: Callable[[str], list[int]]) -> list[int]:
    """Token ids of a conversation with the generation prompt; plain "role: content" lines without a template."""
    if has_images(conv):
        raise CapabilityError(
            f"{name} is a text-only model and cannot read images (conversation {index}); "
            "use a vision-language model through the vLLM or OpenAI-compatible backend"
        )
    messages = [{"role": m["role"], "content": text_of(m)} for m in conv]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return encode_text("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:")


def generate_ids(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, pad_id: int, max_batch_size: int,
    max_tokens: int, temperature: float, stop: Sequence[str] | None, seed: int, device: torch.device,
) -> list[str]:
    """Texts generated after each prompt (token ids), ``max_batch_size`` prompts per ``model.generate``."""
    from transformers import GenerationConfig, StoppingCriteriaList

    sample = temperature > 0
    gen = GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=None,
        top_k=None,
        pad_token_id=pad_id,
        eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
    )
    texts: list[str] = []
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), max_batch_size):
            batch = prompts[start : start + max_batch_size]
            width = max(len(p) for p in batch)
            x = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, p in enumerate(batch):
                x[r, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
                mask[r, width - len(p) :] = 1
            criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stop, width)]) if stop else None
            out = model.generate(
                input_ids=x.to(device), attention_mask=mask.to(device), generation_config=gen, stopping_criteria=criteria
            )
            decoded = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            texts.extend(cut_at_stop(t, stop) for t in decoded)
    return texts
