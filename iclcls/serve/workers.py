"""The service's background threads: follow the store, write snapshots, refresh stale stages.

Each is a daemon thread with its own reason to wake, so none delays another: following other
replicas (a store wake-up or a poll), a snapshot (asked for after ``snapshot_every`` additions),
and the refit of stages that additions leave stale (on a schedule, off every lock but the
short swap).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("iclcls.serve")


class Workers:
    """Starts the threads for ``live`` (a LiveClassifier); ``stop`` ends them."""

    def __init__(self, live: Any, *, follow_poll_s: float | None, refresh_every_s: float) -> None:
        self.live = live
        self._stop = threading.Event()
        self._snap_wanted = threading.Event()
        self._threads = [threading.Thread(target=self._snapshot_loop, name="iclcls-snapshot", daemon=True)]
        if follow_poll_s is not None:
            self._poll = max(0.05, follow_poll_s)
            self._threads.append(threading.Thread(target=self._follow_loop, name="iclcls-follow", daemon=True))
        if refresh_every_s > 0:
            self._every = refresh_every_s
            self._threads.append(threading.Thread(target=self._refresh_loop, name="iclcls-refresh", daemon=True))
        for t in self._threads:
            t.start()

    def want_snapshot(self) -> None:
        self._snap_wanted.set()

    def _snapshot_loop(self) -> None:
        while True:
            self._snap_wanted.wait()
            self._snap_wanted.clear()
            if self._stop.is_set():
                return
            try:
                self.live.snapshot()
            except Exception:  # a failed snapshot loses nothing: the store holds every addition
                log.exception("snapshot failed; the store still holds every addition")

    def _follow_loop(self) -> None:
        """The store's notification wakes it; the seq in the store is what it applies up to, so
        a lost notification only waits for the next poll."""
        while not self._stop.is_set():
            self.live.store.wait(self.live.applied_seq, self._poll)
            if self._stop.is_set():
                return
            if self.live.failed:
                continue
            try:
                self.live.catch_up()
            except Exception:  # the store unreachable: serve what we have, try again next round
                log.exception("following the store failed; serving seq %d, trying again", self.live.applied_seq)
                self._stop.wait(self._poll)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self._every):
            try:
                names = self.live.clf.refresh_stale(swap=self.live.changing)
                if names:
                    log.info("refreshed stale stage(s): %s", ", ".join(names))
            except Exception:
                log.exception("refreshing stale stages failed; they stay as they were")

    def stop(self) -> None:
        self._stop.set()
        self._snap_wanted.set()
        for t in self._threads:
            t.join(timeout=60 if t.name == "iclcls-snapshot" else 5)
