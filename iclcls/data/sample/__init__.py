"""The small hand-written sample shipped in the package (``iclcls/data/sample/``).

Needs no data folder and no ``datasets`` import, so ``iclcls demo`` starts fast.
"""

from __future__ import annotations

import json
from pathlib import Path

from iclcls.data.benchmark import Benchmark, register
from iclcls.data.records import build_examples
from iclcls.errors import DataError, check_utf8
from iclcls.types import Example, LabelSpace

SAMPLE_DIR = Path(__file__).resolve().parent


def _read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    check_utf8(path)
    records, lines = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON: {e.msg}", path=path, location=f"line {lineno}") from None
            if not isinstance(rec, dict):
                raise DataError("expected a JSON object", path=path, location=f"line {lineno}")
            records.append(rec)
            lines.append(lineno)
    return records, lines


def _split(file: str, space: LabelSpace | None) -> list[Example]:
    path = SAMPLE_DIR / file
    records, lines = _read_jsonl(path)
    return build_examples(
        [r.get("text") for r in records],
        [r.get("label") for r in records],
        [f"sample/{file}:{n}" for n in lines],
        path=path,
        locate=lambda i: f"line {lines[i]}",
        label_space=space,
    )


@register("sample", needs_data=False)
def sample(_root: Path) -> Benchmark:
    """64 train / 24 test customer-support requests over 8 intents (labels in order of first appearance)."""
    train = _split("train.jsonl", None)
    space = LabelSpace.from_examples(train)
    return Benchmark("sample", train=train, validation=[], test=_split("test.jsonl", space), labels=space)
