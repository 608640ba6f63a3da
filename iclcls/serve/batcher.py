"""Micro-batching: classify requests that arrive together go to the classifier as one batch.

Serving engines batch concurrent requests because one batched forward pass costs far less
than one per request. One worker thread owns the classifier calls (so LM work never runs
on the event loop); it takes the first waiting request, then gathers whatever else arrives
within ``max_wait_s`` (up to ``max_batch`` texts), predicts once and hands each request its
slice. ``enabled=False`` predicts one request at a time (the baseline the benchmark compares).
When a batched call fails, its requests are predicted again one by one, so a request that
breaks the classifier fails alone instead of taking its batch-mates with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from iclcls.errors import ConfigError, IclclsError

log = logging.getLogger("iclcls.serve")


class Overloaded(IclclsError, RuntimeError):
    """More requests are waiting than ``max_queue``: the caller should answer 503."""


_STOP = object()


class MicroBatcher:
    def __init__(
        self,
        predict: Callable[[list[str]], list[Any]],
        *,
        enabled: bool = True,
        max_wait_s: float = 0.005,
        max_batch: int = 32,
        max_queue: int = 1024,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        if max_wait_s < 0 or max_batch < 1 or max_queue < 1:
            raise ConfigError("max_wait_s must be >= 0, max_batch and max_queue >= 1")
        self.predict = predict
        self.enabled = enabled
        self.max_wait_s = max_wait_s
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.on_batch = on_batch  # (requests, texts, seconds) -> None, for metrics
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="iclcls-batcher", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._q.qsize()

    async def submit(self, texts: Sequence[str]) -> list[Any]:
        """Predictions for ``texts``, computed on the worker thread, possibly with other requests'."""
        if self._q.qsize() >= self.max_queue:
            raise Overloaded(f"{self._q.qsize()} requests are waiting (limit {self.max_queue})")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put((list(texts), fut))
        return await asyncio.wrap_future(fut)

    def _gather(self, first: tuple[list[str], concurrent.futures.Future]) -> tuple[list, bool]:
        batch, n, stop = [first], len(first[0]), False
        if not self.enabled:
            return batch, stop
        deadline = time.monotonic() + self.max_wait_s
        while n < self.max_batch:
            left = deadline - time.monotonic()
            try:
                item = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            if item[1].set_running_or_notify_cancel():
                batch.append(item)
                n += len(item[0])
        return batch, stop

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            if not item[1].set_running_or_notify_cancel():
                continue  # the client went away before its turn
            batch, stop = self._gather(item)
            texts = [t for b in batch for t in b[0]]
            t0 = time.perf_counter()
            try:
                preds = self.predict(texts)
            except BaseException as e:
                if isinstance(e, Exception) and len(batch) > 1:
                    self._one_by_one(batch, e)
                else:  # every request learns why
                    log.exception("prediction failed for %d request(s), %d texts", len(batch), len(texts))
                    for _, fut in batch:
                        fut.set_exception(e)
            else:
                if self.on_batch is not None:
                    self.on_batch(len(batch), len(texts), time.perf_counter() - t0)
                pos = 0
                for req_texts, fut in batch:
                    fut.set_result(preds[pos : pos + len(req_texts)])
                    pos += len(req_texts)
            if stop:
                return

    def _one_by_one(self, batch: list, error: Exception) -> None:
        """A batch failed: predict its requests singly, so one bad request fails only itself."""
        log.warning("a batch of %d requests failed (%s: %s); retrying them one by one", len(batch),
                    type(error).__name__, error)
        for req_texts, fut in batch:
            t0 = time.perf_counter()
            try:
                preds = self.predict(req_texts)
            except Exception as e:
                log.exception("prediction failed for a request of %d texts", len(req_texts))
                fut.set_exception(e)
            else:
                if self.on_batch is not None:
                    self.on_batch(1, len(req_texts), time.perf_counter() - t0)
                fut.set_result(preds)

    def close(self, timeout: float = 30.0) -> None:
        self._q.put(_STOP)
        self._thread.join(timeout=timeout)
