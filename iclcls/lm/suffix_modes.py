"""The two ways to run every continuation's suffix on one prefilled prompt prefix.

``packed``: all suffixes in ONE row after the prefix, isolated by a tree mask and given
their own position ids, so the prefix KV is neither copied nor padded; it needs an
attention kernel that takes a custom mask (SDPA, eager) and layers a tree mask can express
(full or sliding attention). ``batched``: right-padded rows on the prefix KV expanded to
the batch; works with any kernel. Both return logits only at the rows that predict a target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from iclcls.errors import ConfigError
from iclcls.lm.kv_cache import fork_cache, sliding_kept


@dataclass(frozen=True)
class Encoded:
    """One (prompt, continuation) pair tokenised together: ``ids[:split]`` is context."""

    ids: tuple[int, ...]
    split: int


Targets = Sequence[tuple[int, int]]  # (row in the chunk, token position it predicts)


def layer_kinds(cfg: Any) -> dict[str, int | None] | None:
    """{"full_attention": None, "sliding_attention": window}; None for layers a tree mask can't express."""
    if getattr(cfg, "use_bidirectional_attention", False):
        return None
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    window = getattr(cfg, "sliding_window", None)
    kinds: dict[str, int | None] = {}
    for t in types:
        if t == "full_attention":
            kinds[t] = None
        elif t == "sliding_attention" and window:
            kinds[t] = int(window)
        else:
            return None
    kinds.setdefault("full_attention", None)
    return kinds


def choose_suffix_mode(mode: str, *, attn_impl: str, kinds: dict | None, name: str) -> str:
    """``packed`` (tree mask, fastest) where the attention kernel takes custom masks, else ``batched``."""
    packable = attn_impl in ("sdpa", "eager") and kinds is not None
    if mode == "auto":
        return "packed" if packable else "batched"
    if mode == "packed" and not packable:
        raise ConfigError(
            f"{name}: suffix_mode='packed' needs sdpa or eager attention and full/sliding "
            f"attention layers (this model: {attn_impl!r}); use 'batched'"
        )
    if mode not in ("packed", "batched"):
        raise ConfigError(f"suffix_mode must be 'auto', 'packed' or 'batched', got {mode!r}")
    return mode


def format_mask(allowed: torch.Tensor, attn_impl: str, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" for SDPA; additive float (0 / -inf-ish) for eager attention."""
    if attn_impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def packed_logits(
    model: Any, cache: Any, length: int, chunk: Sequence[Encoded], targets: Targets, *,
    kinds: dict[str, int | None], attn_impl: str, dtype: torch.dtype, device: torch.device,
) -> torch.Tensor:
    """All suffixes of ``chunk`` packed into one row after the prefix (see the module doc).

    Each suffix token attends to the whole prefix and to the earlier tokens of its own
    suffix, at its own positions (RoPE ``position_ids``), so the result equals a separate
    forward per continuation.
    """
    ids: list[int] = []
    pos: list[int] = []
    branch: list[int] = []
    starts = []
    for r, e in enumerate(chunk):
        suffix = e.ids[length:-1]
        starts.append(len(ids))
        ids.extend(suffix)
        pos.extend(range(length, length + len(suffix)))
        branch.extend([r] * len(suffix))
    keep = torch.tensor([starts[r] + (j - 1 - length) for r, j in targets], device=device)
    p = torch.tensor(pos, device=device)
    b = torch.tensor(branch, device=device)
    own = (b[:, None] == b[None, :]) & (p[None, :] <= p[:, None])  # [S, S]
    masks = {}
    for kind, window in kinds.items():
        if window is None:
            m = torch.cat([torch.ones(len(ids), length, dtype=torch.bool, device=device), own], 1)
        else:  # the sliding layers keep only the prefix's last ``kept`` keys
            kpos = torch.arange(length - sliding_kept(cache, length), length, device=device)
            m = torch.cat([(p[:, None] - kpos[None, :]) < window, own & ((p[:, None] - p[None, :]) < window)], 1)
        masks[kind] = format_mask(m[None, None], attn_impl, dtype)
    out = model(
        input_ids=torch.tensor([ids], device=device),
        position_ids=p[None],
        attention_mask=masks if len(masks) > 1 else masks["full_attention"],
        past_key_values=fork_cache(cache),
        use_cache=True,
        logits_to_keep=keep,
    )
    return out.logits[0]


def batched_logits(
    model: Any, cache: Any, length: int, chunk: Sequence[Encoded], targets: Targets, *, pad_id: int, device: torch.device
) -> torch.Tensor:
    """Suffixes as a right-padded batch on the prefix KV expanded to the batch (any attention kernel)."""
    inputs = [e.ids[length:-1] for e in chunk]
    width = max(len(s) for s in inputs)
    x = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), length + width), dtype=torch.long)
    mask[:, :length] = 1
    for r, s in enumerate(inputs):
        x[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, length : length + len(s)] = 1
    out = model(
        input_ids=x.to(device),
        attention_mask=mask.to(device),
        past_key_values=fork_cache(cache, len(chunk)),
        use_cache=True,
    )
    rows = torch.tensor([r for r, _ in targets], device=device)
    cols = torch.tensor([j - 1 - length for _, j in targets], device=device)
    return out.logits[rows, cols]
