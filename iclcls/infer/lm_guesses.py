"""The LM writes a comma-separated list (label guesses or tags); we split and clean it."""

from __future__ import annotations

import re
from collections.abc import Sequence

from iclcls.infer.base import INFERRERS
from iclcls.lm.base import LM
from iclcls.prompt import render
from iclcls.types import Example


class LMGuesses:
    def __init__(self, *, template: str, instructions: str | None = None, max_items: int = 8, max_tokens: int = 48) -> None:
        self.template = template
        self.instructions = instructions
        self.max_items = max_items
        self.max_tokens = max_tokens

    @staticmethod
    def parse(answer: str, max_items: int) -> list[str]:
        items: list[str] = []
        for part in re.split(r"[,;\n]|\s-\s", answer):
            part = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", part).strip().strip(".\"'`")
            if part and part.lower() not in {x.lower() for x in items}:
                items.append(part)
        return items[:max_items]

    def infer(self, lm: LM, texts: Sequence[str], demonstrations: Sequence[Sequence[Example]] | None = None) -> list[list[str]]:
        demos = demonstrations or [[] for _ in texts]
        prompts = [
            render(
                self.template,
                instructions=self.instructions,
                query=t,
                demonstrations=[{"text": d.text, "labels": list(d.labels)} for d in ds],
            )
            for t, ds in zip(texts, demos)
        ]
        answers = lm.generate(prompts, max_tokens=self.max_tokens, temperature=0.0, stop=["\n\n", "Text:"])
        return [self.parse(a, self.max_items) for a in answers]


@INFERRERS.register("labels")
def label_guesses(**options) -> LMGuesses:
    """IReRa: guesses of the labels themselves."""
    return LMGuesses(template=options.pop("template", "infer_labels"), **options)


@INFERRERS.register("tags")
def semantic_tags(**options) -> LMGuesses:
    """InCA: short semantic tags describing the input's intent."""
    return LMGuesses(template=options.pop("template", "infer_tags"), **options)
