"""Tokenise texts for an exported model: fast tokenizer, batches sorted by length.

Sorting by length matters on a CPU: a batch is padded to its longest text, and unsorted
batches made onnxruntime about half as fast (DESIGN.md). The ``tokenizers`` library is all
this needs, so an exported embedder starts without importing torch or transformers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np


class TokenBatcher:
    """A ``tokenizers.Tokenizer`` truncating to ``max_length``; yields padded int64 batches."""

    def __init__(self, tokenizer_json: str | Path, *, max_length: int) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.no_padding()
        self.pad_id = next(
            (i for t in ("[PAD]", "<pad>") if (i := self.tokenizer.token_to_id(t)) is not None), 0
        )  # masked out either way; RoBERTa-style models derive positions from it

    def batches(
        self, texts: Sequence[str], *, batch_size: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(row indices, input_ids, attention_mask) per batch, longest texts first."""
        encodings = self.tokenizer.encode_batch(list(texts))
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        order = np.argsort(-lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = int(lengths[idx].max())
            ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                n = int(lengths[i])
                ids[row, :n] = encodings[i].ids
                mask[row, :n] = 1
            yield idx, ids, mask
