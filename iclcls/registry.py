"""Name -> implementation registries, so configs and the CLI reach every part by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from iclcls.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A registry of one stage family (selectors, shortlisters, rankers, ...)."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.family} {name!r} is registered twice")
            self._items[name] = factory
            factory.registry_name = name  # type: ignore[attr-defined]
            return factory

        return deco

    def get(self, name: str, **options: Any) -> T:
        """Build the implementation registered as ``name`` with keyword ``options``."""
        try:
            factory = self._items[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.family} {name!r}; known: {', '.join(sorted(self._items))}") from None
        try:
            return factory(**options)
        except TypeError as e:
            raise TypeError(f"{self.family} {name!r}: bad options {options}: {e}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
