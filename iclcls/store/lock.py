"""One writer per store: an exclusive ``flock`` on a sidecar file that names its holder.

``flock`` is released by the kernel when the process dies (``kill -9`` included), so a crash
never leaves a stale lock; the holder's pid, host, port and start time are written into the
file only so that a refused second server can say who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from iclcls.io import fsync_file
from iclcls.store.base import StoreLocked


class WriterLock:
    """Held from construction until ``release``; raises ``StoreLocked`` naming the holder."""

    def __init__(self, path: str | Path, *, holder: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _describe(self._read())
            os.close(self._fd)
            self._fd = None
            raise StoreLocked(
                f"the store is in use: {self.path} is locked by {who}. One server writes to a store at a "
                "time: stop that server, or give this one another --store"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **dict(holder or {})}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode("utf-8"), 0)
        fsync_file(self._fd)

    def _read(self) -> dict[str, Any]:
        try:
            data = os.pread(self._fd, 4096, 0)
            out = json.loads(data.decode("utf-8"))
            return out if isinstance(out, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _describe(info: Mapping[str, Any]) -> str:
    if not info:
        return "another process (it has not written its name yet)"
    parts = [f"pid {info.get('pid', '?')} on {info.get('host', '?')}"]
    if info.get("port") is not None:
        parts.append(f"port {info['port']}")
    if info.get("since"):
        parts.append(f"since {info['since']}")
    return ", ".join(parts)
