"""Class shortlisters, reachable by registry name (``get_shortlister("knn_vote")``)."""

from iclcls.shortlist import all_labels, class_mean, ecl, knn_vote, label_retriever  # noqa: F401  (register)
from iclcls.shortlist.base import SHORTLISTERS, BaseShortlister, Shortlister, top_candidates


def get_shortlister(name: str, **options) -> Shortlister:
    return SHORTLISTERS.get(name, **options)


__all__ = ["SHORTLISTERS", "BaseShortlister", "Shortlister", "get_shortlister", "top_candidates"]
