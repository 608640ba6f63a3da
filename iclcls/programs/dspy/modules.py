"""Infer-Retrieve-Rank (D'Oosterlinck et al. 2024) as DSPy modules over iclcls's parts.

- ``Infer``: a Signature, text -> comma-separated label guesses (chain of thought optional).
- ``Retrieve``: any fitted iclcls shortlister over the label space (label retriever with
  priors, ECL, kNN vote) as a DSPy step: text + guesses -> candidate labels.
- ``Rank``: text + candidates -> ranked labels. With ``constrain`` (default) the output
  field's type is ``list[Literal[candidates]]`` for each call, so DSPy's JSON adapter asks
  for a schema that only admits candidates (guided decoding: vLLM on the served path,
  :class:`iclcls.programs.dspy.lm.GuidedDecoder` on the embedded one). Written labels are mapped to
  the label space (exact, then case-insensitive); what maps to nothing is dropped and
  counted; retrieval order fills the rest.
- ``IReRa``: the three composed as in the paper, each step with its own LM if given.

One module (~440 lines) because the four steps share the signatures, the label mapping and
the per-step statistics; apart they would import each other.

Only the Predict parameters (instructions, demonstrations) are DSPy state; LMs and the
retriever are runtime parts held in :class:`Shared` so DSPy's deep copies (optimizers copy
programs many times) share them instead of copying a loaded model.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Literal

import dspy
import numpy as np

from iclcls.infer.lm_guesses import LMGuesses
from iclcls.types import Example, Query

STEPS = ("infer", "retrieve", "rank")


class Shared:
    """A runtime reference DSPy must not deep-copy (a loaded LM, a fitted retriever)."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict) -> Shared:
        return self

    def __copy__(self) -> Shared:
        return self


class StepStats:
    """Per-step counters: inputs, LM calls, outputs that parsed to no label, labels dropped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.counts = {s: {"inputs": 0, "lm_calls": 0, "unparsed": 0, "dropped": 0} for s in STEPS}

    def add(self, step: str, **values: int) -> None:
        with self._lock:
            for k, v in values.items():
                self.counts[step][k] += int(v)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for step, c in self.counts.items():
            n = c["inputs"]
            out[step] = {
                **c,
                "lm_calls_per_input": c["lm_calls"] / n if n else 0.0,
                "unparsed_share": c["unparsed"] / n if n else 0.0,
            }
        return out


class _CountLMCalls(dspy.utils.callback.BaseCallback):
    """Counts the LM calls made inside one step (retries and adapter fallbacks included)."""

    def __init__(self) -> None:
        self.calls = 0

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.calls += 1


def _run(predict: dspy.Module, lm: Any, stats: StepStats | None, step: str, **kwargs: Any) -> Any:
    """One predictor call with the step's LM (or the configured one), counting LM calls.

    A parse failure of DSPy's adapter returns None (counted as unparsed by the caller).
    """
    counter = _CountLMCalls()
    ctx: dict[str, Any] = {"callbacks": [*dspy.settings.get("callbacks", []), counter]}
    if lm is not None:
        ctx["lm"] = lm
    if dspy.settings.get("adapter") is None:
        ctx["adapter"] = dspy.JSONAdapter()
    try:
        with dspy.context(**ctx):
            return predict(**kwargs)
    except dspy.utils.exceptions.AdapterParseError:
        return None
    finally:
        if stats is not None:
            stats.add(step, lm_calls=counter.calls)


class InferSignature(dspy.Signature):
    """Given a snippet of text, write the labels it mentions as a comma-separated list of short names."""

    text: str = dspy.InputField()
    guesses: str = dspy.OutputField(desc="comma-separated labels")


class RankSignature(dspy.Signature):
    """Given a snippet of text and candidate labels, pick the candidates the text mentions, most relevant first."""

    text: str = dspy.InputField()
    candidates: list[str] = dspy.InputField()
    ranked_labels: list[str] = dspy.OutputField(desc="candidates the text mentions, most relevant first")


class Infer(dspy.Module):
    """text -> label guesses (a list of strings parsed from the LM's comma-separated answer)."""

    def __init__(
        self,
        *,
        instructions: str | None = None,
        chain_of_thought: bool = False,
        max_guesses: int = 8,
        lm: Any = None,
        stats: StepStats | None = None,
    ) -> None:
        super().__init__()
        sig = InferSignature.with_instructions(instructions) if instructions else InferSignature
        self.predict = dspy.ChainOfThought(sig) if chain_of_thought else dspy.Predict(sig)
        self.max_guesses = max_guesses
        self._lm = Shared(lm)
        self._stats = Shared(stats)

    def forward(self, text: str) -> dspy.Prediction:
        stats = self._stats.value
        out = _run(self.predict, self._lm.value, stats, "infer", text=text)
        raw = getattr(out, "guesses", None) if out is not None else None
        guesses = LMGuesses.parse(raw, self.max_guesses) if isinstance(raw, str) else []
        if stats is not None:
            stats.add("infer", inputs=1, unparsed=not guesses)
        return dspy.Prediction(guesses=guesses, raw=raw)


class Retrieve(dspy.Module):
    """A fitted iclcls retriever (an ``ICLClassifier`` with ``rank='retriever'``) as a DSPy step.

    Infer can only add: the candidates retrieved from the sentence itself are one ranked list,
    those retrieved from Infer's guesses another (each guess a query, a label's score its best
    over the guesses), and the two are merged by weighted reciprocal-rank fusion
    (:func:`iclcls.rank.fusion.fuse_rankings`). Every candidate of the sentence stays in the
    merged list, and at ``weight = 0`` the list is the sentence's own, so an LM whose guesses do
    not help (the compiler then picks 0) cannot cost recall.
    """

    def __init__(self, retriever: Any, *, k: int = 50, stats: StepStats | None = None) -> None:
        super().__init__()
        if not hasattr(retriever, "shortlister_"):
            from iclcls.errors import NotFittedError

            raise NotFittedError("Retrieve needs a fitted iclcls classifier (call fit first)")
        self._retriever = Shared(retriever)
        self.k = k
        self._stats = Shared(stats)

    @property
    def retriever(self) -> Any:
        return self._retriever.value

    def lists(self, text: str, guesses: Sequence[str] = ()) -> tuple[list[str], list[str]]:
        """(candidates from the sentence, candidates from the guesses), each best first."""
        clf = self.retriever
        guesses = [g for g in dict.fromkeys(g.strip() for g in guesses) if g]
        vecs = clf.embedder_.encode([text, *guesses])
        queries = [Query(Example(t), v) for t, v in zip([text, *guesses], vecs)]
        found = clf.shortlister_.shortlist(queries, self.k)
        best: dict[str, float] = {}
        for cands in found[1:]:
            for lab, score in zip(cands.labels, cands.scores):
                best[lab] = max(best.get(lab, -np.inf), float(score))
        from_guesses = sorted(best, key=lambda lab: -best[lab])[: self.k]
        return list(found[0].labels), from_guesses

    def forward(self, text: str, guesses: Sequence[str] = (), weight: float = 0.5) -> dspy.Prediction:
        from iclcls.rank.fusion import fuse_rankings

        from_text, from_guesses = self.lists(text, guesses)
        candidates = fuse_rankings(from_text, from_guesses, weight) if from_guesses and weight > 0 else from_text
        if self._stats.value is not None:
            self._stats.value.add("retrieve", inputs=1)
        return dspy.Prediction(candidates=candidates, from_text=from_text, from_guesses=from_guesses)


class Rank(dspy.Module):
    """text + candidates -> ranked labels: the LM's picks (mapped to the label space), then retrieval order."""

    def __init__(
        self,
        *,
        labels: Sequence[str] = (),
        instructions: str | None = None,
        rank_k: int | None = None,
        max_labels: int = 10,
        constrain: bool = True,
        chain_of_thought: bool = False,
        lm: Any = None,
        stats: StepStats | None = None,
    ) -> None:
        super().__init__()
        sig = RankSignature.with_instructions(instructions) if instructions else RankSignature
        self.predict = dspy.ChainOfThought(sig) if chain_of_thought else dspy.Predict(sig)
        self.rank_k = rank_k
        self.max_labels = max_labels
        self.constrain = constrain
        self._labels = Shared(_label_index(labels))
        self._lm = Shared(lm)
        self._stats = Shared(stats)

    def set_labels(self, labels: Sequence[str]) -> None:
        self._labels.value = _label_index(labels)

    def _signature(self, shown: Sequence[str]) -> Any:
        """The predictor's current signature (instructions may have been optimised) with the
        output restricted to ``shown``: a JSON schema of at most ``max_labels`` candidates."""
        base = _signature_of(self.predict)
        if not self.constrain or not shown:
            return base
        return base.with_updated_fields("ranked_labels", type_=candidate_list(shown, self.max_labels))

    def map_labels(self, written: Any) -> tuple[list[str], int]:
        """Written labels -> label-space labels (exact, then case-insensitive), and how many mapped to nothing."""
        exact, lower = self._labels.value
        if isinstance(written, str):
            written = [p for p in written.split(",")]
        out: list[str] = []
        dropped = 0
        for w in written or []:
            w = str(w).strip().strip("\"'`.").strip()
            if not w:
                continue
            lab = w if w in exact else lower.get(w.lower())
            if lab is None:
                dropped += 1
            elif lab not in out:
                out.append(lab)
        return out, dropped

    def forward(self, text: str, candidates: Sequence[str]) -> dspy.Prediction:
        candidates = list(candidates)
        shown = candidates[: self.rank_k] if self.rank_k else candidates
        stats = self._stats.value
        kwargs: dict[str, Any] = {"text": text, "candidates": shown}
        predict = self.predict
        if self.constrain and shown:
            kwargs["signature"] = self._signature(shown)
            if isinstance(predict, dspy.ChainOfThought):
                predict = predict.predict  # ChainOfThought does not pass a signature through
                kwargs["signature"] = kwargs["signature"].prepend(
                    "reasoning", dspy.OutputField(desc="${reasoning}"), type_=str
                )
        out = _run(predict, self._lm.value, stats, "rank", **kwargs)
        written = getattr(out, "ranked_labels", None) if out is not None else None
        picked, dropped = self.map_labels(written)
        picked = picked[: self.max_labels]
        labels = picked + [c for c in candidates if c not in set(picked)]
        if stats is not None:
            stats.add("rank", inputs=1, unparsed=not picked, dropped=dropped)
        return dspy.Prediction(ranking=labels, lm_labels=picked, dropped=dropped)


def candidate_list(choices: Sequence[str], max_items: int) -> type:
    """A list type whose JSON schema admits only ``choices``, at most ``max_items`` of them.

    DSPy builds its structured-output schema from field annotations only (a ``Field``
    constraint such as ``max_length`` is dropped), so the cap lives in the type's own
    pydantic schema. Validated values are plain lists; the prompt calls the type ``list[str]``.
    """
    from pydantic_core import core_schema

    item = Literal[tuple(dict.fromkeys(choices))]  # type: ignore[valid-type]

    class CandidateList(list):
        @classmethod
        def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
            return core_schema.list_schema(handler.generate_schema(item), max_length=max_items)

    CandidateList.__name__ = CandidateList.__qualname__ = "list[str]"
    return CandidateList


def _signature_of(predict: Any) -> Any:
    inner = getattr(predict, "predict", None)
    if isinstance(predict, dspy.ChainOfThought) and inner is not None:
        # the base signature without the reasoning field: forward() adds it back
        sig = inner.signature
        return sig.delete("reasoning") if "reasoning" in sig.output_fields else sig
    return predict.signature


def _label_index(labels: Sequence[str]) -> tuple[set[str], dict[str, str]]:
    exact = set(labels)
    lower: dict[str, str] = {}
    for lab in labels:
        lower.setdefault(lab.strip().lower(), lab)
    return exact, lower


class IReRa(dspy.Module):
    """Infer -> Retrieve -> Rank. ``infer=None`` retrieves from the text alone; ``rank=None``
    returns retrieval order. ``forward(text)`` returns ``ranking`` (labels, best first),
    ``candidates`` and ``guesses``; ``stats`` counts LM calls and unparsed outputs per step.

    Each LM step is merged with what the retriever already has by rank fusion:
    ``infer_weight`` for the guesses' candidates against the sentence's, ``rank_weight`` for
    the LM's picks against retrieval order. A weight of 0 turns the step off (no LM call), so
    a compiled program whose LM does not help is its retriever, at its cost.
    """

    def __init__(
        self,
        retriever: Any,
        *,
        infer: Infer | None = None,
        rank: Rank | None = None,
        retrieve_k: int = 50,
        infer_lm: Any = None,
        rank_lm: Any = None,
        infer_weight: float = 0.5,
        rank_weight: float = 0.5,
    ) -> None:
        super().__init__()
        self._stats = Shared(StepStats())
        self.infer = infer
        self.retrieve = Retrieve(retriever, k=retrieve_k, stats=self.stats)
        self.rank = rank
        self.infer_weight = float(infer_weight)
        self.rank_weight = float(rank_weight)
        for step in (infer, rank):
            if step is not None:
                step._stats.value = self.stats
        if rank is not None and not rank._labels.value[0]:
            rank.set_labels(list(retriever.pool_.labels))
        self.set_lms(infer=infer_lm, rank=rank_lm)

    @property
    def stats(self) -> StepStats:
        return self._stats.value

    def set_lms(self, *, infer: Any = None, rank: Any = None) -> IReRa:
        """Per-step LMs (``dspy.BaseLM``); None keeps the step's LM (or DSPy's configured one)."""
        if infer is not None and self.infer is not None:
            self.infer._lm.value = infer
        if rank is not None and self.rank is not None:
            self.rank._lm.value = rank
        return self

    def set_weights(self, *, infer: float | None = None, rank: float | None = None) -> IReRa:
        """Fusion weights in [0, 1] (None keeps the current one)."""
        for name, w in (("infer_weight", infer), ("rank_weight", rank)):
            if w is not None:
                if not 0.0 <= float(w) <= 1.0:
                    raise ValueError(f"{name} must be in [0, 1], got {w}")
                setattr(self, name, float(w))
        return self

    @property
    def uses_infer(self) -> bool:
        return self.infer is not None and self.infer_weight > 0

    @property
    def uses_rank(self) -> bool:
        return self.rank is not None and self.rank_weight > 0

    def forward(self, text: str) -> dspy.Prediction:
        from iclcls.rank.fusion import fuse_rankings

        guesses = self.infer(text=text).guesses if self.uses_infer else []
        retrieved = self.retrieve(text=text, guesses=guesses, weight=self.infer_weight)
        candidates = list(retrieved.candidates)
        lm_labels: list[str] = []
        labels = candidates
        if self.uses_rank:
            lm_labels = list(self.rank(text=text, candidates=candidates).lm_labels)
            labels = fuse_rankings(candidates, lm_labels, self.rank_weight)
        return dspy.Prediction(
            ranking=labels,
            lm_labels=lm_labels,
            candidates=candidates,
            candidate_scores=list(scores_for(candidates)),
            guesses=list(guesses),
        )


def map_threads(fn: Any, items: Sequence[Any], *, threads: int = 1) -> list[Any]:
    """``[fn(x) for x in items]`` on ``threads`` threads, in order, each with the caller's DSPy
    context. Concurrent LM steps then reach the model together, and a coalescing backend
    (:class:`iclcls.programs.dspy.lm.CoalescingLM`) serves their generations as one batch."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        futures = [pool.submit(contextvars.copy_context().run, fn, x) for x in items]
        return [f.result() for f in futures]


def as_dspy_examples(examples: Sequence[Example]) -> list[dspy.Example]:
    """iclcls Examples -> DSPy Examples (input: text; ``gold``: the labels; not ``labels``,
    which is a method of ``dspy.Example``). ``guesses`` holds the gold labels
    comma-separated, so a labelled demonstration shows Infer the answer it should write."""
    return [
        dspy.Example(text=ex.text, gold=list(ex.labels), guesses=", ".join(ex.labels)).with_inputs("text")
        for ex in examples
    ]


def rp_at_k_metric(k: int = 10):
    """A DSPy metric: RP@k of one prediction (D'Oosterlinck et al.'s rank-precision)."""
    from iclcls.metrics import rp_at_k

    def metric(example: Any, pred: Any, trace: Any = None) -> float:
        gold = list(example.gold)
        return float(rp_at_k([gold], [list(pred.ranking)], k)) if gold else 0.0

    metric.__name__ = f"rp_at_{k}"
    return metric


def scores_for(labels: Sequence[str]) -> np.ndarray:
    """Descending scores for a ranked list (rank-based: 1, 1 - 1/n, ...)."""
    n = len(labels)
    return np.array([1.0 - i / max(n, 1) for i in range(n)], dtype=np.float64)
