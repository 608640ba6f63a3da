"""KV caches of the transformers backend: fork one cheaply, measure it, resume from a cached prefix.

transformers' dynamic cache layers never write into their tensors: ``update`` and
``batch_repeat_interleave``/``crop`` rebind ``keys``/``values`` to new tensors, but on the
SAME layer objects. So copying the layer objects (not the tensors) isolates a fork, and a
prefilled prefix can be reused by any number of later forwards.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from iclcls.util import common_prefix_len

Prefill = Callable[[Sequence[int], Any], tuple[Any, torch.Tensor]]  # (ids, cache or None) -> (cache, last logits)


@dataclass
class PrefixState:
    """A prefilled token prefix: its ids, its KV cache (batch 1) and the last position's logits."""

    ids: tuple[int, ...]
    cache: Any
    last_logits: torch.Tensor  # float32 [vocab]
    nbytes: int = 0  # the cache's size, for the LRU's byte budget


def fork_cache(cache: Any, batch: int = 1) -> Any:
    """A copy of ``cache`` that later forwards may extend without touching the original.

    ``batch > 1``: ``expand`` (a view) replaces ``batch_repeat_interleave`` to avoid one
    copy of the prefix KV before the first ``torch.cat`` materialises it.
    """
    fork = copy.copy(cache)
    fork.layers = [copy.copy(layer) for layer in cache.layers]
    if batch > 1:
        for layer in fork.layers:
            keys = getattr(layer, "keys", None)
            if isinstance(keys, torch.Tensor) and keys.numel() > 0:
                layer.keys = keys.expand(batch, *keys.shape[1:])
                layer.values = layer.values.expand(batch, *layer.values.shape[1:])
    return fork


def cache_bytes(cache: Any) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def sliding_kept(cache: Any, length: int) -> int:
    """How many of the prefix's keys a sliding-window layer still holds (``length`` if none slides)."""
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            keys = getattr(layer, "keys", None)
            return int(keys.shape[-2]) if isinstance(keys, torch.Tensor) else 0
    return length


def start_from_prefix(prefix: PrefixState, ids: Sequence[int], length: int, prefill: Prefill) -> tuple[Any, torch.Tensor]:
    """KV cache + last logits of ``ids[:length]``, reusing the cached ``prefix`` where it matches."""
    m = common_prefix_len(prefix.ids, ids[:length])
    if m == len(prefix.ids) and m == length:
        return fork_cache(prefix.cache), prefix.last_logits
    if m == len(prefix.ids):
        return prefill(ids[m:length], fork_cache(prefix.cache))
    # The prefix's last token(s) merged with the prompt's remainder: drop them from a fork
    # and recompute from one token earlier (so that a last-position logit row exists).
    keep = m - 1
    if keep >= 1:
        fork = fork_cache(prefix.cache)
        try:
            fork.crop(-(len(prefix.ids) - keep))
        except (RuntimeError, ValueError):  # sliding-window layers past their window cannot crop
            pass
        else:
            return prefill(ids[keep:length], fork)
    return prefill(ids[:length], None)
