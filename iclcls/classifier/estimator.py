"""ICLClassifier: Infer -> Retrieve (shortlist classes, select demonstrations) -> Rank.

scikit-learn conventions: options are keyword-only constructor arguments stored as given,
``fit`` returns self, learned state ends in ``_``. ``fit`` trains nothing in the LM: it
embeds the pool and builds the retriever's state. Continual addition (``classifier.additions``),
tuning (``classifier.tuning``), persistence (``classifier.persistence``) and the scikit-learn
face (``classifier.sklearn_api``) are mixins in their own modules; this one builds the stages
and predicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from tqdm.auto import tqdm

from iclcls.classifier.additions import Additions
from iclcls.classifier.persistence import Persistence
from iclcls.classifier.sklearn_api import SklearnClassifier, training_examples
from iclcls.classifier.specs import build_stage
from iclcls.classifier.tuning import Tuning
from iclcls.embed.image import encode_examples
from iclcls.errors import ConfigError, DataError
from iclcls.infer import INFERRERS
from iclcls.infer.base import Inferrer
from iclcls.infer.summaries import summarize_classes
from iclcls.lm import get_lm
from iclcls.pool import Pool
from iclcls.prompt import PromptBuilder
from iclcls.rank import RANKERS, RankContext
from iclcls.rank.base import BaseRanker, Ranker
from iclcls.select import SELECTORS
from iclcls.select.base import Selector
from iclcls.shortlist import SHORTLISTERS
from iclcls.shortlist.base import Shortlister
from iclcls.types import Candidates, Example, LabelSpace, Prediction, Query, check_text


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
                raise DataError(f"input {i} is empty or whitespace: nothing to classify")
            out.append(Example(text=check_text(x, f"input {i}")))
        else:
            raise TypeError(f"input {i} must be a str or Example, got {type(x).__name__}")
    return out


class ICLClassifier(Additions, Tuning, Persistence, SklearnClassifier, BaseEstimator):
    """Classify with an LLM learning in context over a retrieved shortlist.

    Stages are registry names (``"knn"``), ``{"name": ..., **options}`` dicts, or objects
    that satisfy their family's Protocol. ``rank="retriever"`` needs no LM (the retriever
    alone; the default ``"auto"`` is ``"likelihood"`` with an LM, the retriever without);
    ``rank="fusion"`` mixes the LM with the retriever using a weight ``tune``\\ d on
    validation data. A scikit-learn classifier: ``fit(texts, labels)``, ``predict`` returns
    labels; ``predict_detailed`` returns ``Prediction`` objects (ranking, scores, candidates,
    demonstrations, prompt).
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
        rank: Any = "auto",
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
        X: Iterable[Any],
        y: Any = None,
        *,
        labels: LabelSpace | Sequence[str] | None = None,
        validation: Sequence[Example] | None = None,
        tune: str = "auto",
        tune_size: int = 200,
        folds: int = 5,
        seed: int = 0,
    ) -> ICLClassifier:
        """Embed the pool and build every stage's state, then tune what the ranker learns.

        ``X``: Examples with their labels, or texts (or Examples) with ``y`` (a class name per
        input, or a list of class names for multi-label); ``labels``: the label space when it
        has classes without examples.

        ``tune``: ``"validation"`` tunes (fusion weight, threshold) and calibrates conformal
        sets on ``validation``; ``"cv"`` on ``tune_size`` pool examples predicted by
        ``folds``-fold cross-validation (each held out of the index, the shortlist and the
        demonstrations), because a few dozen validation queries over-fit; ``"none"`` skips
        it; ``"auto"`` (default) is validation when given, else cv when the ranker has
        something to tune or needs no LM (then cv is cheap). ``tuned_["tuned_on"]`` records it.
        """
        if tune not in ("auto", "validation", "cv", "none"):
            raise ConfigError(f"tune must be 'auto', 'validation', 'cv' or 'none', got {tune!r}")
        if tune == "validation" and not validation:
            raise ConfigError("tune='validation' needs validation= examples")
        examples = training_examples(X, y)
        for i, ex in enumerate(examples):
            if not ex.labels:
                raise DataError(f"fit: example {i} ({ex.text[:40]!r}) has no label")
            check_text(ex.text, f"fit: example {i}")
            for j, lab in enumerate(ex.labels):
                check_text(lab, f"fit: example {i} label {j}")
        space = labels if isinstance(labels, LabelSpace) else LabelSpace(labels or ())
        if labels is not None:
            for i, ex in enumerate(examples):
                unknown = [lab for lab in ex.labels if lab not in space]
                if unknown:
                    raise DataError(f"fit: example {i} has labels {unknown} that are not in the given label space")
        if not examples and not len(space):
            raise DataError("fit: empty label space: give training examples or labels=")
        self._check_params()
        from iclcls.embed import get_embedder

        self.embedder_ = get_embedder(self.embedder) if self.embedder is None or isinstance(self.embedder, str) else self.embedder
        self.pool_ = Pool(self.embedder_, LabelSpace(space.labels, space.descriptions))
        self.summaries_ = {}
        self._build_stages(examples=examples)
        self.tuned_ = {}
        if tune == "auto":
            tune = "validation" if validation else ("cv" if self._cv_worth_it() else "none")
        if tune == "validation" and validation:  # (checked above)
            self.tune(validation)
        elif tune == "cv":
            self.tune_cv(examples, size=tune_size, folds=folds, seed=seed)
        return self

    def rank_spec(self) -> Any:
        """The ranker asked for: ``rank="auto"`` is the LM's likelihood with an LM, else the retriever."""
        if self.rank == "auto":
            return "likelihood" if self.lm is not None else "retriever"
        return self.rank

    def _cv_worth_it(self) -> bool:
        """Cross-validate by default when it tunes something, or when it costs no LM calls."""
        has_tune = type(self.ranker_).tune is not BaseRanker.tune
        needs_threshold = self.multi_label and self.top_k is None
        return has_tune or needs_threshold or not self.ranker_.needs_lm

    def _check_params(self) -> None:
        if self.shortlist_k < 1:
            raise ConfigError(f"shortlist_k must be >= 1, got {self.shortlist_k}")
        if self.shots < 0:
            raise ConfigError(f"shots must be >= 0, got {self.shots}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    def _build_stages(
        self,
        *,
        selector_state: tuple[dict, dict] | None = None,
        shortlist_state: tuple[dict, dict] | None = None,
        examples: Sequence[Example] = (),
    ) -> None:
        # The LM and the Infer stage come first: a tags-input shortlister needs tags for the pool.
        self.ranker_ = build_stage(self.rank_spec(), RANKERS, Ranker)
        self.inferrer_ = build_stage(self.infer, INFERRERS, Inferrer)
        self.builder_ = PromptBuilder(**(self.prompt or {}))
        shortlister = build_stage(self.shortlist, SHORTLISTERS, Shortlister)
        if shortlister.input == "tags" and self.inferrer_ is None:
            raise ConfigError("the shortlister's input='tags' needs an Infer stage that writes tags: set infer='tags'")
        self.selector_ = build_stage(self.select, SELECTORS, Selector)
        # A selector that trains with the LM (ceil) uses the classifier's; a saved state does not retrain.
        select_needs_lm = selector_state is None and self.selector_ is not None and self.selector_.needs_lm
        needs_lm = self.ranker_.needs_lm or self.inferrer_ is not None or select_needs_lm
        self.lm_ = get_lm(self.lm) if needs_lm else None
        if needs_lm and self.lm_ is None:
            raise ConfigError(
                f"rank={self.rank_spec()!r}{' and infer' if self.inferrer_ else ''}{' and select' if select_needs_lm else ''}"
                " need an LM: pass lm= (e.g. 'smollm2'), or use rank='retriever' for the retriever alone"
            )
        if examples:
            self.pool_.extend(self._with_tags(examples, shortlister))
        if shortlist_state is not None:
            shortlister.load_state_dict(self.pool_, *shortlist_state)  # restores statistics, no refit
            self.shortlister_ = shortlister
        else:
            self.shortlister_ = shortlister.fit(self.pool_)
        if self.selector_ is not None:
            if self.lm_ is not None:
                self.selector_.bind_lm(self.lm_)  # many-shot sizes its demonstrations to the context; ceil trains
            # A saved selector state replaces fitting (a trained selector is not retrained on load).
            if selector_state is not None:
                self.selector_.load_state_dict(self.pool_, *selector_state)
            else:
                self.selector_ = self.selector_.fit(self.pool_)
        if not hasattr(self, "summaries_"):
            self.summaries_ = {}
        self.builder_.summaries = self.summaries_
        self._summarize_missing()

    def _with_tags(self, examples: Sequence[Example], shortlister: Any = None) -> list[Example]:
        """With a tags-input shortlister (InCA): the Infer stage writes ``metadata['tags']`` per example.

        Examples that already carry tags keep them (so tags can be precomputed or cached).
        """
        shortlister = shortlister if shortlister is not None else self.shortlister_
        examples = list(examples)
        if shortlister.input != "tags":
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
        if not self.builder_.class_summaries or self.lm_ is None:
            return
        missing = [lab for lab in self.pool_.labels if lab not in self.summaries_]
        if missing:
            self.summaries_.update(
                summarize_classes(
                    self.lm_, self.pool_, missing, show_progress=self.show_progress is not False, **dict(self.builder_.summary_options)
                )
            )

    @property
    def classes_(self) -> np.ndarray:
        self._check_fitted("classes_")
        return np.array(list(self.pool_.labels), dtype=object)

    # -- predict -------------------------------------------------------------------------
    def predict_detailed(
        self, inputs: Iterable[str | Example], *, show_progress: bool | None = None, embeddings: np.ndarray | None = None
    ) -> list[Prediction]:
        """Ranked labels for each input, with the candidates and demonstrations that produced them
        (``predict`` gives the labels alone, as scikit-learn does).

        ``embeddings``: the inputs' query embeddings (``embed_queries``) when already computed,
        e.g. by a pipeline that embeds the next chunk while this one is classified."""
        self._check_fitted("predict")
        examples = as_examples(inputs)
        if embeddings is not None and len(embeddings) != len(examples):
            raise DataError(f"predict: {len(embeddings)} embeddings for {len(examples)} inputs")
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
        if self.ranker_.needs_prompts:
            demo_ids = (
                self.selector_.select(queries, cands, self.shots)
                if self.selector_ is not None and self.shots > 0
                else [[] for _ in queries]
            )
            assert self.lm_ is not None  # a ranker that needs prompts needs the LM: _build_stages loaded it
            budget = self.lm_.context_window - self.label_token_reserve
            prompts = [
                self.builder_.build(q.text, ids, self.pool_.examples, c.labels, count_tokens=self.lm_.count_tokens, budget=budget)
                for q, ids, c in zip(queries, demo_ids, cands)
            ]
        ctx = RankContext(self.lm_, queries, cands, prompts, self.builder_, self.pool_)
        ranker = self.ranker_
        if prompts and not ranker.reads_images and any(q.example.images for q in queries):
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
        preds = self.predict_detailed(inputs)
        if self.multi_label:
            return [self.decide(p) for p in preds]
        return [p.label for p in preds]
