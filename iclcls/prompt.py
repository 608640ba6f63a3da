"""Prompt rendering with Jinja2 templates from ``prompts/``, fitted to the LM's context window.

Demonstrations are dropped (the first, least relevant ones under least-to-most ordering)
until the prompt fits; the query and the candidate labels are never dropped; an overlong
query is truncated as a last resort. Every such change is reported in the result's trace.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from iclcls.errors import UnknownNameError
from iclcls.types import Example

_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_JINJA_OPTIONS = dict(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False, autoescape=False)


def label_text(label: str, description: str | None = None) -> str:
    """What a label looks like to an embedder or LM: underscores become spaces."""
    name = label.replace("_", " ").strip()
    return f"{name}: {description}" if description else name


@cache
def prompts_dir() -> Path:
    """The packaged templates: ``iclcls.prompts`` in a wheel, the top-level ``prompts/`` in a checkout."""
    checkout = Path(__file__).resolve().parents[1] / "prompts"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("iclcls.prompts")))


@cache
def _env() -> jinja2.Environment:
    """Packaged templates, rendered sandboxed: a template can read the variables it is
    given, not Python internals or other files."""
    return SandboxedEnvironment(loader=jinja2.FileSystemLoader(str(prompts_dir())), **_JINJA_OPTIONS)


@cache
def _file_env() -> jinja2.Environment:
    """For a template file the caller names: sandboxed, and with no loader, so it cannot
    ``include`` or ``import`` other files."""
    return SandboxedEnvironment(**_JINJA_OPTIONS)


def packaged_templates() -> list[str]:
    """Names of the templates that ship with iclcls (``classify``, ``infer_labels``, ...)."""
    return sorted(x.stem for x in prompts_dir().glob("*.jinja"))


def is_packaged_template(name: object) -> bool:
    """Whether ``name`` names a packaged template (not a path): what an untrusted state may use."""
    return isinstance(name, str) and bool(_TEMPLATE_NAME.match(name)) and (prompts_dir() / f"{name}.jinja").is_file()


def get_template(name_or_path: str) -> jinja2.Template:
    """A packaged template by name (``classify``) or a path to a ``.jinja`` file the caller gives.

    Both render in a Jinja sandbox. A saved state may only name packaged templates unless
    it is loaded with ``trust=True`` (see ``ICLClassifier.load``).
    """
    p = Path(name_or_path)
    if p.suffix == ".jinja" and p.is_file():
        return _file_env().from_string(p.read_text(encoding="utf-8"))
    if not _TEMPLATE_NAME.match(str(name_or_path)):
        raise UnknownNameError(
            f"no prompt template {name_or_path!r}: give a packaged name ({', '.join(packaged_templates())}) or an existing .jinja file"
        )
    try:
        return _env().get_template(f"{name_or_path}.jinja")
    except jinja2.TemplateNotFound:
        raise UnknownNameError(f"no prompt template {name_or_path!r}; packaged: {', '.join(packaged_templates())}") from None


def render(template: str, **variables) -> str:
    return get_template(template).render(**variables).strip("\n")


@dataclass
class RenderedPrompt:
    text: str
    tokens: int
    demonstrations: list[int]  # pool positions actually in the prompt, in order
    trace: dict = field(default_factory=dict)
    messages: list[dict] | None = None  # the chat form (images as data URLs), when the LM reads images


@dataclass
class PromptBuilder:
    """Renders the classification prompt; labels are shown through ``verbalize`` (underscores -> spaces)."""

    template: str = "classify"
    instructions: str = "Classify the input into one of the possible labels."
    input_prefix: str = "Input: "
    label_prefix: str = "Label:"
    show_candidates: bool = True
    max_query_chars: int = 2000
    verbalize: Callable[[str], str] = label_text
    class_summaries: bool = False  # show the candidates' class summaries (InCA); the classifier fills ``summaries``
    summaries: Mapping[str, str] = field(default_factory=dict)
    summary_options: Mapping[str, Any] = field(default_factory=dict)  # for iclcls.infer.summaries.summarize_classes

    def render(self, query: str, demonstrations: Sequence[Example], candidates: Sequence[str]) -> str:
        demos = [{"text": d.text, "labels": [self.verbalize(lab) for lab in d.labels]} for d in demonstrations]
        return render(
            self.template,
            instructions=self.instructions,
            candidates=[self.verbalize(c) for c in candidates] if self.show_candidates else [],
            demonstrations=demos,
            query=query,
            input_prefix=self.input_prefix,
            label_prefix=self.label_prefix,
            summaries=[
                {"label": self.verbalize(c), "summary": self.summaries[c]}
                for c in candidates
                if self.class_summaries and self.summaries.get(c)
            ],
        )

    def _example_parts(self, ex: Example) -> list[dict]:
        """An example's images (data URLs) then its text, as chat message parts."""
        from iclcls.lm.common import image_to_url

        parts: list[dict] = [{"type": "image_url", "image_url": {"url": image_to_url(img)}} for img in ex.images]
        text = ex.text[: self.max_query_chars]
        if text.strip():
            parts.append({"type": "text", "text": f"{self.input_prefix}{text}\n"})
        return parts

    def _head_parts(self, demonstrations: Sequence[Example], candidates: Sequence[str]) -> list[dict]:
        head = self.instructions
        if self.show_candidates and candidates:
            head += "\nPossible labels: " + ", ".join(self.verbalize(c) for c in candidates)
        parts: list[dict] = [{"type": "text", "text": head + "\n"}]
        for d in demonstrations:
            parts += self._example_parts(d)
            parts.append({"type": "text", "text": f"{self.label_prefix} {', '.join(self.verbalize(lab) for lab in d.labels)}\n"})
        return parts

    def messages(self, query: Example, demonstrations: Sequence[Example], candidates: Sequence[str]) -> list[dict]:
        """The prompt as one OpenAI-format user message (ManyICL's layout): instructions and
        candidates, then each demonstration's images (as data URLs) and text followed by its
        label, then the query's images and text and the label prefix to complete."""
        parts = self._head_parts(demonstrations, candidates) + self._example_parts(query)
        parts.append({"type": "text", "text": self.label_prefix})
        return [{"role": "user", "content": parts}]

    def batch_messages(self, queries: Sequence[Example], demonstrations: Sequence[Example], candidates: Sequence[str]) -> list[dict]:
        """Several queries in one message after one copy of the demonstrations (ManyICL's query
        batching); the LM answers ``N: label`` lines."""
        parts = self._head_parts(demonstrations, candidates)
        parts.append(
            {
                "type": "text",
                "text": "Label each numbered input below. Answer with one line per input: its number, a colon, and its label.\n",
            }
        )
        for n, q in enumerate(queries, 1):
            parts.append({"type": "text", "text": f"{n}.\n"})
            parts += self._example_parts(q)
        parts.append({"type": "text", "text": "Answers:\n1:"})
        return [{"role": "user", "content": parts}]

    def build_messages(
        self,
        query: Example,
        demo_ids: Sequence[int],
        pool_examples: Sequence[Example],
        candidates: Sequence[str],
        *,
        count_tokens: Callable[[list[dict]], int] | None = None,
        budget: int | None = None,
    ) -> RenderedPrompt:
        """Chat messages (``RenderedPrompt.messages``), dropping demonstrations from the front
        until ``count_tokens(messages)`` (image tokens included) fits ``budget``."""
        ids = list(demo_ids)
        msgs = self.messages(query, [pool_examples[i] for i in ids], candidates)
        n, trace = 0, {}
        if count_tokens is not None and budget is not None:
            n = count_tokens(msgs)
            dropped = 0
            while n > budget and ids:
                ids = ids[1:]
                dropped += 1
                msgs = self.messages(query, [pool_examples[i] for i in ids], candidates)
                n = count_tokens(msgs)
            if dropped:
                trace["dropped_demonstrations"] = dropped
            if n > budget:
                raise ValueError(f"the chat prompt needs {n} tokens with no demonstrations, over the budget of {budget}")
        text = "".join(p.get("text", "<image>") for p in msgs[0]["content"])
        return RenderedPrompt(text, n, ids, trace, messages=msgs)

    def build(
        self,
        query: str,
        demo_ids: Sequence[int],
        pool_examples: Sequence[Example],
        candidates: Sequence[str],
        *,
        count_tokens: Callable[[str], int] | None,
        budget: int | None,
    ) -> RenderedPrompt:
        """Render, dropping demonstrations from the front until the prompt fits ``budget`` tokens."""
        trace: dict = {}
        ids = list(demo_ids)
        if len(query) > self.max_query_chars:
            query = query[: self.max_query_chars]
            trace["query_truncated_chars"] = self.max_query_chars
        text = self.render(query, [pool_examples[i] for i in ids], candidates)
        if count_tokens is None or budget is None:
            return RenderedPrompt(text, 0, ids, trace)
        n = count_tokens(text)
        if getattr(getattr(count_tokens, "__self__", None), "token_count_exact", True) is False:
            trace["token_count"] = "approximate"  # the LM estimated tokens (e.g. chars/4): budget is a guess
        dropped = 0
        while n > budget and ids:
            # Drop several at once when far over budget; exact count is re-measured each time.
            step = max(1, int(len(ids) * (n - budget) / max(n, 1)))
            ids = ids[step:]
            dropped += step
            text = self.render(query, [pool_examples[i] for i in ids], candidates)
            n = count_tokens(text)
        if dropped:
            trace["dropped_demonstrations"] = dropped
        while n > budget and len(query) > 16:
            query = query[: int(len(query) * budget / n * 0.95)]
            text = self.render(query, [], candidates)
            n = count_tokens(text)
            trace["query_truncated_chars"] = len(query)
        if n > budget:
            raise ValueError(
                f"the prompt needs {n} tokens with no demonstrations and a truncated query, over the "
                f"budget of {budget}: too many candidate labels for this context window; lower the shortlist k"
            )
        return RenderedPrompt(text, n, ids, trace)
