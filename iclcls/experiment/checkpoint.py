"""Predictions that survive a crash: every finished chunk is appended to a partial file and
fsync'd, and a re-run resumes from it after checking that what it resumes is this run's.

A crash or Ctrl-C loses at most the chunk in flight. ``checkpoint.json`` names the run's key
(the hash of what decides its predictions) and its number of examples, and every resumed
record must hold the text of the example now at its index: predictions of another config,
another subset or other data are refused, or discarded with ``force``, never merged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from iclcls.errors import ConfigError
from iclcls.io import atomic_write_json, atomic_write_text, fsync_dir, fsync_file, read_json
from iclcls.types import Example, Prediction

PARTIAL = "predictions.partial.jsonl"
CHECKPOINT = "checkpoint.json"
PREDICTIONS = "predictions.jsonl"

ChunkCallback = Callable[[list[int]], None]


class ResumeError(ConfigError, RuntimeError):
    """The run directory holds state that does not belong to this config (or is damaged)."""


def prediction_record(index: int, example: Example, pred: Prediction, decided: Sequence[str]) -> dict[str, Any]:
    """One line of predictions.jsonl: the example, its gold labels, the decision, and the prediction
    (ranked labels, scores, candidates, demonstrations, trace)."""
    rec: dict[str, Any] = {"index": index, "id": example.id, "text": example.text, "gold": list(example.labels)}
    rec["predicted"] = list(decided)
    rec["correct"] = bool(pred.labels) and pred.labels[0] in set(example.labels)
    rec.update(pred.to_dict())
    return rec


def _jsonl(records: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Records of a predictions.jsonl, with errors naming the line."""
    path = Path(path)
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: invalid JSON: {e.msg}") from None
    return out


class PredictionCheckpoint:
    """The finished predictions of one run directory, appended as they come.

    Creating it refuses a partial file of another key at once (before any fitting);
    :meth:`start` checks the rest against the examples about to be predicted.
    """

    def __init__(self, out_dir: str | Path, key: str, *, force: bool = False) -> None:
        self.dir = Path(out_dir)
        self.partial = self.dir / PARTIAL
        self.meta = self.dir / CHECKPOINT
        self.key = key
        self.force = force
        self.done: dict[int, dict[str, Any]] = {}
        self.dir.mkdir(parents=True, exist_ok=True)
        self.saved = read_json(self.meta) if self.partial.exists() and self.meta.is_file() else {}
        if self.partial.exists() and self.saved.get("config_hash") != key:
            self._discard(f"{self.partial} holds predictions of a different config (hash {self.saved.get('config_hash')}, now {key})")

    def _discard(self, why: str) -> None:
        if not self.force:
            raise ResumeError(f"{why}: re-run with --force to discard them, or choose another output directory")
        self.partial.unlink(missing_ok=True)
        self.done = {}

    def _read(self) -> dict[int, dict[str, Any]]:
        data = self.partial.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line torn by a hard kill: drop it so appends start on a fresh line
            with open(self.partial, "r+b") as f:
                f.truncate(end)
        done = {}
        for lineno, line in enumerate(data[:end].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                done[int(rec["index"])] = rec
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ResumeError(f"{self.partial}, line {lineno}: not a prediction record; delete the file or use --force") from None
        return done

    def start(self, examples: Sequence[Example]) -> list[int]:
        """Resume what belongs to ``examples``; return the indices still to predict."""
        if self.partial.exists():
            if self.saved.get("n_examples") != len(examples):
                self._discard(f"{self.partial} holds predictions of {self.saved.get('n_examples')} examples, now {len(examples)}")
            else:
                self.done = self._read()
                stale = [i for i, r in self.done.items() if i >= len(examples) or r.get("text") != examples[i].text]
                if stale:
                    self._discard(f"{self.partial}: example {stale[0]} differs from the data now loaded")
        atomic_write_json(self.meta, {"config_hash": self.key, "n_examples": len(examples)})
        return [i for i in range(len(examples)) if i not in self.done]

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        with open(self.partial, "a", encoding="utf-8") as f:
            f.write(_jsonl(records))
            f.flush()
        fsync_file(self.partial)
        self.done.update((int(r["index"]), r) for r in records)

    def finish(self, n_examples: int) -> list[dict[str, Any]]:
        """Write predictions.jsonl atomically (in index order) and remove the checkpoint files."""
        missing = [i for i in range(n_examples) if i not in self.done]
        if missing:
            raise ResumeError(f"cannot finish: {len(missing)} examples have no prediction (first: {missing[0]})")
        records = [self.done[i] for i in range(n_examples)]
        atomic_write_text(self.dir / PREDICTIONS, _jsonl(records))
        fsync_dir(self.dir)
        self.partial.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)
        return records

    def predict(
        self,
        classifier: Any,
        examples: Sequence[Example],
        *,
        chunk_size: int | None = None,
        on_chunk: ChunkCallback | None = None,
        show_progress: bool = True,
    ) -> tuple[list[dict[str, Any]], int]:
        """Predict every example not yet done, a chunk at a time; return (all records, computed now).

        Each chunk's records are appended and fsync'd before ``on_chunk(indices)`` is called, so
        whatever happens after (an exception, Ctrl-C, a kill) the chunk is kept.
        """
        todo = self.start(examples)
        step = chunk_size or getattr(classifier, "batch_size", 16) or 16
        with tqdm(total=len(examples), initial=len(examples) - len(todo), desc="eval", unit="ex", disable=not show_progress) as bar:
            for s in range(0, len(todo), step):
                idx = todo[s : s + step]
                t0 = time.time()
                preds = classifier.predict_detailed([examples[i] for i in idx], show_progress=False)
                per = round((time.time() - t0) / len(idx), 4)
                self.append([{**prediction_record(i, examples[i], p, classifier.decide(p)), "seconds": per} for i, p in zip(idx, preds)])
                bar.update(len(idx))
                if on_chunk is not None:
                    on_chunk(idx)
        return self.finish(len(examples)), len(todo)
