"""Many score requests in few forwards: each request's prompt and its candidates as one tree.

The per-request path prefills one prompt at a time (batch 1), which leaves a GPU idle. Here a
batch of requests runs as ONE forward per token budget: every request is a row holding its
prompt tokens followed by each candidate's suffix tokens (``ids[length:-1]``); a 4D tree mask
lets a prompt token see its own prompt causally and a suffix token see its request's prompt
plus the earlier tokens of its own suffix, at their true positions (RoPE ``position_ids``).
So the result equals a separate forward per continuation, with no KV cache to fork, no padding
inside a row, and rows of similar length bucketed together (right-padded to the longest).

With a cached shared prefix (many-shot demonstrations, a channel class prompt), all requests of
a chunk share ONE row after the prefix KV (the prefix is never copied per row).

Logits are computed only where a target token is predicted: the decoder's hidden states are
gathered at those positions and only they go through the LM head (a 49k-262k vocabulary times
every position would cost gigabytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from iclcls.lm.kv_cache import fork_cache, sliding_kept
from iclcls.lm.suffix_modes import Encoded, format_mask

# Rows of the LM head's output computed at once (bounds the [rows, vocab] float32 logits).
HEAD_ROWS = 2048


@dataclass(frozen=True)
class TreeRequest:
    """One request's distinct encodings; ``ids[:length]`` is common to all of them."""

    encs: Sequence[Encoded]
    length: int


@dataclass(frozen=True)
class Prefix:
    """A prefilled shared prefix the rows continue: its KV cache, length and last logits."""

    cache: Any
    length: int
    last_logits: torch.Tensor


@dataclass
class _Block:
    """A request's tokens in a row, and where each target token's logits come from."""

    ids: list[int]
    pos: list[int]
    cand: list[int]  # -1: prompt token; c: a token of candidate c's suffix
    targets: list[list[tuple[int, int]]]  # per candidate: (offset in block or -1 for the prefix's last logits, token id)


def _block(req: TreeRequest, start: int) -> _Block:
    """Tokens ``ids[start:length]`` of the prompt, then each candidate's suffix (see module doc)."""
    first = req.encs[0].ids
    ids = list(first[start : req.length])
    pos = list(range(start, req.length))
    cand = [-1] * len(ids)
    targets = []
    for c, e in enumerate(req.encs):
        off = len(ids)
        suffix = e.ids[req.length : -1]
        ids.extend(suffix)
        pos.extend(range(req.length, req.length + len(suffix)))
        cand.extend([c] * len(suffix))
        tg = []
        for j in range(e.split, len(e.ids)):  # token j is predicted at position j - 1
            p = j - 1
            if p < req.length:  # the prompt's last token (j >= split >= length)
                at = p - start if p >= start else -1
            else:
                at = off + p - req.length
            tg.append((at, e.ids[j]))
        targets.append(tg)
    return _Block(ids, pos, cand, targets)


def plan_chunks(widths: Sequence[int], budget: int, *, one_row: bool) -> list[list[list[int]]]:
    """Chunks of rows of request indices, each chunk one forward of at most ``budget`` tokens.

    ``one_row``: all requests of a chunk in one row (after a shared prefix); otherwise one
    request per row, longest first, so rows of similar width share a chunk (little padding).
    A request wider than the budget runs alone.
    """
    order = sorted(range(len(widths)), key=lambda i: -widths[i])
    chunks: list[list[list[int]]] = []
    if one_row:
        row: list[int] = []
        total = 0
        for i in order:
            if row and total + widths[i] > budget:
                chunks.append([row])
                row, total = [], 0
            row.append(i)
            total += widths[i]
        if row:
            chunks.append([row])
        return chunks
    rows: list[list[int]] = []
    for i in order:  # widths descend, so the chunk's width is its first row's
        if rows and (len(rows) + 1) * widths[rows[0][0]] > budget:
            chunks.append(rows)
            rows = []
        rows.append([i])
    if rows:
        chunks.append(rows)
    return chunks


def _masks(
    req: torch.Tensor, cand: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, *,
    kinds: dict[str, int | None], prefix: Prefix | None, cache: Any, attn_impl: str, dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The tree mask per attention kind, [B, 1, W, kept + W]; padding attends to itself only."""
    same = req[:, :, None] == req[:, None, :]
    branch = (cand[:, None, :] == -1) | (cand[:, :, None] == cand[:, None, :])
    causal = pos[:, None, :] <= pos[:, :, None]
    eye = torch.eye(req.shape[1], dtype=torch.bool, device=req.device)[None]
    base = same & branch & causal & valid[:, None, :] & valid[:, :, None]
    dist = pos[:, :, None] - pos[:, None, :]
    out = {}
    for kind, window in kinds.items():
        m = base if window is None else base & (dist < window)
        m = m | (eye & ~valid[:, :, None])
        if prefix is not None:
            kept = sliding_kept(cache, prefix.length) if window is not None else prefix.length
            kpos = torch.arange(prefix.length - kept, prefix.length, device=req.device)
            cols = valid[:, :, None].expand(-1, -1, kept)
            if window is not None:
                cols = cols & ((pos[:, :, None] - kpos[None, None, :]) < window)
            m = torch.cat([cols, m], 2)
        out[kind] = format_mask(m[:, None], attn_impl, dtype)
    return out


def _head_logprobs(model: Any, hidden: torch.Tensor, tokens: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """log P(token) at each gathered hidden state, through the LM head in slices."""
    head = model.get_output_embeddings()
    out = []
    for s in range(0, hidden.shape[0], HEAD_ROWS):
        logits = head(hidden[s : s + HEAD_ROWS]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        t = tokens[s : s + HEAD_ROWS]
        out.append(logits.gather(1, t[:, None])[:, 0] - torch.logsumexp(logits, dim=-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def tree_scores(
    model: Any, reqs: Sequence[TreeRequest], *, prefix: Prefix | None, kinds: dict[str, int | None],
    attn_impl: str, dtype: torch.dtype, device: torch.device, pad_id: int, token_budget: int,
) -> list[list[np.ndarray]]:
    """Per request, per encoding: the log-probs of its continuation tokens (see module doc)."""
    start = prefix.length if prefix is not None else 0
    blocks = [_block(r, start) for r in reqs]
    chunks = plan_chunks([len(b.ids) for b in blocks], token_budget, one_row=prefix is not None)
    cfg = model.config.get_text_config(decoder=True)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    decoder = model.get_decoder()
    results: list[list[np.ndarray]] = [[np.zeros(0)] * len(r.encs) for r in reqs]
    for rows in chunks:
        width = max(sum(len(blocks[i].ids) for i in row) for row in rows)
        B = len(rows)
        ids = torch.full((B, width), pad_id, dtype=torch.long)
        pos = torch.zeros((B, width), dtype=torch.long)
        req = torch.full((B, width), -1, dtype=torch.long)
        cand = torch.full((B, width), -1, dtype=torch.long)
        valid = torch.zeros((B, width), dtype=torch.bool)
        where: list[tuple[int, int, int, int, int]] = []  # (request, candidate, row, column, token)
        from_prefix: list[tuple[int, int, int]] = []  # (request, candidate, token): the prefix's last logits
        for b, row in enumerate(rows):
            col = 0
            for i in row:
                blk = blocks[i]
                n = len(blk.ids)
                ids[b, col : col + n] = torch.tensor(blk.ids, dtype=torch.long)
                pos[b, col : col + n] = torch.tensor(blk.pos, dtype=torch.long)
                req[b, col : col + n] = i
                cand[b, col : col + n] = torch.tensor(blk.cand, dtype=torch.long)
                valid[b, col : col + n] = True
                for c, tg in enumerate(blk.targets):
                    for at, tok in tg:
                        if at < 0:
                            from_prefix.append((i, c, tok))
                        else:
                            where.append((i, c, b, col + at, tok))
                col += n
        ids, pos, req, cand, valid = (t.to(device) for t in (ids, pos, req, cand, valid))
        cache = fork_cache(prefix.cache, B) if prefix is not None else None
        masks = _masks(req, cand, pos, valid, kinds=kinds, prefix=prefix, cache=prefix.cache if prefix else None,
                       attn_impl=attn_impl, dtype=dtype)
        lp_list: list[float] = []
        if where:
            out = decoder(
                input_ids=ids, position_ids=pos, attention_mask=masks if len(masks) > 1 else masks["full_attention"],
                past_key_values=cache, use_cache=prefix is not None,
            )
            hidden = out.last_hidden_state
            rr = torch.tensor([w[2] for w in where], device=device)
            cc = torch.tensor([w[3] for w in where], device=device)
            tok = torch.tensor([w[4] for w in where], device=device)
            lp_list = _head_logprobs(model, hidden[rr, cc], tok, softcap).double().cpu().tolist()
        per: dict[tuple[int, int], list[float]] = {}
        if from_prefix:
            assert prefix is not None
            last = prefix.last_logits
            lse = torch.logsumexp(last, dim=-1)
            for i, c, t in from_prefix:
                per.setdefault((i, c), []).append((last[t] - lse).item())
        for (i, c, *_), v in zip(where, lp_list):
            per.setdefault((i, c), []).append(v)
        for row in rows:
            for i in row:
                results[i] = [np.array(per.get((i, c), []), dtype=np.float64) for c in range(len(reqs[i].encs))]
    return results
