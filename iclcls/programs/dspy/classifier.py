"""A compiled IReRa DSPy program behind the classifier interface the eval harness drives.

``DSPyIReRaClassifier(compiled=DIR)`` behaves like an ``ICLClassifier`` for evaluation:
``fit`` (loads the compiled folder; the program was trained by ``iclcls compile``),
``predict_detailed`` -> ``iclcls.types.Prediction`` (ranked labels, candidates, a trace with
the Infer guesses, the LM's picks and the LM calls), ``decide``, and the scikit-learn face
(``predict`` labels, ``predict_proba``, ``score``, ``get_params``/``set_params``).
So ``classifier: {program: dspy_irera, compiled: DIR}`` runs through ``iclcls eval`` with
its checkpoints and reports unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sklearn.base import BaseEstimator

from iclcls.classifier.sklearn_api import SklearnClassifier
from iclcls.errors import ConfigError
from iclcls.types import Example, Prediction

PROGRAM_NAME = "dspy_irera"


class DSPyIReRaClassifier(SklearnClassifier, BaseEstimator):
    """Evaluate a compiled IReRa program like any iclcls classifier (predict_detailed -> Predictions)."""

    _fitted_attr = "program_"
    _shared_params = ("lm", "infer_lm", "rank_lm")
    # Stage specs the harness inspects (e.g. for ``priors: benchmark``); the program owns its stages.
    shortlist = select = rank = infer = None
    ranker_ = None

    def __init__(
        self,
        *,
        compiled: str | None = None,
        lm: Any = None,
        infer_lm: Any = None,
        rank_lm: Any = None,
        multi_label: bool = True,
        top_k: int | None = None,
        batch_size: int = 8,
        show_progress: bool | None = None,
        trust: bool = False,
    ) -> None:
        self.compiled = compiled
        self.lm = lm
        self.infer_lm = infer_lm
        self.rank_lm = rank_lm
        self.multi_label = multi_label
        self.top_k = top_k
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.trust = trust

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> DSPyIReRaClassifier:
        """From a ``classifier:`` config section (``program: dspy_irera``, ``compiled: DIR``, ...)."""
        spec = dict(spec)
        program = spec.pop("program", PROGRAM_NAME)
        if program != PROGRAM_NAME:
            raise ConfigError(f"classifier.program is {program!r}, expected {PROGRAM_NAME!r}")
        spec.pop("dspy", None)  # compile options: used by `iclcls compile`, not here
        spec.pop("tune", None)  # the program was tuned when it was compiled
        known = set(cls().get_params())
        unknown = sorted(k for k, v in spec.items() if k not in known and v is not None)
        if unknown:
            raise ConfigError(f"classifier options {unknown} do not apply to program {PROGRAM_NAME!r}; known: {sorted(known)}")
        return cls(**{k: v for k, v in spec.items() if k in known and v is not None})

    def _lm(self, given: Any) -> Any:
        """A step LM override: a ``dspy.BaseLM``, an iclcls spec string, or None (the saved spec)."""
        if given is None or not isinstance(given, str):
            return given
        from iclcls.programs.dspy.compile import LMPool

        self._pool = getattr(self, "_pool", None) or LMPool()
        return self._pool.get(given, max_tokens=64)

    def fit(
        self, examples: Iterable[Example] = (), *, labels: Any = None, validation: Any = None, tune: Any = None
    ) -> DSPyIReRaClassifier:
        """Load the compiled program (compiling and tuning are ``iclcls compile``'s job; the data here is unused)."""
        if not self.compiled:
            raise ConfigError(f"program {PROGRAM_NAME!r} needs classifier.compiled: the folder written by `iclcls compile`")
        from iclcls.programs.dspy.compile import load_compiled

        if not Path(self.compiled).is_dir():
            raise FileNotFoundError(f"classifier.compiled: {self.compiled} does not exist; run `iclcls compile CONFIG --out {self.compiled}`")
        self.program_ = load_compiled(
            self.compiled,
            infer_lm=self._lm(self.infer_lm or self.lm),
            rank_lm=self._lm(self.rank_lm or self.lm),
            trust=self.trust,
        )
        retriever = self.program_.retrieve.retriever
        self.embedder_ = retriever.embedder_
        self.pool_ = retriever.pool_
        self.lm_ = None
        self.tuned_: dict[str, Any] = {}
        return self

    @property
    def classes_(self) -> list[str]:
        self._check_fitted("classes_")
        return list(self.pool_.labels)

    def predict_detailed(self, inputs: Iterable[str | Example], *, show_progress: bool | None = None) -> list[Prediction]:
        self._check_fitted("predict")
        from iclcls.classifier import as_examples
        from iclcls.programs.dspy.modules import scores_for

        out = []
        for ex in as_examples(inputs):
            before = {s: dict(c) for s, c in self.program_.stats.counts.items()}
            p = self.program_(text=ex.text)
            after = self.program_.stats.counts
            calls = {s: after[s]["lm_calls"] - before[s]["lm_calls"] for s in after}
            unparsed = {s: after[s]["unparsed"] - before[s]["unparsed"] for s in after}
            ranking = list(p.ranking)
            out.append(
                Prediction(
                    labels=tuple(ranking),
                    scores=tuple(scores_for(ranking)),
                    candidates=tuple(p.candidates),
                    trace={
                        "infer": list(p.guesses),
                        "rank_picks": list(p.lm_labels),
                        "lm_calls": calls,
                        "unparsed": {s: bool(v) for s, v in unparsed.items() if s != "retrieve"},
                    },
                )
            )
        return out

    def decide(self, pred: Prediction) -> tuple[str, ...]:
        """Top-k labels (``top_k``), else the LM's picks, else the top label."""
        if not pred.labels:
            return ()
        if self.top_k is not None:
            return pred.labels[: self.top_k]
        picks = tuple(pred.trace.get("rank_picks", ()) or ())
        if self.multi_label and picks:
            return picks
        return (pred.labels[0],)
