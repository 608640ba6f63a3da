"""Stores of class additions: ``open_store(spec)`` picks the backend from the spec.

A path (``additions.sqlite``, ``/var/lib/iclcls/store.db``) opens SQLite (one writer, the
embedded default); ``postgresql://USER@HOST:PORT/DB`` opens PostgreSQL (any number of replicas).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from iclcls.store.base import AdditionStore, Appended, KeyConflict, Record, StoreError, StoreLocked, StoreWriteFailed

__all__ = ["AdditionStore", "Appended", "KeyConflict", "Record", "StoreError", "StoreLocked", "StoreWriteFailed",
           "default_store_path", "open_store"]


def default_store_path(state_dir: str | Path) -> Path:
    """``DIR.additions.sqlite`` beside the state folder ``DIR``: outside it, so the fitted state
    is never written, fingerprinted with the additions, or replaced under a running server."""
    d = Path(state_dir).absolute()
    return d.with_name(d.name + ".additions.sqlite")


def open_store(spec: str | Path, *, writer: Mapping[str, Any] | None = None, read_only: bool = False) -> AdditionStore:
    """The store at ``spec``; ``writer`` (pid/port facts) takes SQLite's one-writer lock."""
    text = str(spec)
    if text.startswith(("postgresql://", "postgres://")):
        from iclcls.store.postgres import PostgresStore

        return PostgresStore(text, writer=writer, read_only=read_only)
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise StoreError(f"--store {scheme}://...: not a store; give a SQLite file path or a postgresql:// URL")
    from iclcls.store.sqlite import SQLiteStore

    return SQLiteStore(text, writer=writer, read_only=read_only)
