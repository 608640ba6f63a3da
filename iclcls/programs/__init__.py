"""Presets that compose the stages into the published methods."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from iclcls.classifier import ICLClassifier


def retrieval_icl(*, lm: Any = "smollm2", shots: int = 8, shortlist_k: int = 10, **options: Any) -> ICLClassifier:
    """Milios et al. 2023: kNN demonstrations, the LM writes the label, mapped to the label space."""
    return ICLClassifier(
        lm=lm,
        shortlist="knn_vote",
        shortlist_k=shortlist_k,
        select={"name": "knn", "restrict_to_candidates": False},
        shots=shots,
        rank="generative",
        prompt={"show_candidates": False},
        **options,
    )


def irera(
    *,
    lm: Any = "smollm2",
    priors: Mapping[str, float] | None = None,
    prior_a: float = 10.0,  # picked on ESCO validation; A >= 100 costs 20-32 RP@10 points (eval/RESULTS.md)
    shortlist_k: int = 50,
    multi_label: bool = True,
    rank: Any = None,
    **options: Any,
) -> ICLClassifier:
    """Infer-Retrieve-Rank (D'Oosterlinck et al. 2024): LM guesses -> label retriever -> LM ranks."""
    return ICLClassifier(
        lm=lm,
        infer="labels",
        shortlist={"name": "label_retriever", "priors": dict(priors) if priors else None, "prior_a": prior_a if priors else 0.0},
        shortlist_k=shortlist_k,
        select=None,
        shots=0,
        rank=rank or {"name": "fusion", "inner": "likelihood", "inner_options": {"reduce": "mean"}},
        multi_label=multi_label,
        prompt={"instructions": "Which of the possible labels does the input mention?", "label_prefix": "Answer:"},
        **options,
    )


def zero_shot(*, lm: Any = "smollm2", shortlist_k: int = 10, **options: Any) -> ICLClassifier:
    """No demonstrations: the LM ranks the shortlisted labels by likelihood."""
    return ICLClassifier(lm=lm, shortlist="class_mean", shortlist_k=shortlist_k, select=None, shots=0, rank="likelihood", **options)


def knn_fusion(*, lm: Any = "smollm2", shots: int = 8, shortlist_k: int = 10, **options: Any) -> ICLClassifier:
    """The default pipeline: kNN-vote shortlist, least-to-most similar kNN demonstrations from the
    candidate classes, label likelihood, fused with the retriever (weight tuned on validation)."""
    return ICLClassifier(
        lm=lm,
        shortlist="knn_vote",
        shortlist_k=shortlist_k,
        select={"name": "knn", "order": "ascending", "restrict_to_candidates": True},
        shots=shots,
        rank={"name": "fusion", "inner": "likelihood"},
        **options,
    )


def knn_channel(*, lm: Any = "smollm2", shortlist_k: int = 10, per_class: int = 16, **options: Any) -> ICLClassifier:
    """kNN-vote shortlist, noisy-channel ranking (P(query | each candidate's own pool examples)),
    fused with the retriever. The strongest preset with the embedded 135M-270M LMs (eval/RESULTS.md)."""
    return ICLClassifier(
        lm=lm,
        shortlist="knn_vote",
        shortlist_k=shortlist_k,
        select=None,
        shots=0,
        rank={"name": "fusion", "inner": "channel", "inner_options": {"per_class": per_class}},
        **options,
    )


def retriever_only(*, shortlist: Any = "knn_vote", shortlist_k: int = 10, **options: Any) -> ICLClassifier:
    """The retriever alone (no LM): the baseline every LM pipeline is compared with."""
    return ICLClassifier(lm=None, shortlist=shortlist, shortlist_k=shortlist_k, select=None, rank="retriever", **options)


PROGRAMS = {
    "retrieval_icl": retrieval_icl,
    "irera": irera,
    "zero_shot": zero_shot,
    "knn_fusion": knn_fusion,
    "knn_channel": knn_channel,
    "retriever_only": retriever_only,
}
