"""Errors that cross layers; each says what was refused and why."""

from __future__ import annotations


class UntrustedStateError(ValueError):
    """A saved state asks for something only a trusted state may: an LM endpoint, a file
    path or a template. Load it with ``trust=True`` (``--trust-state``) if you trust who
    made it, or override the field (``lm=...``)."""


class LMServerError(RuntimeError):
    """An LM server failed: unreachable, timed out, or answered with an error after all
    retries. The message names the URL. Commands stop on it; checkpointed work survives."""
