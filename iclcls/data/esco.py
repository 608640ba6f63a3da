"""ESCO skill extraction (TECH, HOUSE): extreme multi-label over 13,896 ESCO skills.

Sources in ``esco_skills/``: ``skills_en_label.txt`` (one skill per line, CRLF, no
trailing newline; kept verbatim as the label space, in file order), CSV annotations
``{tech,house}_{validation,test}_annotations.csv`` with ``sentence,span,sub_span,label``
(one row per annotated span, often repeated), and ``esco_priors.json`` (skill ->
frequency, not normalised).

Loading rules:
- rows are grouped by sentence text in order of first appearance; the sentence's
  labels are its rows' labels, de-duplicated in order;
- ``LABEL NOT PRESENT`` and ``UNDERSPECIFIED`` carry no label and are dropped;
- a sentence left with no label cannot be scored, so it is dropped and counted in
  ``info["dropped_unlabelled_sentences"]``;
- an annotation (or prior) label missing from the label file is matched to the label
  that is equal up to commas and whitespace (the annotations write ``"plan "`` for
  ``plan`` and ``"data extraction, transformation and loading tools"`` for
  ``data extraction transformation and loading tools``); every such rewrite is listed in
  ``info["remapped_labels"]``. A label with no such match would be added to the label
  space and listed in ``info["added_labels"]`` (none in the released data).

There is no train split (the task is zero-shot over the label space); validation and
test come from the two annotation files. TECH test: 338 sentences, 1.72 labels each;
HOUSE test: 262.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from iclcls.data.benchmark import Benchmark, register, source
from iclcls.data.records import build_examples
from iclcls.data.tables import read_table
from iclcls.errors import DataError, check_utf8
from iclcls.types import Example, LabelSpace

NO_LABEL = frozenset({"LABEL NOT PRESENT", "UNDERSPECIFIED"})


def label_key(label: str) -> str:
    """Equality up to commas and whitespace (incl. no-break spaces): how variants are matched."""
    return " ".join(label.replace(",", " ").split())


def esco_labels(root: Path) -> LabelSpace:
    """The ESCO skills in file order, verbatim (a few carry leading/trailing or no-break spaces)."""
    path = source(root, "esco_skills", "skills_en_label.txt")
    check_utf8(path)
    lines = re.split(r"\r\n|\n", path.read_text(encoding="utf-8"))
    space = LabelSpace()
    for lineno, name in enumerate(lines, start=1):
        if not name.strip():
            continue
        if name in space:
            raise DataError(f"skill {name!r} is listed twice", path=path, location=f"line {lineno}")
        space.add(name)
    return space


class _LabelMatcher:
    """Maps raw label strings onto the label space, recording every rewrite and addition."""

    def __init__(self, space: LabelSpace) -> None:
        self.space = space
        self.by_key: dict[str, str] = {}
        for lab in space:
            self.by_key.setdefault(label_key(lab), lab)
        self.remapped: dict[str, str] = {}
        self.remapped_rows = 0
        self.added: list[str] = []

    def __call__(self, raw: str) -> str:
        if raw in self.space:
            return raw
        match = self.by_key.get(label_key(raw))
        if match is not None:
            self.remapped[raw] = match
            self.remapped_rows += 1
            return match
        self.space.add(raw)
        self.by_key[label_key(raw)] = raw
        self.added.append(raw)
        return raw


def _split(root: Path, file: str, match: _LabelMatcher) -> tuple[list[Example], dict[str, int]]:
    table = read_table(source(root, "esco_skills", file))
    sentences = table.column("sentence")
    raw_labels = table.column("label")
    first_row: dict[str, int] = {}
    groups: dict[str, list[str]] = {}
    for i, (sentence, label) in enumerate(zip(sentences, raw_labels)):
        if sentence not in first_row:
            first_row[sentence] = i
            groups[sentence] = []
        if label.strip() and label not in NO_LABEL:
            groups[sentence].append(match(label))
    kept = [s for s in groups if groups[s]]
    rows = [first_row[s] for s in kept]
    examples = build_examples(
        kept,
        [groups[s] for s in kept],
        [f"esco_skills/{file}:{table.lines[r]}" for r in rows],
        path=table.path,
        locate=lambda j: table.locate(rows[j]),
        text_field="sentence",
        label_field="label",
        label_space=match.space,
    )
    counts = {"rows": len(sentences), "sentences": len(groups), "dropped": len(groups) - len(kept)}
    return examples, counts


def esco_priors(root: Path, match: _LabelMatcher) -> tuple[dict[str, float], int]:
    """Label -> frequency from ``esco_priors.json``, keys matched to the label space; also the count dropped."""
    path = source(root, "esco_skills", "esco_priors.json")
    check_utf8(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e}", path=path) from None
    if not isinstance(raw, dict):
        raise DataError("expected a JSON object {skill: frequency}", path=path)
    priors: dict[str, float] = {}
    dropped = 0
    # exact keys first, so a variant never overwrites the canonical entry
    for exact in (True, False):
        for key, value in raw.items():
            if (key in match.space) != exact:
                continue
            label = key if exact else match.by_key.get(label_key(key))
            if label is None:
                dropped += 1
                continue
            priors.setdefault(label, float(value))
    return priors, dropped


def _esco(name: str, part: str, root: Path) -> Benchmark:
    space = esco_labels(root)
    n_file = len(space)
    match = _LabelMatcher(space)
    validation, v_counts = _split(root, f"{part}_validation_annotations.csv", match)
    test, t_counts = _split(root, f"{part}_test_annotations.csv", match)
    priors, priors_dropped = esco_priors(root, match)
    info = {
        "skills_in_label_file": n_file,
        "source_rows": {"validation": v_counts["rows"], "test": t_counts["rows"]},
        "sentences": {"validation": v_counts["sentences"], "test": t_counts["sentences"]},
        "dropped_unlabelled_sentences": {"validation": v_counts["dropped"], "test": t_counts["dropped"]},
        "remapped_labels": dict(match.remapped),
        "remapped_label_rows": match.remapped_rows,
        "added_labels": list(match.added),
        "priors_dropped": priors_dropped,
    }
    return Benchmark(name, train=[], validation=validation, test=test, labels=space, multi_label=True, priors=priors, info=info)


@register("esco_tech")
def esco_tech(root: Path) -> Benchmark:
    """ESCO skills in TECH job ads (validation 75 / test 338 labelled sentences)."""
    return _esco("esco_tech", "tech", root)


@register("esco_house")
def esco_house(root: Path) -> Benchmark:
    """ESCO skills in HOUSE job ads (validation 61 / test 262 labelled sentences)."""
    return _esco("esco_house", "house", root)



