"""The LM protocol: every stage talks to language models only through it.

Batched by design: ``generate``/``chat`` take lists, ``score_batch`` takes many
(prompt, continuations) requests. ``BaseLM`` derives the convenience methods
(``score``, ``score_tokens``) from ``score_batch`` so a backend implements one method.
The signature is declared once, by the ``BaseLM`` ABC; ``LM`` is its name in annotations
and ``isinstance`` checks (every backend subclasses it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from iclcls.errors import CapabilityError, ConfigError  # noqa: F401  (CapabilityError: part of the contract)

# A chat message: {"role": "user"|"system"|"assistant", "content": str | list[part]};
# a part is {"type": "text", "text": ...} or {"type": "image", "image": path|url|bytes}.
Message = dict[str, Any]
Conversation = Sequence[Message]
ScoreRequest = tuple[str, Sequence[str]]


class BaseLM(ABC):
    """Shared behaviour of the backends; subclasses implement generate, chat, score_batch."""

    name: str = "lm"

    @property
    @abstractmethod
    def context_window(self) -> int: ...

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        seed: int = 0,
        choices: Sequence[str] | None = None,
    ) -> list[str]: ...

    @abstractmethod
    def chat(
        self,
        conversations: Sequence[Conversation],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        seed: int = 0,
    ) -> list[str]: ...

    @abstractmethod
    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[list[np.ndarray]]:
        """Per-token log-probs of each continuation given its prompt.

        Returns, per request, one float array per continuation (length = its token count).
        Prompt and continuation are tokenised together and split at the character offset,
        so a label's first token is the one the model really sees after the prompt.
        """

    def score_tokens(self, prompt: str, continuations: Sequence[str]) -> list[np.ndarray]:
        return self.score_batch([(prompt, list(continuations))])[0]

    def score(self, prompt: str, continuations: Sequence[str], *, reduce: str = "sum") -> list[float]:
        """Sum (or mean: length-normalised) log-prob of each continuation given ``prompt``."""
        return [reduce_logprobs(t, reduce) for t in self.score_tokens(prompt, continuations)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


LM = BaseLM


def reduce_logprobs(tokens: np.ndarray, reduce: str = "sum") -> float:
    if reduce == "sum":
        return float(np.sum(tokens))
    if reduce == "mean":
        return float(np.mean(tokens)) if len(tokens) else 0.0
    if reduce == "first":
        return float(tokens[0]) if len(tokens) else 0.0
    raise ConfigError(f"unknown reduce {reduce!r}; use 'sum', 'mean' or 'first'")


def has_images(conversation: Conversation) -> bool:
    for m in conversation:
        content = m.get("content")
        if isinstance(content, list) and any(p.get("type") in ("image", "image_url") for p in content):
            return True
    return False


def text_of(message: Message) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")
