"""BANKING77 and CLINC150 intent benchmarks, with their DialoGLUE few-shot and KLDA splits.

Sources (see the data folder's README): ``banking77/{train,test}.csv`` and
``categories.json``; ``clinc150/data_full.json`` and ``domains.json``;
``dialoglue_splits/{banking,clinc}/*.csv``; ``klda_splits/*.csv``.

``banking77`` is the original release: 10,003 train, 3,080 test and **no validation
split** (empty list). The DialoGLUE validation set is carved out of the original train
set (all 1,540 of its rows are original train rows), so attaching it to the full train
set would leak; use ``banking77_dialoglue`` (8,622 / 1,540 / 3,080) to tune on
validation data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iclcls.data.benchmark import Benchmark, register, source
from iclcls.data.records import build_examples
from iclcls.data.tables import read_table, table_examples
from iclcls.errors import DataError
from iclcls.types import Example, LabelSpace

OOS = "oos"


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"not valid UTF-8 JSON: {e}", path=path) from None


def _csv_split(root: Path, rel: str, space: LabelSpace, *, label_field: str = "category") -> list[Example]:
    return table_examples(
        read_table(source(root, *rel.split("/"))), text_field="text", label_field=label_field, label_space=space, id_prefix=rel
    )


# ---- BANKING77 ---------------------------------------------------------------------


def banking_labels(root: Path) -> LabelSpace:
    """The 77 intents in ``categories.json`` order."""
    path = source(root, "banking77", "categories.json")
    names = _read_json(path)
    if not isinstance(names, list) or len(set(names)) != len(names):
        raise DataError("expected a JSON list of distinct category names", path=path)
    return LabelSpace(names)


@register("banking77")
def banking77(root: Path) -> Benchmark:
    """Original BANKING77: 10,003 train / 3,080 test, no validation split (see the module doc)."""
    space = banking_labels(root)
    return Benchmark(
        "banking77",
        train=_csv_split(root, "banking77/train.csv", space),
        validation=[],
        test=_csv_split(root, "banking77/test.csv", space),
        labels=space,
    )


def _dialoglue(name: str, folder: str, train_file: str, space: LabelSpace, root: Path) -> Benchmark:
    base = f"dialoglue_splits/{folder}"
    return Benchmark(
        name,
        train=_csv_split(root, f"{base}/{train_file}", space),
        validation=_csv_split(root, f"{base}/val.csv", space),
        test=_csv_split(root, f"{base}/test.csv", space),
        labels=space,
    )


def _register_dialoglue(name: str, folder: str, labels: Callable[[Path], LabelSpace]) -> None:
    """``NAME_dialoglue`` (DialoGLUE's train), ``NAME_10shot`` and ``NAME_5shot`` (10 or 5 examples
    per class as train); all with DialoGLUE's validation and test."""
    for variant, train_file in (("dialoglue", "train.csv"), ("10shot", "train_10.csv"), ("5shot", "train_5.csv")):
        def load(root: Path, n: str = f"{name}_{variant}", f: str = train_file) -> Benchmark:
            return _dialoglue(n, folder, f, labels(root), root)

        register(f"{name}_{variant}")(load)


# DialoGLUE BANKING77: 8,622 / 1,540 / 3,080; 10-shot train 770, 5-shot 385.
_register_dialoglue("banking77", "banking", banking_labels)


# ---- CLINC150 ----------------------------------------------------------------------


def clinc_labels(root: Path, *, oos: bool = False) -> LabelSpace:
    """The 150 in-scope intents, grouped by domain in ``domains.json`` order (+ ``oos`` last)."""
    path = source(root, "clinc150", "domains.json")
    domains = _read_json(path)
    if not isinstance(domains, dict):
        raise DataError("expected a JSON object {domain: [intent, ...]}", path=path)
    space = LabelSpace(intent for intents in domains.values() for intent in intents)
    if oos:
        space.add(OOS)
    return space


def _clinc_json_split(path: Path, data: dict[str, Any], keys: tuple[str, ...], space: LabelSpace) -> list[Example]:
    out: list[Example] = []
    for key in keys:
        pairs = data.get(key)
        if not isinstance(pairs, list):
            raise DataError(f"no list under key {key!r}; keys are: {', '.join(data)}", path=path)
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise DataError(f"expected [text, intent], got {pair!r}", path=path, location=f"{key!r} item {i + 1}")
        out += build_examples(
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            [f"clinc150/{path.name}#{key}/{i}" for i in range(len(pairs))],
            path=path,
            locate=lambda i, key=key: f"{key!r} item {i + 1}",
            text_field="[0] text",
            label_field="[1] intent",
            label_space=space,
        )
    return out


def _clinc(name: str, root: Path, *, oos: bool) -> Benchmark:
    space = clinc_labels(root, oos=oos)
    path = source(root, "clinc150", "data_full.json")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError("expected a JSON object with train/val/test lists", path=path)
    extra = (lambda k: (k, f"oos_{k}")) if oos else (lambda k: (k,))
    return Benchmark(
        name,
        train=_clinc_json_split(path, data, extra("train"), space),
        validation=_clinc_json_split(path, data, extra("val"), space),
        test=_clinc_json_split(path, data, extra("test"), space),
        labels=space,
    )


@register("clinc150")
def clinc150(root: Path) -> Benchmark:
    """CLINC150 full, in-scope only: 15,000 / 3,000 / 4,500, 150 intents."""
    return _clinc("clinc150", root, oos=False)


@register("clinc150_oos")
def clinc150_oos(root: Path) -> Benchmark:
    """CLINC150 full plus out-of-scope queries labelled ``oos``: 15,100 / 3,100 / 5,500, 151 labels."""
    return _clinc("clinc150_oos", root, oos=True)


# DialoGLUE CLINC150 (in-scope): 15,000 / 3,000 / 4,500; 10-shot train 1,500, 5-shot 750.
_register_dialoglue("clinc150", "clinc", clinc_labels)


# ---- KLDA continual-learning splits ------------------------------------------------


def _klda(name: str, root: Path, stem: str, names: list[str]) -> Benchmark:
    """Labels are integer indices into the case-insensitively sorted class names (or the names)."""
    space = LabelSpace(sorted(names, key=str.lower))

    def splits(split: str) -> list[Example]:
        rel = f"klda_splits/{stem}_{split}.csv"
        table = read_table(source(root, *rel.split("/")))

        def to_name(i: int, value: str) -> str:
            if value.strip().isdigit():
                k = int(value)
                if k >= len(space):
                    raise DataError(f"class index {k} is out of range (0..{len(space) - 1})", path=table.path, location=table.locate(i), field="label")
                return space[k]
            return value

        return table_examples(table, text_field="text", label_field="label", label_space=space, id_prefix=rel, map_label=to_name)

    return Benchmark(name, train=splits("train"), validation=[], test=splits("test"), labels=space)


@register("banking77_klda")
def banking77_klda(root: Path) -> Benchmark:
    """KLDA's BANKING77 split: full train (10,003), 1,000 test; labels in case-insensitive sorted order."""
    return _klda("banking77_klda", root, "banking", list(banking_labels(root)))


@register("clinc150_klda")
def clinc150_klda(root: Path) -> Benchmark:
    """KLDA's CLINC150 split: 10,500 train, 750 test; labels in case-insensitive sorted order."""
    return _klda("clinc150_klda", root, "clinc", list(clinc_labels(root)))
