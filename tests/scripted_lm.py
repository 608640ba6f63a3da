"""A scripted LM for control-flow tests only (prompt assembly, parsing, fallbacks).

It never stands in for a backend: backends are tested for real in test_lm_*.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from iclcls.lm.base import BaseLM


class ScriptedLM(BaseLM):
    """Answers ``generate`` from a list; scores a continuation by a table (default -5 per word)."""

    name = "scripted"

    def __init__(self, *, answers: Sequence[str] = (), scores: dict[str, float] | None = None, window: int = 4096) -> None:
        self.answers = list(answers)
        self.scores = scores or {}
        self.window = window
        self.prompts: list[str] = []
        self.score_requests: list[tuple[str, list[str]]] = []

    @property
    def context_window(self) -> int:
        return self.window

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompts, *, max_tokens=64, temperature=0.0, stop=None, seed=0, choices=None):
        self.prompts += list(prompts)
        return [self.answers[i % len(self.answers)] if self.answers else "" for i in range(len(prompts))]

    def chat(self, conversations, **kw):
        return self.generate(["\n".join(str(m["content"]) for m in c) for c in conversations])

    def score_batch(self, requests):
        out = []
        for prompt, conts in requests:
            self.score_requests.append((prompt, list(conts)))
            out.append([np.array([self.scores.get(c.strip(), -5.0 * len(c.split()))]) for c in conts])
        return out
