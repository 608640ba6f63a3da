"""An LM wrapper that counts requests, prompt tokens and the tokens actually prefilled
(after shared-prefix reuse): the cost side of a study or any run."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np

from iclcls.lm.base import BaseLM


class CountingLM(BaseLM):
    """Delegates to an LM and counts requests, prompt tokens, and tokens actually prefilled.

    A ``shared_prefix`` is forwarded when the wrapped LM accepts it; its tokens are counted as
    prefilled once per distinct prefix (the backend caches it), not once per request.
    """

    def __init__(self, lm: Any) -> None:
        self.inner = lm
        self.name = getattr(lm, "name", "lm")
        try:
            self._prefix_ok = "shared_prefix" in inspect.signature(lm.score_batch).parameters
        except (TypeError, ValueError):
            self._prefix_ok = False
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.requests = 0
        self.prompt_tokens = 0
        self.prefill_tokens = 0
        self._prefixes: set[str] = set()

    def usage(self) -> dict[str, int]:
        return {"calls": self.calls, "requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "prefill_tokens": self.prefill_tokens}

    @property
    def context_window(self) -> int:
        return self.inner.context_window

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def _count(self, prompts: Sequence[str], prefix: str | None = None) -> None:
        self.calls += 1
        self.requests += len(prompts)
        cut = 0
        if prefix is not None:
            cut = self.inner.count_tokens(prefix)
            if prefix not in self._prefixes:
                self._prefixes.add(prefix)
                self.prefill_tokens += cut
        for p in prompts:
            n = self.inner.count_tokens(p)
            self.prompt_tokens += n
            self.prefill_tokens += n - cut

    def score_batch(self, requests: Sequence[Any], *, shared_prefix: str | None = None) -> list[list[np.ndarray]]:
        reuse = shared_prefix if self._prefix_ok else None
        self._count([p for p, _ in requests], reuse)
        if reuse is not None:
            return self.inner.score_batch(requests, shared_prefix=reuse)
        return self.inner.score_batch(requests)

    def generate(self, prompts: Sequence[str], **kw: Any) -> list[str]:
        self._count(list(prompts))
        return self.inner.generate(prompts, **kw)

    def chat(self, conversations: Sequence[Any], **kw: Any) -> list[str]:
        self.calls += 1
        self.requests += len(conversations)
        return self.inner.chat(conversations, **kw)

    def __getattr__(self, name: str) -> Any:  # e.g. clear_prefix_cache
        return getattr(self.__dict__["inner"], name)
