"""The embedded LM backend: a Hugging Face transformers causal LM, in process, on CPU or GPU.

Scoring is the hot path of likelihood ranking, so ``score_batch`` shares work:
prompt and continuation are tokenised together and split at the prompt's character
offset (the continuation's tokens are the ones the model really sees); the token prefix
shared by all of a request's continuations is prefilled ONCE; then all continuation
suffixes run in one more forward on that KV cache, and log-probabilities are taken only
at the rows that predict continuation tokens (a 262k vocabulary times every prompt
position would cost gigabytes); the suffix forward is ``packed`` (tree mask) or ``batched``
(see ``suffix_modes``). ``score_naive`` runs one full forward per continuation: the
reference the shared path is tested against, and the benchmark's baseline.
``score_batch(requests, shared_prefix=...)`` (many-shot demonstrations shared across
queries, or one class prompt per class for the channel ranker) prefills that prefix once and keeps its KV cache in an LRU keyed by its text (bounded in entries and bytes).

Beside this class: loading (``hf_loading``, ``gguf``), KV-cache forking and prefix reuse
(``kv_cache``), the suffix modes (``suffix_modes``), generation and chat (``hf_generate``);
what stays here (~430 lines) is one backend's LM protocol and its shared-prefix scoring path.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from iclcls.errors import ConfigError
from iclcls.lm.base import BaseLM, Conversation, ScoreRequest
from iclcls.lm.common import check_choices, likeliest
from iclcls.lm.gguf import gguf_metadata_value  # noqa: F401  (re-exported: it lived here)
from iclcls.lm.hf_generate import generate_ids, render_chat
from iclcls.lm.hf_loading import Loaded, context_window_of, load_causal_lm, special_ids
from iclcls.lm.kv_cache import PrefixState, cache_bytes, fork_cache, start_from_prefix
from iclcls.lm.models import ModelSource
from iclcls.lm.suffix_modes import Encoded, batched_logits, choose_suffix_mode, layer_kinds, packed_logits
from iclcls.lm.tree_batch import Prefix, TreeRequest, tree_scores
from iclcls.util import common_prefix_len

DEFAULT_CONTEXT_CAP = 8192
# Continuations per suffix batch are also limited so that the prefix KV cache, expanded
# to the batch, stays under this many bytes (long many-shot prefixes otherwise explode).
DEFAULT_KV_BUDGET = 2 * 1024**3
# Prefilled prefixes kept for reuse (LRU): many-shot demonstrations, or one per class for the
# channel ranker (SmolLM2: ~7 MB per 150-token class prompt, so 150 classes ~ 1 GiB).
DEFAULT_PREFIX_CACHE_BYTES = 2 * 1024**3
# Tokens per batched scoring forward (``batch_mode="tree"``): prompts and candidate suffixes
# of many requests together. A GPU wants wide forwards; on a CPU wider gains little.
DEFAULT_BATCH_TOKENS_GPU = 16384
DEFAULT_BATCH_TOKENS_CPU = 2048


class TransformersLM(BaseLM):
    """A causal LM run in process through transformers; see the module docstring.

    ``model``: an offline short name (``smollm2``, ``gemma3-270m``), a local directory or
    ``.gguf`` file, or a Hugging Face model id (see ``hf_loading.load_causal_lm``).
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
        prefix_cache_size: int = 1024,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        kv_budget_bytes: int = DEFAULT_KV_BUDGET,
        convert_gguf: bool = True,
        add_bos: bool | None = None,
        suffix_mode: str = "auto",
        batch_mode: str = "auto",
        max_batch_tokens: int | None = None,
        attn_implementation: str | None = None,
        loaded: Loaded | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if loaded is None:
            loaded = load_causal_lm(model, gguf_file=gguf_file, device=device, dtype=dtype,
                                    convert_gguf=convert_gguf, attn_implementation=attn_implementation)
        self.source, self.tokenizer, self.model = loaded.source, loaded.tokenizer, loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        self.name = f"transformers:{self.source.name}"
        self.max_batch_size = max_batch_size
        self.kv_budget_bytes = kv_budget_bytes
        self.prefix_cache_size = prefix_cache_size
        self.prefix_cache_bytes = prefix_cache_bytes
        self._context_window = context_window_of(self.model, self.name, context_window, context_cap)
        self._pad_id, self._start_id, self._extra_bos = special_ids(self.tokenizer, self.source, add_bos)

        self._attn_impl = getattr(self.model.config, "_attn_implementation", None) or "eager"
        self._layer_kinds = layer_kinds(self.model.config.get_text_config(decoder=True))
        self.suffix_mode = self._choose_suffix_mode(suffix_mode)
        self.batch_mode = self._choose_batch_mode(batch_mode)
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ConfigError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.max_batch_tokens = max_batch_tokens or (
            DEFAULT_BATCH_TOKENS_GPU if self.device.type == "cuda" else DEFAULT_BATCH_TOKENS_CPU)
        # A hint to stages that could either reuse a prefix's KV cache one request at a time or
        # send all requests in one call (the channel ranker): on a GPU, one wide call wins.
        self.prefer_batched_requests = self.batch_mode == "tree" and self.device.type == "cuda"

        self._lock = threading.RLock()
        self._prefixes: OrderedDict[str, PrefixState] = OrderedDict()

    def _choose_suffix_mode(self, mode: str) -> str:
        return choose_suffix_mode(mode, attn_impl=self._attn_impl, kinds=self._layer_kinds, name=self.name)

    def _choose_batch_mode(self, mode: str) -> str:
        """``tree``: many requests per forward (``tree_batch``); ``per_request``: one prefill each."""
        treeable = (self.suffix_mode == "packed" and hasattr(self.model, "get_decoder")
                    and self.model.get_output_embeddings() is not None)
        if mode == "auto":
            return "tree" if treeable else "per_request"
        if mode == "tree" and not treeable:
            raise ConfigError(f"{self.name}: batch_mode='tree' needs the packed suffix mode (sdpa or eager "
                             "attention, full/sliding layers); use 'per_request'")
        if mode not in ("tree", "per_request"):
            raise ConfigError(f"batch_mode must be 'auto', 'tree' or 'per_request', got {mode!r}")
        return mode

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, name: str, **options: Any) -> TransformersLM:
        """Wrap a model already built in memory (e.g. random weights of a given shape, to measure
        speed without writing gigabytes to disk); its device and dtype are the model's own."""
        param = next(model.parameters())
        loaded = Loaded(ModelSource(name, name, chat=False), tokenizer, model.eval(), param.device, param.dtype)
        return cls(name, loaded=loaded, **options)

    @classmethod
    def from_name(cls, name: str = "smollm2", **options: Any) -> BaseLM:
        """``smollm2`` (default), ``gemma3-270m``, a local dir/GGUF file, or an HF model id.
        A local folder of a vision-language model (its config has a vision tower) loads as
        :class:`~iclcls.lm.hf_vision.TransformersVLM`, which reads images in ``chat``."""
        from iclcls.lm.hf_vision import TransformersVLM, is_vision_model_dir

        if is_vision_model_dir(name):
            return TransformersVLM(name, **options)
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

    def _encode_pairs(self, prompt: str, continuations: Sequence[str]) -> list[Encoded]:
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
            out.append(Encoded(tuple(ids), split))
        return out

    def _check_length(self, index: int, continuation: str, e: Encoded) -> None:
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

    def _prefix_state(self, text: str) -> PrefixState:
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
        state = PrefixState(ids, cache, logits, cache_bytes(cache))
        if self.prefix_cache_size > 0 and state.nbytes <= self.prefix_cache_bytes:
            self._prefixes[text] = state
            total = sum(s.nbytes for s in self._prefixes.values())
            while len(self._prefixes) > self.prefix_cache_size or total > self.prefix_cache_bytes:
                total -= self._prefixes.popitem(last=False)[1].nbytes
        return state

    def _chunk_size(self, prefix_cache: Any) -> int:
        if self.suffix_mode == "packed":  # the prefix KV is shared, never copied per row
            return self.max_batch_size
        per_row = max(cache_bytes(prefix_cache), 1)
        return max(1, min(self.max_batch_size, self.kv_budget_bytes // per_row))

    def _score_on_prefix(
        self, cache: Any, last_logits: torch.Tensor, length: int, encs: Sequence[Encoded]
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
        if self.suffix_mode == "packed":
            def forward(*args):
                return packed_logits(self.model, *args, kinds=self._layer_kinds, attn_impl=self._attn_impl,
                                     dtype=self.dtype, device=self.device)
        else:
            def forward(*args):
                return batched_logits(self.model, *args, pad_id=self._pad_id, device=self.device)
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

    # ---- scoring -----------------------------------------------------------------------

    def score_batch(
        self, requests: Sequence[ScoreRequest], *, shared_prefix: str | None = None
    ) -> list[list[np.ndarray]]:
        """Per-token log-probs of every continuation (see module doc): many requests per
        forward (``batch_mode="tree"``) or one prefill per request (``"per_request"``).

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
            trees: list[TreeRequest | None] = []
            for encs in encoded:
                # Deduplicate identical tokenisations (the same label twice costs nothing).
                uniq = list(dict.fromkeys(encs))
                if not uniq:
                    trees.append(None)
                    continue
                length = min(common_prefix_len(*[e.ids for e in uniq]), min(e.split for e in uniq))
                trees.append(TreeRequest(uniq, length))
            live = [t for t in trees if t is not None]
            if self.batch_mode == "tree":
                scored = iter(self._score_trees(live, prefix))
            else:
                scored = iter([self._score_one(t, prefix) for t in live])
            for encs, tree in zip(encoded, trees):
                if tree is None:
                    out.append([])
                    continue
                scores = next(scored)
                index = {e: k for k, e in enumerate(tree.encs)}
                out.append([scores[index[e]].copy() for e in encs])
        return out

    def _score_one(self, tree: TreeRequest, prefix: PrefixState | None) -> list[np.ndarray]:
        """The per-request path: prefill the prompt (batch 1), then its suffixes on that cache."""
        uniq, length = list(tree.encs), tree.length
        if prefix is not None:
            cache, last = start_from_prefix(prefix, uniq[0].ids, length, self._prefill)
        else:
            cache, last = self._prefill(uniq[0].ids[:length])
        return self._score_on_prefix(cache, last, length, uniq)

    def _score_trees(self, trees: Sequence[TreeRequest], prefix: PrefixState | None) -> list[list[np.ndarray]]:
        """The batched path: many requests per forward (``tree_batch``), on the shared prefix if any."""
        start = self._tree_prefix(prefix, trees) if prefix is not None else None
        return tree_scores(self.model, trees, prefix=start, kinds=self._layer_kinds or {"full_attention": None},
                           attn_impl=self._attn_impl, dtype=self.dtype, device=self.device, pad_id=self._pad_id,
                           token_budget=self.max_batch_tokens)

    def _tree_prefix(self, prefix: PrefixState, trees: Sequence[TreeRequest]) -> Prefix | None:
        """The cached prefix's part every request starts with (cropped if a prompt re-tokenised its end)."""
        keep = min([len(prefix.ids)] + [common_prefix_len(prefix.ids, t.encs[0].ids[: t.length]) for t in trees])
        if keep == len(prefix.ids):
            return Prefix(prefix.cache, keep, prefix.last_logits)
        keep = min([keep] + [t.length - 1 for t in trees])  # each request then has a prompt token to run
        if keep < 1:
            return None
        fork = fork_cache(prefix.cache)
        try:
            fork.crop(-(len(prefix.ids) - keep))
        except (RuntimeError, ValueError):  # sliding-window layers past their window cannot crop
            return None
        return Prefix(fork, keep, prefix.last_logits)  # last_logits unused: every request has prompt tokens

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
            choices = check_choices(choices)
            return likeliest(self.score_batch([(p, choices) for p in prompts]), choices)
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
            rendered = [render_chat(self.tokenizer, conv, index=i, name=self.name, encode_text=self._encode_text)
                        for i, conv in enumerate(conversations)]
        return self._generate_ids(rendered, max_tokens=max_tokens, temperature=temperature, stop=stop, seed=seed)

    def _generate_ids(
        self, prompts: Sequence[Sequence[int]], *, max_tokens: int, temperature: float, stop: Sequence[str] | None, seed: int
    ) -> list[str]:
        for i, ids in enumerate(prompts):
            if len(ids) + max_tokens > self._context_window:
                raise ValueError(
                    f"prompt {i} is {len(ids)} tokens; with max_tokens={max_tokens} it exceeds "
                    f"{self.name}'s context window of {self._context_window}"
                )
        with self._lock:
            return generate_ids(self.model, self.tokenizer, prompts, pad_id=self._pad_id, max_batch_size=self.max_batch_size,
                                max_tokens=max_tokens, temperature=temperature, stop=stop, seed=seed, device=self.device)
