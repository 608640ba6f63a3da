"""GoEmotions: multi-label emotions of Reddit comments, 28 labels.

``goemotions/{train,dev,test}.tsv``: no header, ``text<TAB>ids<TAB>comment id`` where
``ids`` are comma-separated indices into ``labels.txt`` (one name per line).
43,410 / 5,426 / 5,427 rows; about 16% carry several labels.
"""

from __future__ import annotations

from pathlib import Path

from iclcls.data.benchmark import Benchmark, register, source
from iclcls.data.records import build_examples
from iclcls.data.tables import read_table
from iclcls.errors import DataError, check_utf8
from iclcls.types import Example, LabelSpace


def goemotions_labels(root: Path) -> LabelSpace:
    path = source(root, "goemotions", "labels.txt")
    check_utf8(path)
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return LabelSpace(names)


def _split(root: Path, file: str, space: LabelSpace) -> list[Example]:
    table = read_table(source(root, "goemotions", file), delimiter="\t", columns=("text", "ids", "comment_id"), quote=False)
    labels: list[list[str]] = []
    for i, cell in enumerate(table.column("ids")):
        names = []
        for part in cell.split(","):
            part = part.strip()
            if not part.isdigit() or int(part) >= len(space):
                raise DataError(
                    f"label id {part!r} is not an index into labels.txt (0..{len(space) - 1})",
                    path=table.path,
                    location=table.locate(i),
                    field="ids",
                )
            names.append(space[int(part)])
        labels.append(names)
    return build_examples(
        table.column("text"),
        labels,
        table.column("comment_id"),
        path=table.path,
        locate=table.locate,
        label_field="ids",
        label_space=space,
    )


@register("goemotions")
def goemotions(root: Path) -> Benchmark:
    """GoEmotions, multi-label, labels in ``labels.txt`` order; ids are the Reddit comment ids."""
    space = goemotions_labels(root)
    return Benchmark(
        "goemotions",
        train=_split(root, "train.tsv", space),
        validation=_split(root, "dev.tsv", space),
        test=_split(root, "test.tsv", space),
        labels=space,
        multi_label=True,
    )
