"""Demonstration selectors, reachable by registry name (``get_selector("knn")``)."""

from iclcls.select.base import SELECTORS, BaseSelector, Selector
from iclcls.select import class_balanced, fixed, knn, random_select  # noqa: F401  (register)
from iclcls.select import ceil, dpp, influence, many_shot  # noqa: F401,E402  (register)


def get_selector(name: str, **options) -> Selector:
    return SELECTORS.get(name, **options)


__all__ = ["SELECTORS", "BaseSelector", "Selector", "get_selector"]
