"""Infer stages, reachable by registry name (``get_inferrer("labels")``)."""

from iclcls.infer import lm_guesses  # noqa: F401  (register)
from iclcls.infer.base import INFERRERS, Inferrer


def get_inferrer(name: str, **options) -> Inferrer:
    return INFERRERS.get(name, **options)


__all__ = ["INFERRERS", "Inferrer", "get_inferrer"]
