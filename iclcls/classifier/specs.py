"""Stages from their specs and back: a registry name, a ``{"name": ..., **options}`` dict,
or a ready object that must satisfy its family's Protocol (checked here, once, so the
classifier reads stage attributes directly instead of probing with ``getattr``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from iclcls.errors import ConfigError
from iclcls.registry import Registry


def build_stage(spec: Any, registry: Registry, protocol: type | None = None) -> Any:
    """A stage from a registry name, a ``{"name": ..., **options}`` dict, or a ready object."""
    if spec is None:
        return None
    if isinstance(spec, str):
        stage = registry.get(spec)
    elif isinstance(spec, Mapping):
        opts = dict(spec)
        try:
            name = opts.pop("name")
        except KeyError:
            raise ConfigError(f"{registry.family} spec {dict(spec)!r} has no 'name'") from None
        stage = registry.get(name, **opts)
    else:
        stage = spec
    if protocol is not None and not isinstance(stage, protocol):
        members = set(getattr(protocol, "__annotations__", {})) | {n for n in vars(protocol) if not n.startswith("_")}
        missing = sorted(m for m in members if not hasattr(stage, m))
        raise ConfigError(
            f"{type(stage).__name__} is not a {registry.family}: it lacks {', '.join(missing)} "
            "(subclass the family's Base class, or add them)"
        )
    return stage


def spec_of(spec: Any, obj: Any) -> Any:
    """A JSON-able spec that rebuilds ``obj``: the given name/dict, or name + constructor options."""
    if spec is None or isinstance(spec, (str, Mapping)):
        return spec
    name = getattr(type(obj), "registry_name", None)
    if name is None:
        raise ConfigError(f"cannot save a stage of type {type(obj).__name__}: it is not registered by name")
    params = inspect.signature(type(obj).__init__).parameters
    opts = {p: getattr(obj, p) for p in params if p != "self" and hasattr(obj, p)}
    return {"name": name, **opts}
