"""The additions an earlier iclcls kept inside the state folder (``DIR/serve/``), read once.

That layout (``wal.jsonl`` plus ``snapshots/NNNN/``) is imported into the new store at the
first start, through the ordinary addition path (so the imported records carry their tags and
summaries like any other). Importing instead of refusing: the old files hold acknowledged
additions, and a refusal would leave the user no tool to move them. The folder is only read:
the service never writes into the state folder; the log says it may be removed afterwards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iclcls.io import read_json
from iclcls.store import StoreError
from iclcls.store.snapshots import SEQ_FILE


@dataclass
class LegacyLog:
    wal: Path
    snapshot: tuple[Path, int] | None  # the newest complete old snapshot and its seq
    records: list[dict[str, Any]]  # records after the snapshot, in seq order


def find_legacy(state_dir: Path) -> LegacyLog | None:
    """The old in-folder log of ``state_dir``, or None when there is none."""
    home = state_dir / "serve"
    wal = home / "wal.jsonl"
    if not wal.is_file():
        return None
    snapshot = None
    snaps = home / "snapshots"
    if snaps.is_dir():
        for d in snaps.iterdir():
            if d.is_dir() and d.name.isdigit() and (d / SEQ_FILE).is_file() and (d / "config.json").is_file():
                seq = int(read_json(d / SEQ_FILE)["seq"])
                if snapshot is None or seq > snapshot[1]:
                    snapshot = (d, seq)
    after = snapshot[1] if snapshot else 0
    return LegacyLog(wal, snapshot, [r for r in _read_wal(wal) if r["seq"] > after])


def _read_wal(path: Path) -> list[dict[str, Any]]:
    """Complete records; a torn last line (never acknowledged) is skipped, damage elsewhere refused."""
    lines = path.read_bytes().split(b"\n")
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = all(not x.strip() for x in lines[i + 1 :])
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int):
                raise ValueError("not a record with an integer seq")
        except ValueError as e:
            if last and i == len(lines) - 1:  # no newline after it: torn while being written
                break
            raise StoreError(f"{path}:{i + 1}: cannot import the old log ({e}); fix or remove the line") from None
        if out and rec["seq"] <= out[-1]["seq"]:
            raise StoreError(f"{path}:{i + 1}: seq {rec['seq']} after {out[-1]['seq']}: cannot import the old log")
        out.append(rec)
    return out
