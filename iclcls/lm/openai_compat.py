"""An OpenAI-compatible HTTP server as an iclcls LM: ``vllm serve``, llama.cpp's server, hosted APIs.

``generate`` uses ``/v1/completions``, ``chat`` uses ``/v1/chat/completions`` (images are
sent as data URLs). Scoring needs a server that echoes prompt log-probs
(``echo: true`` + ``logprobs``); vLLM does, most hosted chat APIs and llama.cpp do not, and
then ``score_batch`` raises ``CapabilityError`` (rank generatively instead). Requests run
concurrently from a thread pool and are retried with exponential backoff on 429, 5xx,
timeouts and connection errors.
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from iclcls.lm.base import BaseLM, CapabilityError, Conversation, ScoreRequest, has_images
from iclcls.lm.vllm_engine import _check_choices, choice_token_budget, continuation_start

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
]


class ServerError(RuntimeError):
    """The server answered with an error, or could not be reached after all retries."""

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


# -- images and messages -----------------------------------------------------------------


def _image_mime(data: bytes) -> str:
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise ValueError("image bytes are not PNG, JPEG, GIF, BMP or WebP")


def image_to_url(image: str | Path | bytes) -> str:
    """An image as a URL a chat API accepts: http(s)/data URLs pass through, files and bytes
    become base64 ``data:`` URLs (the server needs no access to our files)."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        return f"data:{_image_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"
    text = str(image)
    if re.match(r"^(https?|data):", text):
        return text
    path = Path(text.removeprefix("file://"))
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    data = path.read_bytes()
    mime = mimetypes.guess_type(path.name)[0]
    if not mime or not mime.startswith("image/"):
        mime = _image_mime(data)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def to_openai_messages(conversation: Conversation) -> list[dict[str, Any]]:
    """iclcls messages -> OpenAI chat messages (image parts become ``image_url`` parts)."""
    out = []
    for m in conversation:
        content = m.get("content", "")
        if isinstance(content, list):
            parts = []
            for p in content:
                kind = p.get("type")
                if kind == "image":
                    parts.append({"type": "image_url", "image_url": {"url": image_to_url(p["image"])}})
                elif kind == "image_url":
                    url = p["image_url"]["url"] if isinstance(p["image_url"], dict) else p["image_url"]
                    parts.append({"type": "image_url", "image_url": {"url": image_to_url(url)}})
                else:
                    parts.append(p)
            content = parts
        out.append({**m, "content": content})
    return out


# -- the client ------------------------------------------------------------------------------


def _api_base(base_url: str) -> str:
    base = base_url.rstrip("/")
    # ".../v1", ".../v1beta/openai" are already API roots; a bare host gets "/v1".
    return base if re.search(r"/v\d+[a-z0-9]*(/openai)?$", base) else base + "/v1"


class OpenAICompatibleLM(BaseLM):
    """Client for any server that speaks the OpenAI completions/chat API.

    ``base_url`` is the server (``http://127.0.0.1:8000``) or its API root (``.../v1``).
    ``structured_outputs=None`` detects vLLM (``/version``, ``owned_by``) to constrain
    ``choices`` server-side; elsewhere ``choices`` are scored and the most likely returned.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 8,
        tokenizer: Any = None,
        context_window: int = 4096,
        structured_outputs: bool | None = None,
        name: str | None = None,
    ) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self.api_base = _api_base(base_url)
        self.root = re.sub(r"/v\d+[a-z0-9]*(/openai)?$", "", self.api_base)
        self.model = model
        self.name = "openai:" + (name or model)
        self.max_retries = max_retries
        self.backoff = backoff
        self.concurrency = max(1, concurrency)
        self.tokenizer = tokenizer
        self._default_context = context_window
        self._structured = structured_outputs
        self._score_max_tokens = 0  # echo-only scoring; some servers need 1
        self._models: list[dict[str, Any]] | None = None
        self._can_tokenize: bool | None = None
        self.token_count_exact = True  # False once count_tokens had to estimate
        self._lock = threading.Lock()
        key = api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("ICLCLS_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(
            timeout=timeout,
            headers=headers,
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAICompatibleLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP ------------------------------------------------------------------------------

    def _request(self, method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One call with retries on 429/5xx/timeouts/connection errors; JSON back or ServerError."""
        import httpx

        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self._client.request(method, url, json=body)
            except httpx.TimeoutException as e:
                last = f"timed out after {self._client.timeout.read} s ({type(e).__name__})"
                continue
            except httpx.TransportError as e:
                last = f"connection failed ({type(e).__name__}: {e})"
                continue
            if resp.status_code in RETRY_STATUS:
                last = f"HTTP {resp.status_code}: {resp.text[:300]}"
                retry_after = resp.headers.get("retry-after")
                if retry_after and retry_after.replace(".", "", 1).isdigit() and attempt < self.max_retries:
                    time.sleep(min(float(retry_after), 30.0))
                continue
            if resp.status_code >= 400:
                raise ServerError(
                    f"{method} {url} -> HTTP {resp.status_code}: {resp.text[:500]}",
                    status=resp.status_code,
                    body=resp.text,
                )
            try:
                return resp.json()
            except ValueError:
                raise ServerError(f"{method} {url} answered non-JSON: {resp.text[:300]!r}") from None
        raise ServerError(f"{method} {url} failed after {self.max_retries + 1} attempts: {last}")

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", self.api_base + path, body)

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    # -- server facts ------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """The server's ``/v1/models`` entries (cached)."""
        if self._models is None:
            self._models = list(self._request("GET", self.api_base + "/models").get("data", []))
        return self._models

    def _model_entry(self) -> dict[str, Any] | None:
        try:
            entries = self.models()
        except ServerError:
            return None
        return next((m for m in entries if m.get("id") == self.model), None)

    @property
    def is_vllm(self) -> bool:
        """Whether the server is vLLM (answers ``/version`` or lists models owned by vllm)."""
        if self._structured is None:
            entry = self._model_entry()
            found = bool(entry and entry.get("owned_by") == "vllm")
            if not found:
                try:
                    found = "version" in self._request("GET", self.root + "/version")
                except ServerError:
                    found = False
            self._structured = found
        return self._structured

    @property
    def context_window(self) -> int:
        entry = self._model_entry()
        if entry and isinstance(entry.get("max_model_len"), int):
            return int(entry["max_model_len"])
        return self._default_context

    def count_tokens(self, text: str) -> int:
        """Exact via the server's ``/tokenize`` (vLLM) or a local tokenizer; else about chars/4
        (``token_count_exact`` becomes False)."""
        if self._can_tokenize is not False:
            try:
                out = self._request(
                    "POST",
                    self.root + "/tokenize",
                    {"model": self.model, "prompt": text, "add_special_tokens": False},
                )
                self._can_tokenize = True
                return int(out["count"])
            except (ServerError, KeyError, TypeError):
                if self._can_tokenize:  # it worked before: a real error
                    raise
                self._can_tokenize = False
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        if self.token_count_exact:
            log.warning("%s: no /tokenize endpoint and no tokenizer; estimating tokens as chars/4", self.name)
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
            choices = _check_choices(choices)
            if not self.is_vllm:
                return self._pick_by_score(prompts, choices)
            body["structured_outputs"] = {"choice": choices}
            body["max_tokens"] = max(max_tokens, choice_token_budget(choices))

        def one(prompt: str) -> str:
            out = self._post("/completions", {**body, "prompt": prompt})
            return out["choices"][0]["text"]

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
            try:
                out = self._post("/chat/completions", {**body, "messages": to_openai_messages(conversation)})
            except ServerError as e:
                if e.status is not None and 400 <= e.status < 500 and has_images(conversation):
                    raise CapabilityError(
                        f"{self.name} refused a conversation with images (is the model "
                        f"multimodal?): {e}"
                    ) from e
                raise
            return out["choices"][0]["message"]["content"] or ""

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
            out = self._post("/completions", body)
        except ServerError as e:
            if e.status == 400 and body["max_tokens"] == 0 and "max_tokens" in e.body:
                with self._lock:
                    self._score_max_tokens = 1
                out = self._post("/completions", {**body, "max_tokens": 1})
            elif e.status is not None and 400 <= e.status < 500 and e.status != 404:
                raise CapabilityError(self._no_scoring(f"the server refused echo + logprobs: {e}")) from e
            else:
                raise
        by_index = sorted(out.get("choices", []), key=lambda ch: ch.get("index", 0))
        if len(by_index) != len(texts):
            raise CapabilityError(
                self._no_scoring(f"asked for {len(texts)} prompts' echoes, got {len(by_index)} choices")
            )
        return [
            self._continuation_logprobs(ch.get("logprobs"), prompt, text, where=f"request {index}, continuation {c}")
            for c, (ch, text) in enumerate(zip(by_index, texts))
        ]

    def _no_scoring(self, why: str) -> str:
        return (
            f"{self.name} cannot score continuations: it does not return prompt log-probs with "
            f"echo ({why}). Use a vLLM server, the in-process VLLMEngine or TransformersLM for "
            "likelihood ranking, or rank generatively (rank: generative) with this server"
        )

    def _continuation_logprobs(
        self, logprobs: dict[str, Any] | None, prompt: str, text: str, *, where: str
    ) -> np.ndarray:
        if not logprobs or not logprobs.get("token_logprobs") or not logprobs.get("text_offset"):
            raise CapabilityError(self._no_scoring("the response has no logprobs/text_offset"))
        tokens: list[str] = logprobs.get("tokens") or []
        values: list[float | None] = logprobs["token_logprobs"]
        offsets: list[int] = [int(o) - int(logprobs["text_offset"][0]) for o in logprobs["text_offset"]]
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

