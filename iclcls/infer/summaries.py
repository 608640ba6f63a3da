"""Class summaries: one LM-written sentence per class, shown in the prompt instead of demonstrations.

InCA puts short class summaries of the shortlisted classes in the prompt rather than
examples, so the prompt's length depends on the shortlist, not on the pool. A summary is
written once per class (greedy decoding, so it is reproducible) from the class's most
typical training examples (nearest its mean embedding), and kept in the classifier's state.
The answer is primed ("Summary: They are all about"): small instruction-tuned models tend to
end their turn at once after a bare "Summary:".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from iclcls.pool import Pool
from iclcls.prompt import label_text, render
from iclcls.types import Example

PRIMER = "They are all about"


def typical_examples(pool: Pool, label: str, n: int) -> list[Example]:
    """The ``n`` examples of ``label`` nearest its mean embedding (ties: pool order)."""
    ids = pool.indices_of(label)
    if not ids:
        return []
    emb = pool.embeddings[ids]
    mean = emb.mean(axis=0)
    order = np.argsort(-(emb @ mean), kind="stable")[:n]
    return [pool.examples[ids[i]] for i in order]


def clean_summary(text: str, *, max_chars: int = 300) -> str:
    """The first non-empty line, without quotes or a leading 'Summary:'; cut at ``max_chars``."""
    for line in text.splitlines():
        line = line.strip().strip("\"'`").strip()
        if line.lower().startswith("summary:"):
            line = line[len("summary:") :].strip()
        if line:
            return line[:max_chars]
    return ""


def summarize_classes(
    lm: Any,
    pool: Pool,
    labels: Iterable[str],
    *,
    examples_per_class: int = 5,
    max_tokens: int = 40,
    template: str = "class_summary",
    primer: str = PRIMER,
    batch_size: int = 8,
    show_progress: bool = True,
) -> dict[str, str]:
    """One summary per label (labels without examples are skipped); an empty answer maps to ''."""
    labels = [lab for lab in labels if pool.indices_of(lab)]
    out: dict[str, str] = {}
    with tqdm(total=len(labels), desc="class summaries", unit="class", disable=not show_progress or not labels) as bar:
        for s in range(0, len(labels), batch_size):
            chunk = labels[s : s + batch_size]
            prompts = [
                render(
                    template,
                    label=label_text(lab),
                    primer=primer,
                    texts=[ex.text for ex in typical_examples(pool, lab, examples_per_class)],
                )
                for lab in chunk
            ]
            answers = lm.generate(prompts, max_tokens=max_tokens, temperature=0.0, stop=["\n"])
            for lab, a in zip(chunk, answers):
                body = clean_summary(a)
                out[lab] = f"{primer} {body}".strip() if body and primer else body
            bar.update(len(chunk))
    return out
