"""The embedded LM backend: a Hugging Face transformers causal LM, in process, on CPU or GPU.

Scoring is the hot path of likelihood ranking, so ``score_batch`` shares work:
prompt and continuation are tokenised together and split at the prompt's character
offset (the continuation's tokens are the ones the model really sees); the token prefix
shared by all of a request's continuations is prefilled ONCE; then all continuation
suffixes run in one more forward on that KV cache, and log-probabilities are taken only
at the rows that predict continuation tokens (a 262k vocabulary times every prompt
position would cost gigabytes). The suffix forward is ``packed`` where the attention
kernel takes a custom mask (SDPA, eager): all suffixes in one row with a tree mask and
their own position ids, so the prefix KV is neither copied nor padded; otherwise
``batched``: right-padded rows on the prefix KV expanded to the batch.
``score_naive`` runs one full forward per continuation: the reference the shared path is
tested against, and the benchmark's baseline.

For many-shot prompts that share one long demonstration prefix across queries,
``score_batch(requests, shared_prefix=...)`` prefills that prefix once and keeps its KV
cache in a small LRU keyed by the prefix text.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from iclcls.lm.base import BaseLM, CapabilityError, Conversation, ScoreRequest, has_images, text_of
from iclcls.lm.models import ModelSource, resolve_model

DEFAULT_CONTEXT_CAP = 8192
# Continuations per suffix batch are also limited so that the prefix KV cache, expanded
# to the batch, stays under this many bytes (long many-shot prefixes otherwise explode).
DEFAULT_KV_BUDGET = 2 * 1024**3


@dataclass(frozen=True)
class _Encoded:
    """One (prompt, continuation) pair tokenised together: ``ids[:split]`` is context."""

    ids: tuple[int, ...]
    split: int


@dataclass
class _PrefixState:
    """A prefilled token prefix: its ids, its KV cache (batch 1) and the last position's logits."""

    ids: tuple[int, ...]
    cache: Any
    last_logits: torch.Tensor  # float32 [vocab]


_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata_value(path: str | os.PathLike, key: str) -> Any:
    """One metadata value of a GGUF file, or None; reads only the header.

    ``gguf.GGUFReader`` parses every tensor and vocabulary entry up front (over 10 s for a
    262k-token vocabulary on a small CPU); one boolean needs a sequential scan of the
    key-value section only (format: github.com/ggml-org/ggml/blob/master/docs/gguf.md).
    """
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version = struct.unpack_from("<I", buf, 4)[0]
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        (n_kv,) = struct.unpack_from("<Q", buf, 16)
        pos = 24

        def read_str(pos: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", buf, pos)
            return buf[pos + 8 : pos + 8 + n].decode("utf-8", "replace"), pos + 8 + n

        def skip(vtype: int, pos: int) -> int:
            if vtype in _GGUF_SCALAR:
                return pos + struct.calcsize("<" + _GGUF_SCALAR[vtype])
            if vtype == 8:
                return read_str(pos)[1]
            if vtype == 9:
                etype, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if etype in _GGUF_SCALAR:
                    return pos + count * struct.calcsize("<" + _GGUF_SCALAR[etype])
                for _ in range(count):
                    pos = skip(etype, pos)
                return pos
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        for _ in range(n_kv):
            name, pos = read_str(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if name == key:
                if vtype in _GGUF_SCALAR:
                    return struct.unpack_from("<" + _GGUF_SCALAR[vtype], buf, pos)[0]
                if vtype == 8:
                    return read_str(pos)[0]
                return None
            pos = skip(vtype, pos)
    return None


def _gguf_add_bos(source: ModelSource) -> bool | None:
    """The GGUF's own word on a leading BOS token (transformers' GGUF tokenizer drops it)."""
    path = source.gguf_path
    if path is None or not path.is_file():
        return None
    value = gguf_metadata_value(path, "tokenizer.ggml.add_bos_token")
    return None if value is None else bool(value)


def _fork_cache(cache: Any, batch: int = 1) -> Any:
    """A copy of ``cache`` that later forwards may extend without touching the original.

    transformers' dynamic cache layers never write into their tensors: ``update`` and
    ``batch_repeat_interleave``/``crop`` rebind ``keys``/``values`` to new tensors, but on
    the SAME layer objects. So copying the layer objects (not the tensors) isolates the
    fork; ``expand`` (a view) replaces ``batch_repeat_interleave`` to avoid one copy of
    the prefix KV before the first ``torch.cat`` materialises it.
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


def _cache_bytes(cache: Any) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        tok = first[i]
        if any(s[i] != tok for s in seqs[1:]):
            return i
    return n


def _cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    if not stop:
        return text
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text[:cut] if cut >= 0 else text


class _StopOnStrings:
    """A stopping criterion: a row is done once its new text contains a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class TransformersLM(BaseLM):
    """A causal LM run in process through transformers; see the module docstring.

    ``model`` is an offline short name (``smollm2``, ``gemma3-270m``), a local directory or
    ``.gguf`` file, or a Hugging Face model id. GGUF weights are dequantised to float32;
    with ``convert_gguf`` (default) the dequantised model is saved once as a plain HF
    directory in iclcls's cache (``iclcls.lm.convert``) so later loads take a second.
    """

    def __init__(
        self,
        model: str,
        *,
        gguf_file: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        max_batch_size: int = 16,
        context_window: int | None = None,
        context_cap: int = DEFAULT_CONTEXT_CAP,
        prefix_cache_size: int = 1,
        kv_budget_bytes: int = DEFAULT_KV_BUDGET,
        convert_gguf: bool = True,
        add_bos: bool | None = None,
        suffix_mode: str = "auto",
        attn_implementation: str | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if _looks_local(model):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.source = resolve_model(model, gguf_file=gguf_file)
        self.name = f"transformers:{self.source.name}"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.kv_budget_bytes = kv_budget_bytes
        self.prefix_cache_size = prefix_cache_size

        path, load_kwargs = self.source.path, {}
        if self.source.gguf_file:
            if convert_gguf:
                from iclcls.lm.convert import gguf_to_hf_dir

                path = str(gguf_to_hf_dir(self.source))
            else:
                load_kwargs["gguf_file"] = self.source.gguf_file
        self.tokenizer = AutoTokenizer.from_pretrained(path, **load_kwargs)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                f"{self.name}: needs a fast tokenizer (character offsets split prompt from continuation)"
            )
        if attn_implementation is not None:
            load_kwargs = {**load_kwargs, "attn_implementation": attn_implementation}
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **load_kwargs)
        self.model.to(device=self.device, dtype=dtype)
        self.model.eval()

        cfg = self.model.config.get_text_config(decoder=True)
        model_max = getattr(cfg, "max_position_embeddings", None) or context_cap
        self._context_window = int(context_window or min(model_max, context_cap))
        if self._context_window > model_max:
            raise ValueError(
                f"{self.name}: context_window {self._context_window} exceeds the model's {model_max} positions"
            )

        tok = self.tokenizer
        self._pad_id = next(
            i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None
        )
        # A start token for sequences that would otherwise have no context token (an empty
        # prompt): the first continuation token needs a position that predicts it.
        self._start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if add_bos is None:
            add_bos = _gguf_add_bos(self.source) or False
        probe = tok("a", add_special_tokens=True)["input_ids"]
        adds_bos_itself = tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]
        self._extra_bos = bool(add_bos and not adds_bos_itself and tok.bos_token_id is not None)

        self._attn_impl = getattr(self.model.config, "_attn_implementation", None) or "eager"
        self._layer_kinds = _layer_kinds(cfg)
        self.suffix_mode = self._choose_suffix_mode(suffix_mode)

        self._lock = threading.RLock()
        self._prefixes: OrderedDict[str, _PrefixState] = OrderedDict()

    def _choose_suffix_mode(self, mode: str) -> str:
        """``packed`` (tree mask, fastest) where the attention kernel takes custom masks, else ``batched``."""
        packable = self._attn_impl in ("sdpa", "eager") and self._layer_kinds is not None
        if mode == "auto":
            return "packed" if packable else "batched"
        if mode == "packed" and not packable:
            raise ValueError(
                f"{self.name}: suffix_mode='packed' needs sdpa or eager attention and full/sliding "
                f"attention layers (this model: {self._attn_impl!r}); use 'batched'"
            )
        if mode not in ("packed", "batched"):
            raise ValueError(f"suffix_mode must be 'auto', 'packed' or 'batched', got {mode!r}")
        return mode

    @classmethod
    def from_name(cls, name: str = "smollm2", **options: Any) -> TransformersLM:
        """``smollm2`` (default), ``gemma3-270m``, a local dir/GGUF file, or an HF model id."""
        return cls(name, **options)

    # ---- sizes -------------------------------------------------------------------------

    @property
    def context_window(self) -> int:
        return self._context_window

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` itself (no BOS), as it adds to a prompt."""
        with self._lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- tokenisation ------------------------------------------------------------------

    def _encode_text(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if self._extra_bos:
            ids.insert(0, self.tokenizer.bos_token_id)
        return ids

    def _encode_pairs(self, prompt: str, continuations: Sequence[str]) -> list[_Encoded]:
        """Tokenise prompt+continuation together; context = tokens ending at or before the prompt's end."""
        enc = self.tokenizer(
            [prompt + c for c in continuations], add_special_tokens=True, return_offsets_mapping=True
        )
        end = len(prompt)
        out = []
        for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"]):
            ids = list(ids)
            split = next((i for i, (_, e) in enumerate(offsets) if e > end), len(ids))
            if self._extra_bos:
                ids.insert(0, self.tokenizer.bos_token_id)
                split += 1
            if split == 0:
                ids.insert(0, self._start_id)
                split = 1
            out.append(_Encoded(tuple(ids), split))
        return out

    def _check_length(self, index: int, continuation: str, e: _Encoded) -> None:
        if len(e.ids) > self._context_window:
            raise ValueError(
                f"score request {index}: prompt + continuation {continuation[:40]!r} is {len(e.ids)} "
                f"tokens ({e.split} of prompt), over {self.name}'s context window of "
                f"{self._context_window}; shorten the prompt (fewer or shorter demonstrations)"
            )

    # ---- model calls -------------------------------------------------------------------

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _prefill(self, ids: Sequence[int], cache: Any | None = None) -> tuple[Any, torch.Tensor]:
        """Run ``ids`` (batch 1) on ``cache`` (a fresh one if None); return the cache and last logits."""
        cache = self._new_cache() if cache is None else cache
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        out = self.model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.past_key_values, out.logits[0, -1].float()

    def _prefix_state(self, text: str) -> _PrefixState:
        """The prefilled shared prefix ``text``, from the LRU or computed now."""
        state = self._prefixes.get(text)
        if state is not None:
            self._prefixes.move_to_end(text)
            return state
        ids = tuple(self._encode_text(text))
        if not ids:
            ids = (self._start_id,)
        if len(ids) > self._context_window:
            raise ValueError(
                f"shared_prefix is {len(ids)} tokens, over {self.name}'s context window of {self._context_window}"
            )
        cache, logits = self._prefill(ids)
        state = _PrefixState(ids, cache, logits)
        if self.prefix_cache_size > 0:
            self._prefixes[text] = state
            while len(self._prefixes) > self.prefix_cache_size:
                self._prefixes.popitem(last=False)
        return state

    def _start_from_prefix(self, prefix: _PrefixState, ids: Sequence[int], length: int) -> tuple[Any, torch.Tensor]:
        """KV cache + last logits of ``ids[:length]``, reusing the cached ``prefix`` where it matches."""
        m = _common_prefix_len([prefix.ids, ids[:length]])
        if m == len(prefix.ids) and m == length:
            return _fork_cache(prefix.cache), prefix.last_logits
        if m == len(prefix.ids):
            return self._prefill(ids[m:length], _fork_cache(prefix.cache))
        # The prefix's last token(s) merged with the prompt's remainder: drop them from a fork
        # and recompute from one token earlier (so that a last-position logit row exists).
        keep = m - 1
        if keep >= 1:
            fork = _fork_cache(prefix.cache)
            try:
                fork.crop(-(len(prefix.ids) - keep))
            except (RuntimeError, ValueError):  # sliding-window layers past their window cannot crop
                pass
            else:
                return self._prefill(ids[keep:length], fork)
        return self._prefill(ids[:length])

    def _chunk_size(self, prefix_cache: Any) -> int:
        if self.suffix_mode == "packed":  # the prefix KV is shared, never copied per row
            return self.max_batch_size
        per_row = max(_cache_bytes(prefix_cache), 1)
        return max(1, min(self.max_batch_size, self.kv_budget_bytes // per_row))

    def _score_on_prefix(
        self, cache: Any, last_logits: torch.Tensor, length: int, encs: Sequence[_Encoded]
    ) -> list[np.ndarray]:
        """Log-probs of each encoding's continuation tokens, all sharing the prefilled ``ids[:length]``."""
        last_lse = torch.logsumexp(last_logits, dim=-1)
        results: list[np.ndarray | None] = [None] * len(encs)
        # Encodings that need a forward: the suffix beyond the prefix, minus the last token
        # (which predicts nothing). A single token after the prefix needs no forward at all.
        need = []
        for i, e in enumerate(encs):
            if e.split == len(e.ids):
                results[i] = np.zeros(0, dtype=np.float64)
            elif len(e.ids) - 1 == length:  # one token, predicted by the prefill's last logits
                results[i] = np.array([(last_logits[e.ids[length]] - last_lse).item()], dtype=np.float64)
            else:
                need.append(i)
        forward = self._packed_logits if self.suffix_mode == "packed" else self._batched_logits
        step = self._chunk_size(cache)
        for start in range(0, len(need), step):
            rows = need[start : start + step]
            chunk = [encs[i] for i in rows]
            # Targets: tokens j >= max(split, length + 1), each predicted at position j - 1.
            targets = [(r, j) for r, e in enumerate(chunk) for j in range(max(e.split, length + 1), len(e.ids))]
            picked = forward(cache, length, chunk, targets).float()  # [len(targets), vocab]
            tgt = torch.tensor([chunk[r].ids[j] for r, j in targets], device=picked.device)
            lp = picked.gather(1, tgt[:, None])[:, 0] - torch.logsumexp(picked, dim=-1)
            per_row: list[list[float]] = [[] for _ in rows]
            for (r, _), v in zip(targets, lp.double().cpu().tolist()):
                per_row[r].append(v)
            for r, i in enumerate(rows):
                e = encs[i]
                head = [(last_logits[e.ids[length]] - last_lse).item()] if e.split == length else []
                results[i] = np.array(head + per_row[r], dtype=np.float64)
        return results  # type: ignore[return-value]

    def _packed_logits(
        self, cache: Any, length: int, chunk: Sequence[_Encoded], targets: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """All suffixes of ``chunk`` packed into ONE row after the prefix, isolated by a tree mask.

        Each suffix token attends to the whole prefix and to the earlier tokens of its own
        suffix, at its own positions (RoPE ``position_ids``), so the result equals a separate
        forward per continuation, but the prefix KV is never copied and nothing is padded.
        Logits are computed only at the rows that predict a target (``logits_to_keep``).
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
        keep = torch.tensor([starts[r] + (j - 1 - length) for r, j in targets], device=self.device)
        p = torch.tensor(pos, device=self.device)
        b = torch.tensor(branch, device=self.device)
        own = (b[:, None] == b[None, :]) & (p[None, :] <= p[:, None])  # [S, S]
        masks = {}
        for kind, window in self._layer_kinds.items():
            if window is None:
                m = torch.cat([torch.ones(len(ids), length, dtype=torch.bool, device=self.device), own], 1)
            else:  # the sliding layers keep only the prefix's last ``kept`` keys
                kept = self._sliding_kept(cache, length)
                kpos = torch.arange(length - kept, length, device=self.device)
                m = torch.cat([(p[:, None] - kpos[None, :]) < window, own & ((p[:, None] - p[None, :]) < window)], 1)
            masks[kind] = self._format_mask(m[None, None])
        attention_mask = masks if len(masks) > 1 else masks["full_attention"]
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=p[None],
            attention_mask=attention_mask,
            past_key_values=_fork_cache(cache),
            use_cache=True,
            logits_to_keep=keep,
        )
        return out.logits[0]

    def _batched_logits(
        self, cache: Any, length: int, chunk: Sequence[_Encoded], targets: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """Suffixes as a right-padded batch on the prefix KV expanded to the batch (any attention kernel)."""
        inputs = [e.ids[length:-1] for e in chunk]
        width = max(len(s) for s in inputs)
        x = torch.full((len(chunk), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length + width), dtype=torch.long)
        mask[:, :length] = 1
        for r, s in enumerate(inputs):
            x[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, length : length + len(s)] = 1
        out = self.model(
            input_ids=x.to(self.device),
            attention_mask=mask.to(self.device),
            past_key_values=_fork_cache(cache, len(chunk)),
            use_cache=True,
        )
        rows = torch.tensor([r for r, _ in targets], device=self.device)
        cols = torch.tensor([j - 1 - length for _, j in targets], device=self.device)
        return out.logits[rows, cols]

    def _sliding_kept(self, cache: Any, length: int) -> int:
        for layer in cache.layers:
            if getattr(layer, "is_sliding", False):
                keys = getattr(layer, "keys", None)
                return int(keys.shape[-2]) if isinstance(keys, torch.Tensor) else 0
        return length

    def _format_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """Boolean "may attend" for SDPA; additive float (0 / -inf-ish) for eager attention."""
        if self._attn_impl == "sdpa":
            return allowed
        neg = torch.finfo(self.dtype).min
        return torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill(~allowed, neg)

    # ---- scoring -----------------------------------------------------------------------

    def score_batch(
        self, requests: Sequence[ScoreRequest], *, shared_prefix: str | None = None
    ) -> list[list[np.ndarray]]:
        """Per-token log-probs of every continuation; one prefill per request (see module doc).

        ``shared_prefix``: text every prompt starts with (e.g. many-shot demonstrations); its
        KV cache is computed once and reused across requests and calls.
        """
        requests = [(p, list(c)) for p, c in requests]
        if shared_prefix is not None:
            for i, (prompt, _) in enumerate(requests):
                if not prompt.startswith(shared_prefix):
                    raise ValueError(f"score request {i}: the prompt does not start with shared_prefix")
        out: list[list[np.ndarray]] = []
        with self._lock, torch.inference_mode():
            encoded = []  # all requests are checked before any model work
            for i, (prompt, conts) in enumerate(requests):
                encs = self._encode_pairs(prompt, conts) if conts else []
                for c, e in zip(conts, encs):
                    self._check_length(i, c, e)
                encoded.append(encs)
            prefix = self._prefix_state(shared_prefix) if shared_prefix is not None else None
            for encs in encoded:
                if not encs:
                    out.append([])
                    continue
                # Deduplicate identical tokenisations (the same label twice costs nothing).
                unique: dict[_Encoded, int] = {}
                for e in encs:
                    unique.setdefault(e, len(unique))
                uniq = list(unique)
                length = min(_common_prefix_len([e.ids for e in uniq]), min(e.split for e in uniq))
                if prefix is not None:
                    cache, last = self._start_from_prefix(prefix, uniq[0].ids, length)
                else:
                    cache, last = self._prefill(uniq[0].ids[:length])
                scores = self._score_on_prefix(cache, last, length, uniq)
                out.append([scores[unique[e]].copy() for e in encs])
        return out

    def score_naive(self, prompt: str, continuations: Sequence[str]) -> list[np.ndarray]:
        """One full forward per continuation: the reference for ``score_batch`` (and its baseline)."""
        out = []
        with self._lock, torch.inference_mode():
            encs = self._encode_pairs(prompt, list(continuations)) if continuations else []
            for c, e in zip(continuations, encs):
                self._check_length(0, c, e)
            for e in encs:
                n = len(e.ids) - e.split
                if n == 0:
                    out.append(np.zeros(0, dtype=np.float64))
                    continue
                x = torch.tensor([list(e.ids)], dtype=torch.long, device=self.device)
                logits = self.model(input_ids=x, use_cache=False, logits_to_keep=n + 1).logits[0, :-1].float()
                tgt = torch.tensor(e.ids[e.split :], device=logits.device)
                lp = logits.gather(1, tgt[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
                out.append(lp.double().cpu().numpy())
        return out

    def prefill(self, prompt: str) -> torch.Tensor:
        """Prefill ``prompt`` alone; return its last logits (a lower bound on scoring's cost)."""
        with self._lock, torch.inference_mode():
            return self._prefill(self._encode_text(prompt))[1]

    def clear_prefix_cache(self) -> None:
        with self._lock:
            self._prefixes.clear()

    # ---- generation --------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        seed: int = 0,
        choices: Sequence[str] | None = None,
    ) -> list[str]:
        """Batched, left-padded generation; greedy at temperature 0; ``choices``: the likeliest choice."""
        if choices is not None:
            choices = list(choices)
            if not choices:
                raise ValueError("choices is empty")
            scored = self.score_batch([(p, choices) for p in prompts])
            return [choices[int(np.argmax([float(np.sum(t)) for t in s]))] for s in scored]
        with self._lock:
            ids = [self._encode_text(p) for p in prompts]
        return self._generate_ids(
            ids,
            max_tokens=max_tokens,
            temperature=temperature,
            stop=stop,
            seed=seed,
        )

    def chat(
        self,
        conversations: Sequence[Conversation],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        seed: int = 0,
    ) -> list[str]:
        """Render each conversation with the model's chat template (plain "role: content" without one)."""
        with self._lock:
            rendered = [self._render_chat(i, conv) for i, conv in enumerate(conversations)]
        return self._generate_ids(rendered, max_tokens=max_tokens, temperature=temperature, stop=stop, seed=seed)

    def _render_chat(self, index: int, conv: Conversation) -> list[int]:
        if has_images(conv):
            raise CapabilityError(
                f"{self.name} is a text-only model and cannot read images (conversation {index}); "
                "use a vision-language model through the vLLM or OpenAI-compatible backend"
            )
        messages = [{"role": m["role"], "content": text_of(m)} for m in conv]
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self._encode_text(text)

    def _generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_tokens: int,
        temperature: float,
        stop: Sequence[str] | None,
        seed: int,
    ) -> list[str]:
        from transformers import GenerationConfig, StoppingCriteriaList

        for i, ids in enumerate(prompts):
            if len(ids) + max_tokens > self._context_window:
                raise ValueError(
                    f"prompt {i} is {len(ids)} tokens; with max_tokens={max_tokens} it exceeds "
                    f"{self.name}'s context window of {self._context_window}"
                )
        sample = temperature > 0
        gen = GenerationConfig(
            max_new_tokens=max_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=self._pad_id,
            eos_token_id=self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id,
        )
        texts: list[str] = []
        with self._lock, torch.inference_mode(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), self.max_batch_size):
                batch = prompts[start : start + self.max_batch_size]
                width = max(len(p) for p in batch)
                x = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, p in enumerate(batch):
                    x[r, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
                    mask[r, width - len(p) :] = 1
                criteria = StoppingCriteriaList([_StopOnStrings(self.tokenizer, stop, width)]) if stop else None
                out = self.model.generate(
                    input_ids=x.to(self.device),
                    attention_mask=mask.to(self.device),
                    generation_config=gen,
                    stopping_criteria=criteria,
                )
                decoded = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
                texts.extend(_cut_at_stop(t, stop) for t in decoded)
        return texts


def _layer_kinds(cfg: Any) -> dict[str, int | None] | None:
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


def _looks_local(model: str) -> bool:
    from iclcls.lm.models import OFFLINE_MODELS

    return model in OFFLINE_MODELS or os.path.exists(model)
