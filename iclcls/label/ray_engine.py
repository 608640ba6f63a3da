"""`iclcls label --engine ray`: the same labelling as a Ray Data pipeline.

read (``read_text`` for JSONL/.txt, ``read_csv``, ``read_parquet``) -> ``map_batches`` over a
pool of actors that each load the saved state once -> rows streamed back in input order
(``preserve_order``) to the driver, which numbers them and writes OUT exactly as the local
engine does (same rows, ids, resume and sidecar). JSONL goes through ``read_text`` and the
local line parser rather than ``read_json``, so a malformed line is one error row on both
engines instead of a failed read.

Row numbers are only known in order, at the driver: on resume without an id column the
workers re-label the rows already done and the driver drops them; with ``--id-field`` the
workers skip done ids themselves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from iclcls.data.tables import csv_options
from iclcls.errors import LMServerError
from iclcls.label.readers import Format, Record, csv_columns, parse_line, records_from_columns, unknown_id
from iclcls.label.rows import LMUnavailable, RowOptions, label_records, prepare

SKIPPED = ""  # a worker's marker for a row already in OUT (kept so the driver's numbering holds)
OUTAGE = "__lm_unavailable__"  # a worker's last row when the LM server is unreachable: the driver stops there
_UNKNOWN = unknown_id(None)


class LabelActor:
    """A Ray actor: loads the state once, then labels batches of input rows."""

    def __init__(
        self, *, state: str, lm: str | None, trust: bool, fmt: Format, text_field: str, id_field: str | None,
        chunk_rows: int, row_options: RowOptions, done: frozenset, threads: int, store: str | None = None,
        store_seq: int | None = None,
    ) -> None:
        import torch

        from iclcls.label.live import load_labeller

        torch.set_num_threads(max(1, threads))
        # every actor: the same snapshot + records up to the same seq as the driver recorded
        clf = load_labeller(state, lm=lm, trust=trust, store=store, store_seq=store_seq)
        self.clf = prepare(clf, chunk_rows=chunk_rows)
        self.fmt, self.text_field, self.id_field = fmt, text_field, id_field
        self.row_options, self.done = row_options, done

    def __call__(self, batch: Any) -> dict[str, list[str]]:
        records = self._records(batch)
        todo = [r for r in records if not (self.id_field and r.id in self.done)]
        outage = None
        try:
            labelled = iter(label_records(self.clf, todo, self.row_options))
        except LMUnavailable as e:  # as a row, not an exception: Ray would wrap or retry it
            labelled, outage = iter(e.rows), str(e)
        out = []
        for r in records:
            if self.id_field and r.id in self.done:
                out.append(SKIPPED)
                continue
            row = next(labelled, None)
            if row is None:
                out.append(json.dumps({OUTAGE: outage}))
                break
            out.append(json.dumps(row, ensure_ascii=False))
        return {"row": out}

    def _records(self, batch: Any) -> list[Record]:
        if self.fmt in ("jsonl", "txt"):
            lines = batch.column("text").to_pylist()
            return [
                parse_line(line, fmt=self.fmt, row=None, text_field=self.text_field, id_field=self.id_field)
                for line in lines
                if line.strip()
            ]
        names = batch.schema.names
        ids = batch.column(names.index(self.id_field)) if self.id_field else None
        return records_from_columns(
            batch.column(names.index(self.text_field)), ids,
            rows=[None] * batch.num_rows, text_field=self.text_field, id_field=self.id_field,
        )


_READ_CPUS = 0.1  # reading is light next to labelling


def _read(path: Path, fmt: Format, *, text_field: str, id_field: str | None, num_cpus: float) -> Any:
    import ray.data

    p = str(path.resolve())
    if fmt in ("jsonl", "txt"):
        return ray.data.read_text(p, drop_empty_lines=True, num_cpus=num_cpus)
    if fmt == "parquet":
        return ray.data.read_parquet(p, columns=list(dict.fromkeys(c for c in (text_field, id_field) if c)), num_cpus=num_cpus)
    _, parse, convert = csv_options("\t" if fmt == "tsv" else ",", text=csv_columns(path, fmt))  # as the local engine
    convert.include_columns = list(dict.fromkeys(c for c in (text_field, id_field) if c))
    return ray.data.read_csv(p, num_cpus=num_cpus, parse_options=parse, convert_options=convert)


def iter_ray_rows(
    path: Path, fmt: Format, *, state: Path, lm: str | None, trust: bool, text_field: str, id_field: str | None,
    chunk_rows: int, row_options: RowOptions, workers: int, address: str | None, limit: int | None,
    done: set[Any], worker_cpus: float | None = None, store: str | None = None, store_seq: int | None = None,
) -> Iterator[list[tuple[int, dict[str, Any] | None]]]:
    """Batches of ``(row number, row or None if already done)`` in input order."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError("--engine ray needs Ray Data: pip install 'iclcls[ray]' (ray[data])") from None

    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ds = _read(path, fmt, text_field=text_field, id_field=id_field, num_cpus=_READ_CPUS)
        if worker_cpus is None:  # leave room for the read tasks, or a full pool starves them
            total = float(ray.cluster_resources().get("CPU", 1.0))
            worker_cpus = max(0.1, min(1.0, (total - 2 * _READ_CPUS) / workers))
        if limit is not None:
            ds = ds.limit(limit)
        ds = ds.map_batches(
            LabelActor,
            fn_constructor_kwargs=dict(
                state=str(Path(state).resolve()), lm=lm, trust=trust, fmt=fmt, text_field=text_field,
                id_field=id_field, chunk_rows=chunk_rows, row_options=row_options,
                done=frozenset(done) if id_field else frozenset(), threads=max(1, round(worker_cpus)),
                store=_absolute_store(store), store_seq=store_seq,
            ),
            batch_size=chunk_rows,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=worker_cpus,
        )
        row = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            out: list[tuple[int, dict[str, Any] | None]] = []
            for s in batch.column("row").to_pylist():
                if s == SKIPPED:
                    out.append((row, None))
                else:
                    d = json.loads(s)
                    if OUTAGE in d:  # write what came before, then stop
                        yield out
                        raise LMUnavailable(LMServerError(d[OUTAGE]))
                    if d.get("id") is None:
                        d["id"] = row
                    elif d["id"] == _UNKNOWN:
                        d["id"] = unknown_id(row)
                    out.append((row, d))
                row += 1
            yield out
    finally:
        if started:
            ray.shutdown()


def _absolute_store(store: str | None) -> str | None:
    """A SQLite store path made absolute for actors (which may run in another folder); a URL as is."""
    if store is None or "://" in store:
        return store
    return str(Path(store).resolve())
