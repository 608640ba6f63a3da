"""Demonstration selectors, reachable by registry name (``get_selector("knn")``)."""

from iclcls.select import ceil, class_balanced, dpp, fixed, influence, knn, many_shot, random_select  # noqa: F401,E402  (register)
from iclcls.select.base import SELECTORS, BaseSelector, Selector


def get_selector(name: str, **options) -> Selector:
    return SELECTORS.get(name, **options)


__all__ = ["SELECTORS", "BaseSelector", "Selector", "get_selector"]
