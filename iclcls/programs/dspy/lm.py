"""iclcls LM backends as DSPy language models, and the served vLLM path with guided JSON.

``dspy_lm(lm)`` wraps any iclcls backend (the embedded transformers model, the in-process
vLLM engine, an OpenAI-compatible client) as a ``dspy.LM`` (a ``dspy.BaseLM``) through
DSPy 3.4's engine contract: ``IclclsEngine.complete(Request) -> Response``.

Parseable by construction. A 135M model rarely writes DSPy's field markers or valid JSON,
so when DSPy's JSON adapter asks for a JSON schema (``response_format``) the engine does
not let the model write the JSON: it writes the object's skeleton itself and asks the
model only for the values, field by field, in schema order:

- a string field: generated after the opening quote, up to the closing quote;
- an enum field: the likeliest choice (log-likelihood of each allowed value);
- an array of enum values (Rank's candidate list): every allowed value scored as the
  array's first element, sorted by log-likelihood, cut at ``maxItems``;
- numbers and booleans: generated and parsed, defaulting to 0 / false.

So every answer parses, and an array of enum values holds only allowed values. The served
path gets the same guarantee from the server: ``served_lm(url, model)`` declares the
vLLM server to DSPy as a provider that honours JSON schemas, so DSPy's JSON adapter sends
the schema and vLLM's guided decoding enforces it. Both paths stay in one module (~410
lines): they implement one contract, DSPy's engine, and share its request handling.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import dspy
import numpy as np
from dspy.lm15 import Message, Response, TextPart, Usage, response_to_events

from iclcls.lm.base import LM

DEFAULT_MAX_TOKENS = 64


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(getattr(p, "text", "") or "" for p in content)


def request_messages(request: Any) -> list[dict[str, str]]:
    """A DSPy/lm15 Request as plain chat messages (system first)."""
    messages = []
    system = _text_of(request.system)
    if system:
        messages.append({"role": "system", "content": system})
    messages.extend({"role": m.role, "content": m.text or ""} for m in request.messages)
    return messages


def _tokenizer_of(lm: Any) -> Any:
    """The Hugging Face tokenizer behind an iclcls backend (or a cache wrapping one), if any."""
    seen = 0
    while lm is not None and seen < 4:
        for attr in ("tokenizer", "_tokenizer"):
            tok = getattr(lm, attr, None)
            if tok is not None and hasattr(tok, "apply_chat_template"):
                return tok
        lm = getattr(lm, "lm", None)  # CachedLM and similar wrappers
        seen += 1
    return None


def render_chat(lm: Any, messages: Sequence[Mapping[str, str]]) -> str:
    """The exact text the model sees for a conversation, ending where the assistant starts.

    With a chat template: the template's rendering (without a leading BOS the tokenizer
    adds again); without one: ``role: content`` lines and ``assistant:``, as
    ``TransformersLM.chat`` renders it.
    """
    tok = _tokenizer_of(lm)
    if tok is not None and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        bos = getattr(tok, "bos_token", None)
        if bos and text.startswith(bos):
            text = text[len(bos) :]
        return text
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _json_schema(response_format: Any) -> dict[str, Any] | None:
    """The object schema inside an OpenAI-style ``response_format`` (None: no schema)."""
    if not isinstance(response_format, Mapping):
        return None
    if response_format.get("type") == "json_schema":
        inner = response_format.get("json_schema", response_format)
        schema = inner.get("schema") if isinstance(inner, Mapping) else None
        return dict(schema) if isinstance(schema, Mapping) else None
    return None


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow a local ``$ref`` and unwrap single-branch ``anyOf``/``allOf``."""
    for _ in range(8):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            node: Any = root
            for part in ref[2:].split("/"):
                node = node.get(part, {}) if isinstance(node, Mapping) else {}
            schema = node
            continue
        for key in ("allOf", "anyOf"):
            branches = [b for b in schema.get(key, []) or [] if b.get("type") != "null"]
            if len(branches) == 1 and len(schema.get(key)) <= 2:
                schema = branches[0]
                break
        else:
            return schema
    return schema


class GuidedDecoder:
    """Writes a JSON object for a schema with an iclcls LM: skeleton by us, values by the LM."""

    def __init__(self, lm: LM, *, max_tokens: int = DEFAULT_MAX_TOKENS, reduce: str = "sum") -> None:
        self.lm = lm
        self.max_tokens = max_tokens
        self.reduce = reduce

    def decode(self, prompt: str, schema: Mapping[str, Any], *, max_tokens: int | None = None) -> str:
        props = schema.get("properties") or {}
        budget = max_tokens or self.max_tokens
        text = "{"
        values: dict[str, Any] = {}
        for i, (name, sub) in enumerate(props.items()):
            text += ("" if i == 0 else ", ") + json.dumps(name) + ": "
            value = self._value(prompt + text, _resolve(sub, schema), schema, budget)
            values[name] = value
            text += json.dumps(value, ensure_ascii=False)
        return json.dumps(values, ensure_ascii=False)

    def _value(self, prefix: str, sub: Mapping[str, Any], root: Mapping[str, Any], budget: int) -> Any:
        if "enum" in sub and sub["enum"]:
            return self._choose(prefix, list(sub["enum"]))
        kind = sub.get("type")
        if kind == "array":
            items = _resolve(sub.get("items") or {}, root)
            if "enum" in items and items["enum"]:
                ranked = self._rank(prefix + "[", list(items["enum"]))
                cap = sub.get("maxItems")
                return ranked[: int(cap)] if isinstance(cap, int) and cap >= 0 else ranked
            raw = self._generate(prefix + '["', budget, ["]", "\n"])
            return [p.strip().strip('"').strip() for p in raw.split('",') if p.strip().strip('"').strip()]
        if kind in ("integer", "number"):
            raw = self._generate(prefix, 8, [",", "}", "\n"])
            m = re.search(r"-?\d+(?:\.\d+)?", raw)
            num = float(m.group()) if m else 0.0
            return int(num) if kind == "integer" else num
        if kind == "boolean":
            return bool(self._choose(prefix, [True, False]))
        # strings (and anything else): free text inside the quotes
        raw = self._generate(prefix + '"', budget, ['"', "\n"])
        return raw.replace("\\", "").strip()

    def _generate(self, prompt: str, max_tokens: int, stop: list[str]) -> str:
        """Greedy text up to the first stop string (cut here too: not every backend honours ``stop``)."""
        raw = self.lm.generate([prompt], max_tokens=max_tokens, temperature=0.0, stop=stop)[0]
        cut = min((i for i in (raw.find(s) for s in stop) if i >= 0), default=len(raw))
        return raw[:cut]

    def _scores(self, prefix: str, options: Sequence[Any]) -> np.ndarray:
        conts = [json.dumps(o, ensure_ascii=False) for o in options]
        return np.asarray(self.lm.score(prefix, conts, reduce=self.reduce), dtype=np.float64)

    def _choose(self, prefix: str, options: Sequence[Any]) -> Any:
        return options[int(np.argmax(self._scores(prefix, options)))]

    def _rank(self, prefix: str, options: Sequence[Any]) -> list[Any]:
        scores = self._scores(prefix, options)
        return [options[i] for i in np.argsort(-scores, kind="stable")]


class _Pending:
    __slots__ = ("key", "prompt", "result", "error", "done")

    def __init__(self, key: tuple, prompt: str) -> None:
        self.key, self.prompt = key, prompt
        self.result: str | None = None
        self.error: BaseException | None = None
        self.done = False


class CoalescingLM:
    """An iclcls LM shared by threads: concurrent ``generate`` calls with the same options
    run as one batched call; every other call runs alone. One call at a time reaches the model.

    Why: DSPy calls the LM once per sentence and step. Run over many sentences on a few threads
    (:func:`iclcls.programs.dspy.modules.map_threads`), the Infer generations that queue while the model
    is busy are served together: on 2 CPU cores 8 SmolLM2 generations take about 1.7x the time
    of one. Scoring gains nothing from batching on a CPU, so ``score`` calls stay one request each
    (the same numbers as unwrapped). Attributes not defined here (tokenizer, name, ...) are the
    wrapped LM's.
    """

    def __init__(self, lm: LM) -> None:
        self.lm = lm
        self._model = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Pending] = []
        self.batches: list[int] = []  # sizes of the generate batches served (for reports)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["lm"], name) if "lm" in self.__dict__ else super().__getattribute__(name)

    def generate(self, prompts: Sequence[str], *, max_tokens: int = 64, temperature: float = 0.0,
                 stop: Sequence[str] | None = None, seed: int = 0, choices: Sequence[str] | None = None) -> list[str]:
        if choices is not None or temperature > 0:
            with self._model:
                return self.lm.generate(prompts, max_tokens=max_tokens, temperature=temperature, stop=stop, seed=seed, choices=choices)
        key = (max_tokens, tuple(stop or ()), seed)
        mine = [_Pending(key, p) for p in prompts]
        with self._queue_lock:
            self._queue.extend(mine)
        with self._model:
            if not all(m.done for m in mine):
                self._serve(key)
        for m in mine:
            if m.error is not None:
                raise m.error
        return [m.result or "" for m in mine]

    def _serve(self, key: tuple) -> None:
        """Run every queued generation with ``key`` (the caller holds the model lock)."""
        with self._queue_lock:
            batch = [q for q in self._queue if q.key == key]
            self._queue = [q for q in self._queue if q.key != key]
        max_tokens, stop, seed = key
        try:
            out = self.lm.generate([q.prompt for q in batch], max_tokens=max_tokens, temperature=0.0, stop=list(stop) or None, seed=seed)
            for q, text in zip(batch, out):
                q.result = text
        except BaseException as e:  # every waiter sees the failure, not only the one that ran it
            for q in batch:
                q.error = e
        finally:
            self.batches.append(len(batch))
            for q in batch:
                q.done = True

    def chat(self, conversations: Sequence[Any], **kwargs: Any) -> list[str]:
        with self._model:
            return self.lm.chat(conversations, **kwargs)

    def score_batch(self, requests: Sequence[Any]) -> list[Any]:
        with self._model:
            return self.lm.score_batch(requests)

    def score_tokens(self, prompt: str, continuations: Sequence[str]) -> list[np.ndarray]:
        return self.score_batch([(prompt, list(continuations))])[0]

    def score(self, prompt: str, continuations: Sequence[str], *, reduce: str = "sum") -> list[float]:
        with self._model:
            return self.lm.score(prompt, continuations, reduce=reduce)


class IclclsEngine:
    """DSPy engine (``complete(Request) -> Response``) over an iclcls LM backend.

    Plain requests go to ``lm.chat``; requests with a JSON schema (DSPy's JSON adapter)
    are decoded by :class:`GuidedDecoder`, so the answer always parses. ``calls`` counts
    requests served (thread-safe), the per-step LM-call figure the benchmark reports.
    """

    supports_response_schema = True
    supports_function_calling = False
    supports_reasoning = False
    supported_params = frozenset({"temperature", "max_tokens", "stop", "response_format", "seed"})

    def __init__(self, lm: LM, *, max_tokens: int = DEFAULT_MAX_TOKENS, reduce: str = "sum") -> None:
        self.lm = lm
        self.max_tokens = max_tokens
        self.decoder = GuidedDecoder(lm, max_tokens=max_tokens, reduce=reduce)
        self._lock = threading.Lock()
        self.calls = 0
        self.guided_calls = 0

    def complete(self, request: Any) -> Response:
        cfg = request.config
        messages = request_messages(request)
        max_tokens = min(cfg.max_tokens or self.max_tokens, self.max_tokens)
        schema = _json_schema(cfg.response_format)
        with self._lock:
            self.calls += 1
            self.guided_calls += schema is not None
        if schema is not None and schema.get("properties"):
            text = self.decoder.decode(render_chat(self.lm, messages), schema, max_tokens=max_tokens)
        else:
            text = self.lm.chat(
                [messages],
                max_tokens=max_tokens,
                temperature=float(cfg.temperature or 0.0),
                stop=list(cfg.stop) or None,
                seed=int(cfg.seed or 0),
            )[0]
        return Response(
            id=None,
            model=request.model,
            message=Message.assistant([TextPart(text)]),
            finish_reason="stop",
            usage=Usage(input_tokens=0, output_tokens=0, total_tokens=0),
        )

    def stream(self, request: Any):
        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass

    def __deepcopy__(self, memo: dict) -> IclclsEngine:
        return self  # a loaded model is shared, never copied (DSPy deep-copies programs)


_COALESCED: weakref.WeakValueDictionary[int, CoalescingLM] = weakref.WeakValueDictionary()
_COALESCED_LOCK = threading.Lock()


def coalescing(lm: Any) -> CoalescingLM:
    """The one :class:`CoalescingLM` of a backend (one model lock per model, however many steps use it)."""
    if isinstance(lm, CoalescingLM):
        return lm
    with _COALESCED_LOCK:
        wrapped = _COALESCED.get(id(lm))
        if wrapped is None or wrapped.lm is not lm:
            wrapped = _COALESCED[id(lm)] = CoalescingLM(lm)
        return wrapped


def _model_id(lm: LM) -> str:
    name = str(getattr(lm, "name", "lm"))
    return "iclcls/" + re.sub(r"[^A-Za-z0-9._:-]+", "-", name).strip("-")


def dspy_lm(lm: LM | str, *, max_tokens: int = DEFAULT_MAX_TOKENS, cache: bool = False, reduce: str = "sum") -> dspy.LM:
    """A ``dspy.LM`` (a ``dspy.BaseLM``) served by an iclcls backend object or spec (``smollm2``, ``vllm:...``).

    ``cache=False`` by default: DSPy's response cache would hide the model's cost from
    the benchmark; turn it on for long compiles that revisit the same prompts. The backend is
    wrapped once in a :class:`CoalescingLM` (shared by every ``dspy.LM`` built on it), so
    threads may call it together.
    """
    if isinstance(lm, str):
        from iclcls.lm import get_lm

        lm = get_lm(lm)
    lm = coalescing(lm)
    engine = IclclsEngine(lm, max_tokens=max_tokens, reduce=reduce)
    return dspy.LM(_model_id(lm), engine=engine, cache=cache, temperature=0.0, max_tokens=max_tokens, num_retries=0)


SERVED_PROVIDER = "iclcls-vllm"


def served_lm(
    base_url: str,
    model: str,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    cache: bool = False,
    api_key: str = "EMPTY",
    timeout: float = 120.0,
) -> dspy.LM:
    """``dspy.LM`` on an OpenAI-compatible vLLM server, declared as honouring JSON schemas.

    DSPy only sends a JSON schema to providers it knows support one; a local vLLM
    server is unknown to its catalogue, so it is registered here (once per process) as
    the provider ``iclcls-vllm`` with ``response_schema=True``. DSPy's JSON adapter then
    sends each call's schema, and vLLM's guided decoding restricts the answer to it (for
    Rank: a list of the candidate labels).
    """
    from dspy._vendor.lm15.access import AccessPolicy, EndpointSupport
    from dspy.lm15 import ModelSupport, OpenAIChatCompat, ProviderDefinition, register_provider, registered_providers

    api_base = base_url.rstrip("/")
    if not re.search(r"/v\d+$", api_base):
        api_base += "/v1"
    current = next((p for p in registered_providers() if p.id == SERVED_PROVIDER), None)
    if current is None or current.definition.base_url != api_base:
        access = AccessPolicy(
            provider=SERVED_PROVIDER,
            supports=EndpointSupport(complete=True, stream=True, models=True),
            auth_modes=("bearer",),
            base_url=api_base,
        )
        # An LM binds the registration present when it is built, so re-declaring the
        # provider for another server leaves LMs built earlier on theirs.
        register_provider(
            ProviderDefinition.chat(access, compat=OpenAIChatCompat.preset("vllm")),
            supports=ModelSupport(response_schema=True, function_calling=False, reasoning=False),
            replace=True,
        )
    return dspy.LM(
        f"{SERVED_PROVIDER}/{model}",
        api_base=api_base,
        api_key=api_key,
        timeout=timeout,
        cache=cache,
        temperature=0.0,
        max_tokens=max_tokens,
        num_retries=1,
    )
