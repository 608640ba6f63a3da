"""Helpers the LM backends share: the token split rule, constrained-choice checks, and
OpenAI-style chat messages (images as data URLs). One place, so the in-process engine and
the HTTP client agree, and neither imports the other.
"""

from __future__ import annotations

import base64
import inspect
import mimetypes
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iclcls.lm.base import Conversation

Offsets = Sequence[tuple[int, int]]

_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
]


def accepts_shared_prefix(lm: Any) -> bool:
    """Whether ``lm.score_batch`` takes ``shared_prefix=`` (a KV-reuse hint the transformers backend keeps)."""
    try:
        return "shared_prefix" in inspect.signature(lm.score_batch).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def continuation_start(offsets: Offsets, prompt_chars: int) -> int:
    """Index of the first token of the continuation in ``prompt + continuation``.

    A token belongs to the continuation when its character span ends after the prompt's
    last character. So a token that straddles the boundary (prompt ``"Answer: "`` +
    continuation ``"yes"`` tokenised as ``"Answer", ":", " yes"``) is scored as part of
    the continuation: it carries the continuation's first characters, and dropping it
    would score the label by its tail only. Zero-width tokens (special tokens such as BOS,
    offset ``(0, 0)``) belong to the prompt. Every backend applies this one rule (the HTTP
    client to the server's ``text_offset``s), so they score the same tokens.
    """
    for i, (_, end) in enumerate(offsets):
        if end > prompt_chars:
            return i
    return len(offsets)


def choice_token_budget(choices: Sequence[str]) -> int:
    """Enough new tokens to finish any choice: constrained decoding may spell a choice in
    more tokens than its usual tokenisation (down to one byte per token), plus EOS."""
    return max(len(c.encode("utf-8")) for c in choices) + 1


def check_choices(choices: Sequence[str]) -> list[str]:
    out = [str(c) for c in choices]
    if not out:
        raise ValueError("choices is empty: give at least one allowed answer")
    if any(not c for c in out):
        raise ValueError("choices contains an empty string")
    return out


def likeliest(scored: Sequence[Sequence[Sequence[float]]], choices: Sequence[str]) -> list[str]:
    """Per prompt, the choice with the highest total log-prob (``scored[i][j]``: choice j's token log-probs)."""
    return [choices[max(range(len(choices)), key=lambda j: float(sum(s[j])))] for s in scored]


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
