"""ICLClassifier: Infer -> Retrieve (shortlist classes, select demonstrations) -> Rank.

scikit-learn conventions: options are keyword-only constructor arguments stored as given,
``fit`` returns self, learned state ends in ``_``. ``fit`` trains nothing in the LM: it
embeds the pool and builds the retriever's state. ``save``/``load`` persist that state as
JSON + numpy + faiss files (atomic, no pickle); LM weights are never saved.
"""

from __future__ import annotations

import copy
import errno
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from tqdm.auto import tqdm

from iclcls.infer import INFERRERS
from iclcls.embed.image import encode_examples
from iclcls.errors import UntrustedStateError
from iclcls.io import atomic_write_json, fsync_dir, fsync_tree, load_npy, read_json, save_npy
from iclcls.lm import get_lm
from iclcls.pool import Pool
from iclcls.prompt import PromptBuilder
from iclcls.rank import RANKERS, RankContext
from iclcls.rank.base import BaseRanker
from iclcls.registry import Registry
from iclcls.select import SELECTORS
from iclcls.shortlist import SHORTLISTERS
from iclcls.types import Candidates, Example, LabelSpace, Prediction, Query, check_text

FORMAT = "iclcls-classifier"
FORMAT_VERSION = 1


def _build(spec: Any, registry: Registry) -> Any:
    """A stage from a registry name, a ``{"name": ..., **options}`` dict, or a ready object."""
    if spec is None:
        return None
    if isinstance(spec, str):
        return registry.get(spec)
    if isinstance(spec, Mapping):
        opts = dict(spec)
        try:
            name = opts.pop("name")
        except KeyError:
            raise ValueError(f"{registry.family} spec {dict(spec)!r} has no 'name'") from None
        return registry.get(name, **opts)
    return spec


def _spec_of(spec: Any, obj: Any) -> Any:
    """A JSON-able spec that rebuilds ``obj``: the given name/dict, or name + constructor options."""
    if spec is None or isinstance(spec, (str, Mapping)):
        return spec
    name = getattr(type(obj), "registry_name", None)
    if name is None:
        raise ValueError(f"cannot save a stage of type {type(obj).__name__}: it is not registered by name")
    params = inspect.signature(type(obj).__init__).parameters
    opts = {p: getattr(obj, p) for p in params if p != "self" and hasattr(obj, p)}
    return {"name": name, **opts}


def as_examples(inputs: Iterable[str | Example]) -> list[Example]:
    """Texts or Examples -> Examples, with an error that names the offending position (also
    for text the tokenizer or a JSON writer cannot take: a lone surrogate, a NUL)."""
    out = []
    for i, x in enumerate(inputs):
        if isinstance(x, Example):
            check_text(x.text, f"input {i}")
            out.append(x)
        elif isinstance(x, str):
            if not x.strip():
                raise ValueError(f"input {i} is empty or whitespace: nothing to classify")
            out.append(Example(text=check_text(x, f"input {i}")))
        else:
            raise TypeError(f"input {i} must be a str or Example, got {type(x).__name__}")
    return out


class ICLClassifier(BaseEstimator):
    """Classify with an LLM learning in context over a retrieved shortlist.

    Stages are registry names (``"knn"``), ``{"name": ..., **options}`` dicts, or objects.
    ``rank="retriever"`` needs no LM (the retriever alone); ``rank="fusion"`` mixes the LM
    with the retriever using a weight ``tune``\\ d on validation data.
    """

    def __init__(
        self,
        *,
        lm: Any = None,
        embedder: Any = None,
        shortlist: Any = "knn_vote",
        shortlist_k: int = 10,
        select: Any = "knn",
        shots: int = 8,
        rank: Any = "likelihood",
        infer: Any = None,
        prompt: Mapping[str, Any] | None = None,
        multi_label: bool = False,
        top_k: int | None = None,
        threshold: float | None = None,
        batch_size: int = 16,
        label_token_reserve: int = 32,
        show_progress: bool | None = None,
    ) -> None:
        self.lm = lm
        self.embedder = embedder
        self.shortlist = shortlist
        self.shortlist_k = shortlist_k
        self.select = select
        self.shots = shots
        self.rank = rank
        self.infer = infer
        self.prompt = prompt
        self.multi_label = multi_label
        self.top_k = top_k
        self.threshold = threshold
        self.batch_size = batch_size
        self.label_token_reserve = label_token_reserve
        self.show_progress = show_progress

    # -- fit ---------------------------------------------------------------------------
    def fit(
        self,
        examples: Sequence[Example],
        *,
        labels: LabelSpace | Sequence[str] | None = None,
        validation: Sequence[Example] | None = None,
        tune: str = "auto",
        tune_size: int = 200,
        folds: int = 5,
        seed: int = 0,
    ) -> ICLClassifier:
        """Embed the pool and build every stage's state, then tune what the ranker learns.

        ``tune``: ``"validation"`` tunes (fusion weight, threshold) and calibrates conformal
        sets on ``validation``; ``"cv"`` on ``tune_size`` pool examples predicted by
        ``folds``-fold cross-validation (each held out of the index, the shortlist and the
        demonstrations), because a few dozen validation queries over-fit; ``"none"`` skips
        it; ``"auto"`` (default) is validation when given, else cv when the ranker has
        something to tune or needs no LM (then cv is cheap). ``tuned_["tuned_on"]`` records it.
        """
        if tune not in ("auto", "validation", "cv", "none"):
            raise ValueError(f"tune must be 'auto', 'validation', 'cv' or 'none', got {tune!r}")
        if tune == "validation" and not validation:
            raise ValueError("tune='validation' needs validation= examples")
        examples = list(examples)
        for i, ex in enumerate(examples):
            if not isinstance(ex, Example):
                raise TypeError(f"fit: example {i} must be an Example, got {type(ex).__name__}")
            if not ex.labels:
                raise ValueError(f"fit: example {i} ({ex.text[:40]!r}) has no label")
            check_text(ex.text, f"fit: example {i}")
            for j, lab in enumerate(ex.labels):
                check_text(lab, f"fit: example {i} label {j}")
        space = labels if isinstance(labels, LabelSpace) else LabelSpace(labels or ())
        if labels is not None:
            for i, ex in enumerate(examples):
                unknown = [lab for lab in ex.labels if lab not in space]
                if unknown:
                    raise ValueError(f"fit: example {i} has labels {unknown} that are not in the given label space")
        if not examples and not len(space):
            raise ValueError("fit: empty label space: give training examples or labels=")
        self._check_params()
        from iclcls.embed import get_embedder

        self.embedder_ = get_embedder(self.embedder) if self.embedder is None or isinstance(self.embedder, str) else self.embedder
        self.pool_ = Pool(self.embedder_, LabelSpace(space.labels, space.descriptions))
        self.summaries_ = {}
        self._build_stages(examples=examples)
        self.tuned_: dict[str, Any] = {}
        if tune == "auto":
            tune = "validation" if validation else ("cv" if self._cv_worth_it() else "none")
        if tune == "validation":
            self.tune(validation)
        elif tune == "cv":
            self.tune_cv(examples, size=tune_size, folds=folds, seed=seed)
        return self

    def _cv_worth_it(self) -> bool:
        """Cross-validate by default when it tunes something, or when it costs no LM calls."""
        has_tune = type(self.ranker_).tune is not BaseRanker.tune
        needs_threshold = self.multi_label and self.top_k is None
        return has_tune or needs_threshold or not getattr(self.ranker_, "needs_lm", True)

    def _check_params(self) -> None:
        if self.shortlist_k < 1:
            raise ValueError(f"shortlist_k must be >= 1, got {self.shortlist_k}")
        if self.shots < 0:
            raise ValueError(f"shots must be >= 0, got {self.shots}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def _build_stages(
        self,
        *,
        selector_state: tuple[dict, dict] | None = None,
        shortlist_state: tuple[dict, dict] | None = None,
        examples: Sequence[Example] = (),
    ) -> None:
        # The LM and the Infer stage come first: a tags-input shortlister needs tags for the pool.
        self.ranker_ = _build(self.rank, RANKERS)
        self.inferrer_ = _build(self.infer, INFERRERS)
        self.builder_ = PromptBuilder(**(self.prompt or {}))
        shortlister = _build(self.shortlist, SHORTLISTERS)
        if getattr(shortlister, "input", "text") == "tags" and self.inferrer_ is None:
            raise ValueError("the shortlister's input='tags' needs an Infer stage that writes tags: set infer='tags'")
        self.selector_ = _build(self.select, SELECTORS) if self.select is not None else None
        # A selector that trains with the LM (ceil) uses the classifier's; a saved state does not retrain.
        select_needs_lm = selector_state is None and getattr(self.selector_, "needs_lm", False)
        needs_lm = getattr(self.ranker_, "needs_lm", True) or self.inferrer_ is not None or select_needs_lm
        self.lm_ = get_lm(self.lm) if needs_lm else None
        if needs_lm and self.lm_ is None:
            raise ValueError(
                f"rank={self.rank!r}{' and infer' if self.inferrer_ else ''}{' and select' if select_needs_lm else ''}"
                " need an LM: pass lm= (e.g. 'smollm2'), or use rank='retriever' for the retriever alone"
            )
        if examples:
            self.pool_.extend(self._with_tags(examples, shortlister))
        if shortlist_state is not None and hasattr(shortlister, "load_state_dict"):
            shortlister.load_state_dict(self.pool_, *shortlist_state)  # restores statistics, no refit
            self.shortlister_ = shortlister
        else:
            self.shortlister_ = shortlister.fit(self.pool_)
        if self.lm_ is not None and hasattr(self.selector_, "bind_lm"):
            self.selector_.bind_lm(self.lm_)  # many-shot sizes its demonstrations to the context; ceil trains
        if self.selector_ is not None:
            # A saved selector state replaces fitting (a trained selector is not retrained on load).
            if selector_state is not None and hasattr(self.selector_, "load_state_dict"):
                self.selector_.load_state_dict(self.pool_, *selector_state)
            else:
                self.selector_ = self.selector_.fit(self.pool_)
        if not hasattr(self, "summaries_"):
            self.summaries_: dict[str, str] = {}
        self.builder_.summaries = self.summaries_
        self._summarize_missing()

    def _with_tags(self, examples: Sequence[Example], shortlister: Any = None) -> list[Example]:
        """With a tags-input shortlister (InCA): the Infer stage writes ``metadata['tags']`` per example.

        Examples that already carry tags keep them (so tags can be precomputed or cached).
        """
        shortlister = shortlister if shortlister is not None else self.shortlister_
        examples = list(examples)
        if getattr(shortlister, "input", "text") != "tags":
            return examples
        todo = [i for i, ex in enumerate(examples) if "tags" not in ex.metadata]
        step = self.batch_size
        with tqdm(total=len(todo), desc="infer tags", unit="ex", disable=not todo or self.show_progress is False) as bar:
            for s in range(0, len(todo), step):
                chunk = todo[s : s + step]
                tags = self.inferrer_.infer(self.lm_, [examples[i].text for i in chunk])
                for i, t in zip(chunk, tags):
                    examples[i] = replace(examples[i], metadata={**examples[i].metadata, "tags": list(t)})
                bar.update(len(chunk))
        return examples

    def _summarize_missing(self) -> None:
        """Class summaries for the prompt (``prompt={"class_summaries": True}``), once per class."""
        if not getattr(self.builder_, "class_summaries", False) or self.lm_ is None:
            return
        from iclcls.infer.summaries import summarize_classes

        missing = [lab for lab in self.pool_.labels if lab not in self.summaries_]
        if missing:
            self.summaries_.update(
                summarize_classes(self.lm_, self.pool_, missing, show_progress=self.show_progress is not False,
                                  **dict(getattr(self.builder_, "summary_options", {})))
            )

    @property
    def classes_(self) -> list[str]:
        return list(self.pool_.labels)

    # -- continual addition --------------------------------------------------------------
    def add_examples(
        self, examples: Sequence[Example], *, embeddings: np.ndarray | None = None, generate: bool = True
    ) -> ICLClassifier:
        """Add examples (of known or new classes) in place: pool, index, stage statistics.

        ``embeddings`` are the examples' pool embeddings when already computed (the service
        embeds before it takes its write lock). ``generate=False`` never calls the LM: tags
        and summaries must already be there (replaying a logged addition must be deterministic),
        else ValueError before anything changes.
        """
        examples = list(examples)
        for i, ex in enumerate(examples):
            if not ex.labels:
                raise ValueError(f"add_examples: example {i} has no label")
        if not examples:
            return self
        if not generate:
            self._check_nothing_to_generate(examples)
        new_ids = self.pool_.extend(self._with_tags(examples), embeddings)
        self.shortlister_.update(self.pool_, new_ids)
        if self.selector_ is not None:
            self.selector_.update(self.pool_, new_ids)
        self._summarize_missing()
        return self

    def add_classes(
        self,
        examples: Sequence[Example],
        *,
        descriptions: Mapping[str, str] | None = None,
        summaries: Mapping[str, str] | None = None,
        embeddings: np.ndarray | None = None,
        generate: bool = True,
    ) -> ICLClassifier:
        """Add new classes by their examples: statistics update, nothing retrained or forgotten.

        ``summaries`` gives class summaries for the prompt; missing ones are written by the LM
        when the prompt shows summaries (unless ``generate=False``). ``embeddings`` and
        ``generate`` as in ``add_examples``.
        """
        if not generate:
            self._check_nothing_to_generate(examples, summaries=summaries)
        for lab, desc in (descriptions or {}).items():
            self.pool_.labels.add(lab, desc)
        self.summaries_.update(summaries or {})
        return self.add_examples(examples, embeddings=embeddings, generate=generate)

    def refresh_stale(self, *, swap: Any = None) -> list[str]:
        """Refit the stages that additions leave stale (``incremental = False`` and ``stale_``:
        the influence selector's regression, a trained CEIL adapter); return their names.

        The refit runs on a frozen view of the pool, outside any lock, so predictions and
        additions go on meanwhile; ``swap`` (a context-manager factory: the service's write
        lock) guards only the short swap, which also hands the fresh stage the additions made
        during the refit. Each stage records when it was refreshed (its ``refreshed_at``).
        """
        stage = self.selector_
        if stage is None or getattr(stage, "incremental", True) or not getattr(stage, "stale_", False):
            return []
        n = len(self.pool_)
        fresh = copy.copy(stage)
        fresh.fit(self.pool_.frozen())
        with swap() if swap is not None else nullcontext():
            fresh.pool_ = self.pool_
            if len(self.pool_) > n:
                fresh.update(self.pool_, np.arange(n, len(self.pool_), dtype=np.int64))
            self.selector_ = fresh
        return [type(stage).__name__]

    def prepare_additions(self, examples: Sequence[Example]) -> tuple[list[Example], dict[str, str]]:
        """What the LM would write while adding ``examples``, computed without changing any state:
        the examples with their tags (for a tags-input shortlister) and summaries of their classes
        that have none (when the prompt shows summaries). Pass both to ``add_classes`` to add them
        without LM calls, and log them so that replay is deterministic."""
        examples = self._with_tags(examples)
        if not getattr(self.builder_, "class_summaries", False) or self.lm_ is None:
            return examples, {}
        missing = sorted({ex.labels[0] for ex in examples if ex.labels} - set(self.summaries_))
        if not missing:
            return examples, {}
        from iclcls.infer.summaries import summarize_classes

        scratch = Pool(self.pool_.embedder)  # only these classes' new examples, as the real pool will hold them
        scratch.extend([ex for ex in examples if ex.labels and ex.labels[0] in missing])
        summaries = summarize_classes(self.lm_, scratch, missing, show_progress=False,
                                      **dict(getattr(self.builder_, "summary_options", {})))
        return examples, summaries

    def _check_nothing_to_generate(self, examples: Sequence[Example], *, summaries: Mapping[str, str] | None = None) -> None:
        if getattr(self.shortlister_, "input", "text") == "tags":
            untagged = [i for i, ex in enumerate(examples) if "tags" not in ex.metadata]
            if untagged:
                raise ValueError(f"generate=False: examples {untagged[:5]} have no tags and the shortlister needs them")
        if getattr(self.builder_, "class_summaries", False) and self.lm_ is not None:
            have = set(self.summaries_) | set(summaries or {})
            missing = sorted({lab for ex in examples for lab in ex.labels} - have)
            if missing:
                raise ValueError(f"generate=False: no summary for classes {missing[:5]} and the prompt shows summaries")

    # -- predict -------------------------------------------------------------------------
    def predict(
        self, inputs: Iterable[str | Example], *, show_progress: bool | None = None, embeddings: np.ndarray | None = None
    ) -> list[Prediction]:
        """Ranked labels for each input, with the candidates and demonstrations that produced them.

        ``embeddings``: the inputs' query embeddings (``embed_queries``) when already computed,
        e.g. by a pipeline that embeds the next chunk while this one is classified."""
        if not hasattr(self, "pool_"):
            raise RuntimeError("ICLClassifier is not fitted: call fit(examples) first")
        examples = as_examples(inputs)
        if embeddings is not None and len(embeddings) != len(examples):
            raise ValueError(f"predict: {len(embeddings)} embeddings for {len(examples)} inputs")
        show = self.show_progress if show_progress is None else show_progress
        if show is None:
            show = len(examples) > 4 * self.batch_size
        out: list[Prediction] = []
        with tqdm(total=len(examples), desc="predict", unit="ex", disable=not show) as bar:
            for i in range(0, len(examples), self.batch_size):
                batch = examples[i : i + self.batch_size]
                out.extend(self._predict_batch(batch, None if embeddings is None else embeddings[i : i + self.batch_size]))
                bar.update(len(batch))
        return out

    def embed_queries(self, inputs: Iterable[str | Example]) -> np.ndarray:
        """The query embeddings ``predict`` would compute for ``inputs`` (pass them as ``embeddings=``)."""
        return encode_examples(self.embedder_, as_examples(inputs))

    def _queries(self, examples: Sequence[Example], emb: np.ndarray | None = None) -> list[Query]:
        if emb is None:
            emb = encode_examples(self.embedder_, examples)  # images through an image embedder
        queries = [Query(ex, e) for ex, e in zip(examples, emb)]
        if self.inferrer_ is not None:
            guesses = self.inferrer_.infer(self.lm_, [ex.text for ex in examples])
            flat = [g for gs in guesses for g in gs]
            vecs = self.embedder_.encode(flat) if flat else np.zeros((0, emb.shape[1]), np.float32)
            pos = 0
            for q, gs in zip(queries, guesses):
                q.guesses = tuple(gs)
                q.guess_embeddings = vecs[pos : pos + len(gs)]
                q.trace["infer"] = list(gs)
                pos += len(gs)
        return queries

    def shortlist_candidates(self, inputs: Iterable[str | Example]) -> list[Candidates]:
        """The shortlist alone (no LM): for recall measurements and inspection."""
        examples = as_examples(inputs)
        out: list[Candidates] = []
        for i in range(0, len(examples), 256):
            out += self.shortlister_.shortlist(self._queries(examples[i : i + 256]), self.shortlist_k)
        return out

    def _predict_batch(self, examples: Sequence[Example], emb: np.ndarray | None = None) -> list[Prediction]:
        queries = self._queries(examples, emb)
        cands = self.shortlister_.shortlist(queries, self.shortlist_k)
        prompts = []
        if getattr(self.ranker_, "needs_prompts", getattr(self.ranker_, "needs_lm", True)):
            demo_ids = (
                self.selector_.select(queries, cands, self.shots)
                if self.selector_ is not None and self.shots > 0
                else [[] for _ in queries]
            )
            budget = self.lm_.context_window - self.label_token_reserve
            prompts = [
                self.builder_.build(
                    q.text, ids, self.pool_.examples, c.labels, count_tokens=self.lm_.count_tokens, budget=budget
                )
                for q, ids, c in zip(queries, demo_ids, cands)
            ]
        ctx = RankContext(self.lm_, queries, cands, prompts, self.builder_, self.pool_)
        ranker = self.ranker_
        if prompts and not getattr(ranker, "reads_images", False) and any(q.example.images for q in queries):
            ranker = RANKERS.get("chat")  # images reach the LM only through its chat API
        rankings = ranker.rank(ctx) if cands else []
        preds = []
        for i, (q, c, r) in enumerate(zip(queries, cands, rankings)):
            p = prompts[i] if prompts else None
            trace = {**q.trace, **(p.trace if p else {}), **r.trace}
            if p is not None:
                trace["prompt"] = p.text
            preds.append(
                Prediction(
                    labels=tuple(r.labels),
                    scores=tuple(r.scores),
                    candidates=tuple(c.labels),
                    demonstrations=tuple(self.pool_.examples[j] for j in (p.demonstrations if p else [])),
                    prompt_tokens=p.tokens if p else 0,
                    trace=trace,
                )
            )
        return preds

    def decide(self, pred: Prediction) -> tuple[str, ...]:
        """The predicted label set: top-1, or (multi-label) top-k / scores over the threshold."""
        if not pred.labels:
            return ()
        if not self.multi_label:
            return (pred.labels[0],)
        if self.top_k is not None:
            return pred.labels[: self.top_k]
        thr = self.tuned_.get("threshold", self.threshold)
        if thr is None:
            return (pred.labels[0],)
        chosen = tuple(lab for lab, s in zip(pred.labels, pred.scores) if s >= thr)
        return chosen or (pred.labels[0],)

    def predict_labels(self, inputs: Iterable[str | Example]) -> list[Any]:
        """Single-label: one label per input. Multi-label: a tuple of labels per input."""
        preds = self.predict(inputs)
        if self.multi_label:
            return [self.decide(p) for p in preds]
        return [p.label for p in preds]

    # -- tuning and calibration ------------------------------------------------------------
    def tune(self, validation: Sequence[Example]) -> ICLClassifier:
        """Tune the ranker (e.g. the fusion weight) and the multi-label threshold on validation data."""
        validation = [ex for ex in validation if ex.labels]
        if not validation:
            raise ValueError("tune: the validation examples carry no labels")
        return self._tune_on(validation, lambda: self.predict(validation), tuned_on=f"validation ({len(validation)})")

    def tune_cv(self, examples: Sequence[Example], *, size: int = 200, folds: int = 5, seed: int = 0) -> ICLClassifier:
        """Tune and calibrate on cross-validation predictions of (a seeded subset of) the pool."""
        held, predict = self._cv_plan(list(examples), size=size, folds=folds, seed=seed)
        if not held:
            return self
        return self._tune_on(held, predict, tuned_on=f"cv ({len(held)} pool examples, {folds} folds, seed {seed})")

    def cross_val_predict(
        self, examples: Sequence[Example], *, size: int = 200, folds: int = 5, seed: int = 0
    ) -> tuple[list[Example], list[Prediction]]:
        """Predictions for a seeded subset of ``examples``, each from a classifier fitted without its fold."""
        held, predict = self._cv_plan(list(examples), size=size, folds=folds, seed=seed)
        return (held, predict()) if held else ([], [])

    def _cv_plan(self, examples: list[Example], *, size: int, folds: int, seed: int):
        """Held-out examples and a function predicting each with a classifier fitted without its fold."""
        labelled = [i for i, ex in enumerate(examples) if ex.labels]
        folds = max(2, int(folds))
        if len(labelled) < 2 * folds:
            return [], None
        rng = np.random.default_rng(seed)
        pick = sorted(rng.choice(labelled, size=min(size, len(labelled)), replace=False).tolist())
        fold_of = {i: f for f, part in enumerate(np.array_split(rng.permutation(pick), folds)) for i in part.tolist()}
        held = [examples[i] for i in pick]
        # Pool examples carry their Infer tags already: folds reuse them instead of re-inferring.
        pool_examples = self.pool_.examples if len(self.pool_.examples) == len(examples) else examples

        # Each fold builds fresh stages from their specs, sharing only the LM and the embedder.
        fold_params = {
            **self.get_params(deep=False),
            "lm": self.lm_, "embedder": self.embedder_, "show_progress": False,
            "shortlist": _spec_of(self.shortlist, self.shortlister_),
            "select": _spec_of(self.select, self.selector_),
            "rank": _spec_of(self.rank, self.ranker_),
        }

        def predict() -> list[Prediction]:
            out: dict[int, Prediction] = {}
            with tqdm(total=len(pick), desc="cross-validate", unit="ex", disable=self.show_progress is False) as bar:
                for f in range(folds):
                    test_ids = [i for i in pick if fold_of[i] == f]
                    keep = [ex for i, ex in enumerate(pool_examples) if fold_of.get(i) != f]
                    sub = type(self)(**fold_params)
                    sub.fit(keep, labels=self.pool_.labels, tune="none")
                    for i, p in zip(test_ids, sub.predict([examples[i] for i in test_ids], show_progress=False)):
                        out[i] = p
                    bar.update(len(test_ids))
            return [out[i] for i in pick]

        return held, predict

    def _tune_on(self, examples: Sequence[Example], predict, *, tuned_on: str) -> ICLClassifier:
        preds = predict()
        gold = [ex.labels for ex in examples]
        tuned = dict(self.ranker_.tune([p.trace for p in preds], gold))
        if tuned:  # the ranker changed: so did its scores
            preds = self._rescored(preds, predict)
        if self.multi_label and self.top_k is None:
            tuned["threshold"] = _best_threshold(preds, gold)
        tuned["tuned_on"] = tuned_on
        tuned["conformal"] = self._calibration(preds, gold)
        self.tuned_ = tuned
        self.tuning_predictions_ = preds  # in memory only (not saved): reports and model selection read them
        return self

    def _rescored(self, preds: list[Prediction], predict) -> list[Prediction]:
        """Predictions under the tuned ranker: re-scored from their traces when it can, else re-run."""
        rescore = getattr(self.ranker_, "rescore", None)
        if rescore is None:
            return predict()
        out = []
        for p in preds:
            r = rescore(p.trace)
            out.append(replace(p, labels=tuple(r.labels), scores=tuple(float(x) for x in r.scores), trace={**p.trace, **r.trace}))
        return out

    def _calibration(self, preds: Sequence[Prediction], gold: Sequence[Sequence[str]]) -> dict[str, Any]:
        """What conformal sets need later: single-label nonconformity scores, or the multi-label predictions."""
        from iclcls.rank.conformal import nonconformity

        if self.multi_label:
            return {"kind": "multi", "n": len(preds),
                    "preds": [[list(p.labels[:50]), [round(float(x), 6) for x in p.scores[:50]], list(g)] for p, g in zip(preds, gold)]}
        return {"kind": "single", "n": len(preds),
                "scores": [round(nonconformity(p.labels, p.scores, g), 6) for p, g in zip(preds, gold)]}

    def predict_set(self, inputs: Iterable[str | Example], *, alpha: float = 0.1) -> list[tuple[str, ...]]:
        """Conformal label sets: each holds the gold label with probability >= 1 - alpha (single-label),
        or misses at most an alpha share of gold labels in expectation (multi-label, risk control).

        Calibrated on the tuning predictions ``fit`` made (cross-validation or validation)."""
        if not ((getattr(self, "tuned_", None) or {}).get("conformal") or {}).get("n"):
            raise RuntimeError("predict_set needs conformal calibration: fit with tune='cv' or validation=")
        return self.conformal_sets(self.predict(inputs), alpha=alpha)

    def conformal_sets(self, preds: Sequence[Prediction], *, alpha: float = 0.1) -> list[tuple[str, ...]]:
        """``predict_set`` for predictions already made (no second LM pass)."""
        from iclcls.rank import conformal as cp

        cal = (getattr(self, "tuned_", None) or {}).get("conformal")
        if not cal or not cal.get("n"):
            raise RuntimeError("conformal sets need conformal calibration: fit with tune='cv' or validation=")
        if cal["kind"] == "multi":
            lam = cp.crc_lambda([(labs, sc) for labs, sc, _ in cal["preds"]], [g for _, _, g in cal["preds"]], alpha)
            return [cp.multi_label_set(p.labels, p.scores, lam) or p.labels[:1] for p in preds]
        qhat = cp.conformal_quantile(cal["scores"], alpha)
        return [cp.single_label_set(p.labels, p.scores, qhat) for p in preds]

    # -- persistence -----------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write the state to ``directory`` atomically (a temp folder renamed into place)."""
        if not hasattr(self, "pool_"):
            raise RuntimeError("cannot save an unfitted ICLClassifier")
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            params = self.get_params(deep=False)
            params["lm"] = self.lm if isinstance(self.lm, str) or self.lm is None else None
            params["embedder"] = self.embedder if isinstance(self.embedder, str) or self.embedder is None else self.embedder_.name
            params["shortlist"] = _spec_of(self.shortlist, self.shortlister_)
            params["select"] = _spec_of(self.select, self.selector_)
            params["rank"] = _spec_of(self.rank, self.ranker_)
            params["infer"] = self.infer if isinstance(self.infer, (str, Mapping)) or self.infer is None else None
            stages = {}
            for key, stage in (("shortlist", self.shortlister_), ("select", self.selector_)):
                if stage is not None and hasattr(stage, "state_dict"):
                    meta, arrays = stage.state_dict()
                    for name, arr in arrays.items():
                        save_npy(tmp / "stages" / f"{key}.{name}.npy", arr)
                    stages[key] = {"meta": meta, "arrays": sorted(arrays)}
            self.pool_.save(tmp / "pool")
            atomic_write_json(
                tmp / "config.json",
                {
                    "format": FORMAT,
                    "version": FORMAT_VERSION,
                    "params": params,
                    "lm_name": getattr(self.lm_, "name", None),
                    "embedder_name": self.embedder_.name,
                    "tuned": self.tuned_,
                    "ranker_state": self.ranker_.tuned_state() if hasattr(self.ranker_, "tuned_state") else {},
                    "stages": stages,
                    "summaries": self.summaries_,
                },
            )
            _replace_dir(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(
        cls, directory: str | Path, *, lm: Any = None, embedder: Any = None, trust: bool = False
    ) -> ICLClassifier:
        """Rebuild a saved classifier. ``lm`` overrides the saved LM spec (needed if it was an object).

        A state folder is untrusted input: ``config.json`` is validated against a strict schema
        (``ValueError`` naming the field), and a state that names an LM endpoint or local
        model, a file path or a template file raises ``UntrustedStateError`` unless
        ``trust=True`` or the caller overrides it (``lm=``, ``embedder=``). The faiss index is
        read only from the state's own file, after its recorded size and SHA-256 match.
        """
        d = Path(directory)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{d}: not a saved ICLClassifier (no config.json)")
        cfg = _validate_state(d / "config.json", read_json(d / "config.json"), cls)
        params = dict(cfg["params"])
        if not trust:
            problems = _untrusted_parts(d, params, lm_given=lm is not None, embedder_given=embedder is not None)
            if problems:
                raise UntrustedStateError(
                    f"{d}: refusing to load an untrusted state: " + "; ".join(problems) + ". A saved state is "
                    "data: it may not choose an LM endpoint or local model, read files, or bring templates. "
                    "If you trust whoever made this folder, load it with trust=True (CLI: --trust-state); "
                    "or override the LM with lm=... (CLI: --lm)"
                )
        if lm is not None:
            params["lm"] = lm
        if embedder is not None:
            params["embedder"] = embedder
        clf = cls(**params)
        from iclcls.embed import get_embedder

        clf.embedder_ = get_embedder(clf.embedder) if clf.embedder is None or isinstance(clf.embedder, str) else clf.embedder
        if clf.embedder_.name != cfg.get("embedder_name"):
            raise ValueError(
                f"{d}: saved with embedder {cfg.get('embedder_name')!r} but loading with {clf.embedder_.name!r}; "
                "pass embedder= the same model"
            )
        clf.pool_ = Pool.load(d / "pool", clf.embedder_, require_checksum=not trust, trust=trust)
        states = {}
        for key, info in cfg.get("stages", {}).items():
            if info:
                states[key] = (info["meta"], {n: load_npy(d / "stages" / f"{key}.{n}.npy") for n in info["arrays"]})
        clf.summaries_ = dict(cfg.get("summaries", {}))
        clf._build_stages(selector_state=states.get("select"), shortlist_state=states.get("shortlist"))
        ranker_state = cfg.get("ranker_state", {})
        if ranker_state and hasattr(clf.ranker_, "tuned_state"):
            unknown = sorted(set(ranker_state) - set(clf.ranker_.tuned_state()))
            if unknown:
                raise ValueError(
                    f"{d / 'config.json'}: field ranker_state: keys {unknown} are not state of the "
                    f"{type(clf.ranker_).__name__} ranker"
                )
        if hasattr(clf.ranker_, "load_tuned_state"):
            clf.ranker_.load_tuned_state(ranker_state)
        clf.tuned_ = cfg.get("tuned", {})
        return clf

def _best_threshold(preds: Sequence[Prediction], gold: Sequence[Sequence[str]]) -> float:
    """The score threshold with the best micro-F1 on validation (top-1 always kept)."""
    cand = np.unique(np.concatenate([np.asarray(p.scores[:20]) for p in preds if p.scores] or [np.zeros(1)]))
    best, best_f1 = float(cand.max()), -1.0
    for thr in cand[:: max(1, len(cand) // 200)]:
        tp = fp = fn = 0
        for p, g in zip(preds, gold):
            chosen = {lab for lab, s in zip(p.labels, p.scores) if s >= thr} or {p.labels[0]}
            g = set(g)
            tp += len(chosen & g)
            fp += len(chosen - g)
            fn += len(g - chosen)
        f1 = 2 * tp / max(2 * tp + fp + fn, 1)
        if f1 > best_f1:
            best, best_f1 = float(thr), f1
    return best


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` onto ``dst``: its files and folders are fsynced first.

    An existing ``dst`` is swapped with ``src`` in one atomic ``renameat2(RENAME_EXCHANGE)``
    (Linux), so a crash at any instant leaves either the old or the new state under ``dst``.
    Elsewhere the old folder is moved aside, and moved back if the second rename fails.
    """
    fsync_tree(src)
    if dst.exists() and _exchange(src, dst):
        fsync_dir(dst.parent)
        shutil.rmtree(src, ignore_errors=True)  # now the old state
        return
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)  # the previous state, unchanged
        raise
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # this filesystem cannot: fall back
    raise OSError(err, os.strerror(err), str(b))


# -- a saved state is untrusted input: its schema and what it may ask for -------------------

_STAGE_KEYS = ("shortlist", "select")
_ARRAY_NAME = r"^[A-Za-z0-9_]+$"
# Free-text options: words, not file names (everything else is checked for paths).
_TEXT_OPTIONS = frozenset({"instructions", "input_prefix", "label_prefix", "primer", "name", "order"})
_FILE_SUFFIXES = frozenset(
    ".json .jsonl .csv .tsv .parquet .txt .jinja .j2 .yaml .yml .npy .npz .faiss .gguf .bin .pt .pth "
    ".safetensors .pkl .pickle .py .sh .db .sqlite".split()
)


def _state_models(cls: type) -> tuple[type, type]:
    """The pydantic models of ``config.json``: strict, unknown fields refused. Constructor
    options this schema does not type yet (a new option) are accepted as JSON values."""
    from typing import Annotated, Literal, Optional, Union

    from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

    Spec = Optional[Union[str, dict[str, Any]]]
    typed: dict[str, Any] = {
        "lm": Optional[str], "embedder": Optional[str], "shortlist": Spec, "select": Spec, "rank": Spec,
        "infer": Spec, "prompt": Optional[dict[str, Any]], "shortlist_k": int, "shots": int,
        "multi_label": bool, "top_k": Optional[int], "threshold": Optional[float], "batch_size": int,
        "label_token_reserve": int, "show_progress": Optional[bool],
    }  # fmt: skip
    fields = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        fields[name] = (typed.get(name, Any), default)
    strict = ConfigDict(extra="forbid", strict=True)
    Params = create_model("StateParams", __config__=strict, **fields)

    class StageState(BaseModel):
        model_config = strict
        meta: dict[str, Any]
        arrays: list[Annotated[str, StringConstraints(pattern=_ARRAY_NAME)]]

    class StateConfig(BaseModel):
        model_config = strict
        format: Literal["iclcls-classifier"]
        version: int = Field(ge=1, le=FORMAT_VERSION)
        params: Params  # type: ignore[valid-type]
        lm_name: Optional[str] = None
        embedder_name: str
        tuned: dict[str, Any] = {}
        ranker_state: dict[str, Any] = {}
        stages: dict[Literal["shortlist", "select"], Optional[StageState]] = {}
        summaries: dict[str, str] = {}

    return Params, StateConfig


def _validate_state(path: Path, raw: Any, cls: type) -> dict[str, Any]:
    """``config.json`` checked against the schema; a ``ValueError`` names the first bad fields."""
    from pydantic import ValidationError

    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    if isinstance(raw.get("version"), int):
        if raw["version"] > FORMAT_VERSION:
            raise ValueError(f"{path.parent}: saved by a newer iclcls (format version {raw['version']})")
    _, StateConfig = _state_models(cls)
    try:
        model = StateConfig.model_validate(raw)
    except ValidationError as e:
        errs = []
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            got = repr(err.get("input"))[:80]
            errs.append(f"field {where}: {err['msg']} (got {got})")
        more = f" (+{e.error_count() - 5} more)" if e.error_count() > 5 else ""
        raise ValueError(f"{path}: not a valid iclcls state: " + "; ".join(errs) + more) from None
    out = model.model_dump()
    out["params"] = {k: v for k, v in out["params"].items() if k in raw["params"]}  # keep defaults implicit
    return out


def _untrusted_parts(d: Path, params: Mapping[str, Any], *, lm_given: bool, embedder_given: bool) -> list[str]:
    """What in a state only a trusted state may ask for, each with why."""
    problems = []
    if not lm_given and params.get("lm") is not None:
        why = _lm_spec_problem(params["lm"])
        if why:
            problems.append(f"lm {params['lm']!r} {why}")
    emb = params.get("embedder")
    if not embedder_given and isinstance(emb, str):
        why = _embedder_spec_problem(emb)
        if why:
            problems.append(f"embedder {emb!r} {why}")
    for key in ("shortlist", "select", "rank", "infer", "prompt"):
        spec = params.get(key)
        if isinstance(spec, Mapping):
            problems += _option_problems(spec, f"{key}")
    for p in sorted(d.rglob("*")):
        if p.is_symlink():
            problems.append(f"{p.relative_to(d)} is a symbolic link (a state is read only from its own files)")
    return problems


def _lm_spec_problem(spec: str) -> str | None:
    """Why an LM spec from a state is not safe to follow, or None for a registry model name."""
    from iclcls.lm.models import OFFLINE_MODELS

    base = spec.removesuffix("+cache")
    kind, sep, rest = base.partition(":")
    if kind == "openai" and sep:
        return "is an LM endpoint (every input would be sent to that server)"
    name = rest if sep and kind in ("vllm", "hf") else base
    if name in OFFLINE_MODELS:
        return None
    if _looks_like_path(name):
        return "is a filesystem path (a state may name registry models, not load local files)"
    return f"is not a registry model name ({', '.join(sorted(OFFLINE_MODELS))})"


def _embedder_spec_problem(spec: str) -> str | None:
    """Why an embedder spec from a state is not safe to follow, or None for a known offline
    name: an allow-list, like the LM's (``st:../models``, ``clip:./x`` and Hub names need trust)."""
    from iclcls.embed import is_known_embedder

    if is_known_embedder(spec):
        return None
    model = spec.partition(":")[2] if spec.startswith(("st:", "clip:")) else spec
    if _looks_like_path(model) or Path(model).exists():
        return "is a local path (a state may name known models, not load files)"
    return ("is not a known offline embedder (default, all-MiniLM-L6-v2, mpnet, pixels[:WxH[:L|RGB]]); "
            "a state may not choose a model to download")


def _looks_like_path(text: str) -> bool:
    if not text:
        return False
    if text.startswith(("/", "~", ".", "\\")) or "\\" in text or Path(text).suffix.lower() in _FILE_SUFFIXES:
        return True
    if "/" in text:  # "org/model" Hub names are fine unless such a path exists here
        return Path(text).exists() or text.count("/") > 1
    return False  # a bare word is an option value (a file would need a suffix or a folder)


def _option_problems(options: Any, where: str) -> list[str]:
    """Template files and file paths among a stage's options (recursively)."""
    from iclcls.prompt import is_packaged_template

    out = []
    if isinstance(options, Mapping):
        for key, value in options.items():
            here = f"{where}.{key}"
            if key == "template" or key.endswith("_template"):
                if value is not None and not is_packaged_template(value):
                    out.append(f"{here} {value!r} is not a packaged template (a state may not bring template files)")
            elif key == "validation" and isinstance(value, str):
                if value != "holdout" and not re.fullmatch(r"benchmark:[\w.-]+", value):
                    out.append(f"{here} {value!r} is a file path (a state may not read files)")
            elif isinstance(value, str):
                if key not in _TEXT_OPTIONS and _looks_like_path(value):
                    out.append(f"{here} {value!r} is a file path (a state may not read files)")
            else:
                out += _option_problems(value, here)
    elif isinstance(options, (list, tuple)):
        for i, value in enumerate(options):
            if isinstance(value, str):
                if _looks_like_path(value):
                    out.append(f"{where}[{i}] {value!r} is a file path (a state may not read files)")
            else:
                out += _option_problems(value, f"{where}[{i}]")
    return out


def dump_predictions(preds: Sequence[Prediction]) -> str:
    return "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in preds)
