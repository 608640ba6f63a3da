"""The service's request and response bodies (their field descriptions are the API's docs).

Requests forbid unknown fields: nothing in a request names a file, a model or a URL.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator

from iclcls.types import Prediction, check_text
from iclcls.util import softmax

MAX_LABEL_CHARS = 200

SCORES_DOC = (
    "the ranker's score for each label in `labels`, in the same order, highest first. Higher is "
    "better; the scale depends on the classifier's ranker (for example a log-probability of the "
    "label for likelihood ranking, a similarity-weighted vote for the retriever alone), so compare "
    "scores within one prediction, not across classifiers. null where a score is not finite"
)
PROBABILITIES_DOC = (
    "softmax over this prediction's returned `scores` (the labels in `labels` only): non-negative, "
    "sums to 1 across them. A normalisation of the scores for display and thresholds, not a "
    "calibrated probability; it changes with top_k"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _checked(v: str, where: str) -> str:
    if not v.strip():
        raise ValueError("must not be blank")
    return check_text(v, where)


class ClassifyRequest(_Strict):
    texts: list[str] = Field(min_length=1, description="texts to classify (no NUL characters, no lone surrogates)")
    top_k: int | None = Field(
        None, ge=1, le=1000,
        description="labels per prediction (default: all ranked). A prediction ranks at most the classifier's "
        "shortlist (`shortlist_k` in the response); a larger top_k returns them all and says so in `warnings`",
    )
    trace: bool = Field(False, description="also return candidates, demonstrations and the prompt")
    min_seq: int | None = Field(
        None, ge=0,
        description="read your writes: classify only once this replica has applied the addition with this seq "
        "(the `seq` an addition answered, on any replica); waits up to --min-seq-wait-s, then 503",
    )

    @field_validator("texts")
    @classmethod
    def _texts(cls, texts: list[str]) -> list[str]:
        for i, t in enumerate(texts):
            if not t.strip():
                raise ValueError(f"text {i} is empty or whitespace")
            check_text(t, f"text {i}")
        return texts


class Demonstration(BaseModel):
    text: str
    label: str | None


class PredictionOut(BaseModel):
    label: str | None = Field(None, description="the top label")
    labels: list[str] = Field(description="labels ranked best first (at most top_k, at most the shortlist)")
    scores: list[float | None] = Field(description=SCORES_DOC)
    probabilities: list[float] = Field(description=PROBABILITIES_DOC)
    candidates: list[str] | None = Field(None, description="the shortlisted classes the ranker chose from (trace)")
    demonstrations: list[Demonstration] | None = None
    prompt: str | None = None
    prompt_tokens: int | None = None


class ClassifyResponse(BaseModel):
    predictions: list[PredictionOut]
    shortlist_k: int = Field(description="candidate classes the ranker sees per text: the most labels a prediction has")
    warnings: list[str] | None = Field(None, description="what the answer could not do as asked (e.g. top_k above the shortlist)")


class ExampleIn(_Strict):
    text: str = Field(min_length=1)
    label: str = Field(min_length=1, max_length=MAX_LABEL_CHARS)

    @field_validator("text", "label")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        return _checked(v, "this field")


class AddClassesRequest(_Strict):
    examples: list[ExampleIn] = Field(min_length=1, description="examples of new or known classes")
    descriptions: dict[str, str] | None = Field(None, description="label -> description, for labels in examples")


class AddClassesResponse(BaseModel):
    seq: int = Field(description="the addition's sequence number in the store (a retry with the same "
                                 "Idempotency-Key gets the same seq and adds nothing)")
    added_examples: int
    new_classes: list[str]
    classes: int = Field(description="classes in the state after this addition")
    pool_size: int = Field(description="examples in the demonstration pool after this addition")
    replayed: bool = Field(False, description="true when this is the stored answer to an earlier request with the same Idempotency-Key")


class ClassInfo(BaseModel):
    label: str
    examples: int
    description: str | None = None


class ClassesResponse(BaseModel):
    classes: list[ClassInfo]
    count: int
    pool_size: int
    seq: int = Field(description="the last addition applied (0: the fitted state as saved)")


def finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def prediction_out(p: Prediction, top_k: int | None, trace: bool) -> PredictionOut:
    k = len(p.labels) if top_k is None else top_k
    scores = [finite(s) for s in p.scores[:k]]
    out = PredictionOut(label=p.labels[0] if p.labels else None, labels=list(p.labels[:k]), scores=scores,
                        probabilities=softmax(scores))
    if trace:
        out.candidates = list(p.candidates)
        out.demonstrations = [Demonstration(text=d.text, label=d.label) for d in p.demonstrations]
        out.prompt = p.trace.get("prompt")
        out.prompt_tokens = p.prompt_tokens
    return out


def top_k_warning(preds: list[Prediction], top_k: int | None, shortlist_k: int) -> str | None:
    """Say so when top_k asks for more labels than a prediction ranks."""
    if top_k is None or not preds:
        return None
    most = max(len(p.labels) for p in preds)
    if top_k <= most:
        return None
    return (f"top_k={top_k} is more than the {most} labels ranked per text: the classifier shortlists "
            f"{shortlist_k} candidate classes (shortlist_k) and ranks only those")
