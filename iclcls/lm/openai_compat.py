"""An OpenAI-compatible HTTP server as an iclcls LM: ``vllm serve``, llama.cpp's server, hosted APIs.

The transport is the ``openai`` SDK: per-request timeouts, retries with exponential
backoff (and ``Retry-After``) on 408/409/429/5xx, timeouts and connection errors.
``generate`` uses ``/v1/completions``, ``chat`` uses ``/v1/chat/completions`` (images are
sent as data URLs); vLLM's own options (structured outputs, ...) go in ``extra_body``.
Scoring needs a server that echoes prompt log-probs (``echo`` + ``logprobs``); vLLM does,
most hosted chat APIs and llama.cpp do not, and then ``score_batch`` raises
``CapabilityError`` (rank generatively instead).

Nothing fails quietly: every error names the server URL. The context window comes from
the server (vLLM's ``max_model_len``) or from ``context_window=``, never from a guess;
tokens are counted by the server's ``/tokenize`` or a local ``tokenizer=``, or, only when
asked (``approximate_tokens=True``), estimated as chars/4, which each prompt's trace records.
One backend, one module (~430 lines): the LM protocol over one HTTP client.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from iclcls.errors import LMServerError
from iclcls.lm.base import BaseLM, CapabilityError, Conversation, ScoreRequest, has_images
from iclcls.lm.common import check_choices, choice_token_budget, continuation_start, image_to_url, to_openai_messages

__all__ = ["OpenAICompatibleLM", "ServerError", "image_to_url", "to_openai_messages"]

log = logging.getLogger(__name__)


class ServerError(LMServerError):
    """The server answered with an error, or could not be reached after all retries; the
    message names the URL."""

    def __init__(self, message: str, *, status: int | None = None, body: str = "", url: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.url = url


def _api_base(base_url: str) -> str:
    base = base_url.rstrip("/")
    # ".../v1", ".../v1beta/openai" are already API roots; a bare host gets "/v1".
    return base if re.search(r"/v\d+[a-z0-9]*(/openai)?$", base) else base + "/v1"


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """A field of an SDK object or a plain dict (servers add fields the SDK does not model)."""
    if isinstance(obj, dict):
        return obj.get(key, default)
    value = getattr(obj, key, None)
    if value is None and getattr(obj, "model_extra", None):
        value = obj.model_extra.get(key)
    return default if value is None else value


class OpenAICompatibleLM(BaseLM):
    """Client for any server that speaks the OpenAI completions/chat API.

    ``base_url`` is the server (``http://127.0.0.1:8000``) or its API root (``.../v1``).
    ``timeout`` bounds each request (seconds); ``max_retries`` retries it with backoff.
    ``context_window`` is required for servers that do not report ``max_model_len``.
    ``structured_outputs=None`` detects vLLM (``/v1/models`` ``owned_by``, ``/version``) to
    constrain ``choices`` server-side; elsewhere ``choices`` are scored. ``extra_body`` is
    merged into every completions/chat request (server-specific options).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 8,
        tokenizer: Any = None,
        context_window: int | None = None,
        approximate_tokens: bool = False,
        structured_outputs: bool | None = None,
        extra_body: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        import openai

        self.base_url = base_url.rstrip("/")
        self.api_base = _api_base(base_url)
        self.root = re.sub(r"/v\d+[a-z0-9]*(/openai)?$", "", self.api_base)
        self.model = model
        self.name = "openai:" + (name or model)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.concurrency = max(1, concurrency)
        self.tokenizer = tokenizer
        self.approximate_tokens = approximate_tokens
        self.extra_body = dict(extra_body or {})
        self._context_window = context_window
        self._structured = structured_outputs
        self._score_max_tokens = 0  # echo-only scoring; some servers need 1
        self._models: list[Any] | None = None
        self._no_tokenize_endpoint = False  # set only when the server said 404/405
        self.token_count_exact = True  # False once count_tokens estimated (approximate mode)
        self._lock = threading.Lock()
        key = api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("ICLCLS_API_KEY") or "none"
        self._client = openai.OpenAI(
            base_url=self.api_base, api_key=key, timeout=self.timeout, max_retries=self.max_retries
        )
        self._root_client = self._client.copy(base_url=self.root) if self.root != self.api_base else self._client

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        self._client.close()
        if self._root_client is not self._client:
            self._root_client.close()

    def __enter__(self) -> OpenAICompatibleLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport: every SDK error becomes a ServerError that names the URL --------------

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        import openai

        url = (self.root if what.startswith(("/tokenize", "/version")) else self.api_base) + what
        tries = f"{self.max_retries + 1} attempt{'s' if self.max_retries else ''}"
        try:
            return fn()
        except openai.APITimeoutError:
            raise ServerError(
                f"{url}: timed out after {self.timeout:g} s per request ({tries}); is the server at "
                f"{self.base_url} overloaded or down? (raise timeout= for slow models)", url=url
            ) from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            raise ServerError(
                f"{url}: connection failed after {tries} ({type(cause).__name__}: {str(cause)[:200]}); "
                f"is the server at {self.base_url} running?", url=url
            ) from None
        except openai.APIStatusError as e:
            body = e.response.text if e.response is not None else ""
            retried = f" after {tries}" if e.status_code in (408, 409, 429) or e.status_code >= 500 else ""
            raise ServerError(
                f"{url} -> HTTP {e.status_code}{retried}: {body[:500]}", status=e.status_code, body=body, url=url
            ) from None

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    def _completions(self, body: dict[str, Any]) -> Any:
        extra = {**self.extra_body, **body.pop("extra_body", {})}
        return self._call("/completions", lambda: self._client.completions.create(**body, extra_body=extra or None))

    # -- server facts ------------------------------------------------------------------------

    def models(self) -> list[Any]:
        """The server's ``/v1/models`` entries (cached once they were read)."""
        if self._models is None:
            page = self._call("/models", lambda: self._client.models.list())
            self._models = list(page.data)
        return self._models

    def _model_entry(self) -> Any | None:
        return next((m for m in self.models() if _get(m, "id") == self.model), None)

    @property
    def is_vllm(self) -> bool:
        """Whether the server is vLLM (lists models owned by vllm, or answers ``/version``).

        Only a definite answer is remembered: a failed request raises and is asked again next time.
        """
        if self._structured is None:
            entry = self._model_entry()
            found = bool(entry is not None and _get(entry, "owned_by") == "vllm")
            if not found:
                try:
                    found = "version" in self._call(
                        "/version", lambda: self._root_client.get("/version", cast_to=object)
                    )
                except ServerError as e:
                    if e.status is None or e.status >= 500:  # no answer: do not conclude anything
                        raise
                    found = False
            self._structured = found
        return self._structured

    @property
    def context_window(self) -> int:
        """``context_window=`` if given, else the server's ``max_model_len`` for the model."""
        if self._context_window is None:
            try:
                entry = self._model_entry()
            except ServerError as e:
                raise ServerError(
                    f"{self.name}: cannot learn the context window from the server ({e}); pass "
                    "context_window= to use this client without it", status=e.status, url=e.url
                ) from None
            value = _get(entry, "max_model_len") if entry is not None else None
            if not isinstance(value, int):
                raise ServerError(
                    f"{self.api_base}/models does not report a context window (max_model_len) for "
                    f"model {self.model!r}; pass context_window= (the model's maximum tokens)",
                    url=self.api_base + "/models",
                )
            self._context_window = int(value)
        return self._context_window

    def count_tokens(self, text: str) -> int:
        """Exact via the server's ``/tokenize`` (vLLM) or a local ``tokenizer``; chars/4 only
        with ``approximate_tokens=True`` (``token_count_exact`` becomes False)."""
        if not self._no_tokenize_endpoint:
            try:
                out = self._call(
                    "/tokenize",
                    lambda: self._root_client.post(
                        "/tokenize",
                        body={"model": self.model, "prompt": text, "add_special_tokens": False},
                        cast_to=object,
                    ),
                )
                return int(out["count"])
            except ServerError as e:
                if e.status not in (404, 405):  # a real failure, not a missing endpoint
                    raise
                self._no_tokenize_endpoint = True
            except (KeyError, TypeError, ValueError):
                raise ServerError(f"{self.root}/tokenize answered without a token count", url=self.root + "/tokenize") from None
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        if not self.approximate_tokens:
            raise ServerError(
                f"{self.root}/tokenize does not exist, so {self.name} cannot count tokens: pass a local "
                "tokenizer= (e.g. transformers.AutoTokenizer for the model) or approximate_tokens=True "
                "to estimate chars/4 (recorded in each prompt's trace)",
                status=404,
                url=self.root + "/tokenize",
            )
        if self.token_count_exact:
            log.warning("%s: estimating tokens as chars/4 (approximate_tokens=True)", self.name)
            self.token_count_exact = False
        return max(1, (len(text) + 3) // 4) if text else 0

    # -- LM protocol ----------------------------------------------------------------------------

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
        """``/v1/completions`` per prompt; ``choices`` are enforced by vLLM or picked by score."""
        if not prompts:
            return []
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
        }
        if stop:
            body["stop"] = list(stop)
        if choices is not None:
            choices = check_choices(choices)
            if not self.is_vllm:
                return self._pick_by_score(prompts, choices)
            body["extra_body"] = {"structured_outputs": {"choice": choices}}
            body["max_tokens"] = max(max_tokens, choice_token_budget(choices))

        def one(prompt: str) -> str:
            out = self._completions({**body, "prompt": prompt})
            return out.choices[0].text or ""

        return self._map(one, list(prompts))

    def _pick_by_score(self, prompts: Sequence[str], choices: list[str]) -> list[str]:
        try:
            scores = self.score_batch([(p, choices) for p in prompts])
        except CapabilityError as e:
            raise CapabilityError(
                f"{self.name}: constrained choice needs a vLLM server (structured outputs) or "
                f"prompt log-probs to score the choices; this server has neither ({e}). Generate "
                "freely and map the answer to a label instead (generative ranking)"
            ) from e
        return [choices[int(np.argmax([float(np.sum(t)) for t in s]))] for s in scores]

    def chat(
        self,
        conversations: Sequence[Conversation],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        seed: int = 0,
    ) -> list[str]:
        """``/v1/chat/completions`` per conversation; images go as base64 data URLs."""
        if not conversations:
            return []
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
        }
        if stop:
            body["stop"] = list(stop)

        def one(conversation: Conversation) -> str:
            messages = to_openai_messages(conversation)
            try:
                out = self._call(
                    "/chat/completions",
                    lambda: self._client.chat.completions.create(
                        **body, messages=messages, extra_body=self.extra_body or None
                    ),
                )
            except ServerError as e:
                if e.status is not None and 400 <= e.status < 500 and has_images(conversation):
                    raise CapabilityError(
                        f"{self.name} refused a conversation with images (is the model "
                        f"multimodal?): {e}"
                    ) from e
                raise
            return out.choices[0].message.content or ""

        return self._map(one, list(conversations))

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[list[np.ndarray]]:
        """Per-token log-probs of each continuation, from prompt log-probs echoed by the server.

        One ``/v1/completions`` call per request (its continuations as a prompt list) with
        ``echo: true, logprobs: 1, max_tokens: 0``; the split uses the returned
        ``text_offset``s with ``continuation_start``'s rule, as ``VLLMEngine`` does.
        """
        return self._map(lambda item: self._score_one(*item), list(enumerate(requests)))

    def _score_one(self, index: int, request: ScoreRequest) -> list[np.ndarray]:
        prompt, continuations = request[0], list(request[1])
        if not continuations:
            return []
        texts = [prompt + c for c in continuations]
        body = {
            "model": self.model,
            "prompt": texts,
            "echo": True,
            "logprobs": 1,
            "max_tokens": self._score_max_tokens,
            "temperature": 0.0,
        }
        try:
            out = self._completions(dict(body))
        except ServerError as e:
            if e.status == 400 and body["max_tokens"] == 0 and "max_tokens" in e.body:
                with self._lock:
                    self._score_max_tokens = 1
                out = self._completions({**body, "max_tokens": 1})
            elif e.status is not None and 400 <= e.status < 500 and e.status != 404:
                raise CapabilityError(self._no_scoring(f"the server refused echo + logprobs: {e}")) from e
            else:
                raise
        by_index = sorted(out.choices or [], key=lambda ch: _get(ch, "index", 0))
        if len(by_index) != len(texts):
            raise CapabilityError(
                self._no_scoring(f"asked for {len(texts)} prompts' echoes, got {len(by_index)} choices")
            )
        return [
            self._continuation_logprobs(_get(ch, "logprobs"), prompt, text, where=f"request {index}, continuation {c}")
            for c, (ch, text) in enumerate(zip(by_index, texts))
        ]

    def _no_scoring(self, why: str) -> str:
        return (
            f"{self.name} at {self.api_base} cannot score continuations: it does not return prompt "
            f"log-probs with echo ({why}). Use a vLLM server, the in-process VLLMEngine or "
            "TransformersLM for likelihood ranking, or rank generatively (rank: generative) with this server"
        )

    def _continuation_logprobs(self, logprobs: Any, prompt: str, text: str, *, where: str) -> np.ndarray:
        values: list[float | None] = list(_get(logprobs, "token_logprobs", None) or []) if logprobs else []
        raw_offsets = list(_get(logprobs, "text_offset", None) or []) if logprobs else []
        if not values or not raw_offsets:
            raise CapabilityError(self._no_scoring("the response has no logprobs/text_offset"))
        tokens: list[str] = list(_get(logprobs, "tokens", None) or [])
        offsets: list[int] = [int(o) - int(raw_offsets[0]) for o in raw_offsets]
        if len(tokens) != len(offsets):
            raise CapabilityError(self._no_scoring("tokens and text_offset differ in length"))
        # A leading special token (BOS) is echoed as text ("<s>") that the prompt lacks:
        # shift the boundary by its length.
        shift = 0
        if values[0] is None and tokens and not text.startswith(tokens[0]) and len(offsets) > 1:
            if offsets[1] - offsets[0] == len(tokens[0]):
                shift = len(tokens[0])
        total = shift + len(text)
        n = sum(1 for o in offsets if o < total)  # echoed prompt tokens; generated ones follow
        spans = []
        for i in range(n):
            # The end of a token is the next larger offset: zero-width pieces (partial UTF-8)
            # join the token that completes them.
            end = next((o for o in offsets[i + 1 : n] if o > offsets[i]), total)
            spans.append((offsets[i], end))
        start = continuation_start(spans, len(prompt) + shift)
        if len(text) > len(prompt) and start == 0:
            raise ValueError(
                f"score_batch {where}: the continuation starts at the first token, which has no "
                "conditional log-prob; give a non-empty prompt"
            )
        picked = values[start:n]
        if any(v is None for v in picked):
            raise CapabilityError(self._no_scoring("some prompt tokens have no logprob"))
        return np.asarray(picked, dtype=np.float64)

    def __repr__(self) -> str:
        return f"OpenAICompatibleLM({self.api_base!r}, {self.model!r})"
