"""The store of class additions: what every backend (SQLite, PostgreSQL) promises.

The store, not the fitted state folder, is the source of truth for what was added live: the
service's state is the base state (or the newest snapshot) plus every record after it, in
sequence order. A record holds everything replay needs (texts, labels, descriptions, the tags
and summaries an LM wrote when it was prepared), so replay is deterministic and calls no LM.

A record and the answer first given for it are written in ONE transaction: there is no moment
when an addition is durable but its answer is not, so a retry with the same idempotency key
after a crash gets exactly the first answer (hence no separate ``set_response``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from iclcls.errors import IclclsError


class StoreError(IclclsError, RuntimeError):
    """The store cannot be used (damaged, made for another state, unreadable)."""


class StoreLocked(StoreError):
    """Another process holds the store's writer lock; the message names the lock and its holder."""


class StoreWriteFailed(StoreError):
    """A commit failed (disk full, I/O error); nothing of it was stored and the store is still valid."""

    def __init__(self, message: str, *, full: bool) -> None:
        super().__init__(message)
        self.full = full


class KeyConflict(IclclsError, ValueError):
    """An idempotency key was used before with a different request body."""


@dataclass(frozen=True)
class Record:
    """One committed addition."""

    seq: int
    key: str | None
    digest: str  # SHA-256 of the request body, to tell a retry from a different request
    body: Mapping[str, Any]  # examples (text, label, tags), descriptions, summaries
    response: Mapping[str, Any]  # the first answer, without its seq
    created: float


def record_from_row(row: tuple, location: str) -> Record:
    """A stored row ``(seq, key, digest, body, response, created)`` as a Record; damage is a StoreError."""
    seq, key, digest, body, response, created = row
    try:
        body, response = json.loads(body), json.loads(response)
    except ValueError as e:
        raise StoreError(f"{location}: record seq {seq} is not valid JSON ({e})") from None
    if not isinstance(body, dict) or not isinstance(response, dict):
        raise StoreError(f"{location}: record seq {seq} is not a JSON object")
    return Record(int(seq), key, digest, body, response, float(created))


@dataclass(frozen=True)
class Appended:
    """What ``append`` did: a new record, or (``duplicate``) the one already under the key."""

    seq: int
    response: Mapping[str, Any]
    duplicate: bool


@runtime_checkable
class AdditionStore(Protocol):
    """A log of additions with server-assigned sequence numbers and unique idempotency keys."""

    location: str  # for messages: a path or a URL without credentials
    multi_writer: bool  # False: one process writes (SQLite's lock); True: replicas write and must follow

    def ordered(self) -> AbstractContextManager[None]:
        """Hold the store's order until exit: no other process commits meanwhile, so the caller can
        catch up to the head, apply its addition on top, and ``append`` it as the next seq.
        (SQLite: nothing to hold, its writer lock already makes this process the only writer.)"""
        ...

    def wait(self, seq: int, timeout: float) -> None:
        """Return when records after ``seq`` may exist (a wake-up, never the truth: read
        ``records_after``), or after ``timeout`` seconds."""
        ...

    def snapshots(self, *, keep: int = 2) -> Any:
        """The store's own place for snapshots (a ``Snapshots``-like object: latest/write/seal/turn)."""
        ...

    def seq(self) -> int:
        """The last committed sequence number (0 for an empty store)."""
        ...

    def append(
        self, body: Mapping[str, Any], *, key: str | None, digest: str, response: Mapping[str, Any]
    ) -> Appended:
        """Commit a record durably with the next seq; under a known key, commit nothing and return
        the first record's seq and answer (``KeyConflict`` if its digest differs).
        Raises ``StoreWriteFailed`` when the commit fails; the store is then unchanged."""
        ...

    def records_after(self, seq: int) -> Iterator[Record]:
        """Committed records with a seq greater than ``seq``, in order."""
        ...

    def lookup(self, key: str) -> Record | None:
        """The record committed under ``key``, if any."""
        ...

    def get_meta(self, name: str) -> str | None: ...

    def set_meta(self, name: str, value: str) -> None: ...

    def close(self) -> None:
        """Release the writer lock and the connection."""
        ...
